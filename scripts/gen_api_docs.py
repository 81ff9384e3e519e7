"""Write docs/api-reference.md from the comments in protos/cl_service/**/*.proto (run by `make docs`).

The .proto files are compiled with grpc_tools.protoc (`--include_source_info`) into a FileDescriptorSet; each
service, RPC, message, field, enum and enum value is documented by the comment right above it
(`source_code_info`, looked up by descriptor path). Output is deterministic: the same .proto files give the same
bytes.

    python scripts/gen_api_docs.py            # (re)write docs/api-reference.md
    python scripts/gen_api_docs.py --check    # exit 1 when docs/api-reference.md is out of date
    python scripts/gen_api_docs.py --out X    # write (or --check) X instead

Needs grpcio-tools (the `dev` extra), as `make proto` does.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "cl_service"
DEFAULT_OUT = REPO / "docs" / "api-reference.md"
SCRIPT = "scripts/gen_api_docs.py"

# Descriptor field numbers that make up source_code_info paths (descriptor.proto).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    F.TYPE_DOUBLE: "double",
    F.TYPE_FLOAT: "float",
    F.TYPE_INT64: "int64",
    F.TYPE_UINT64: "uint64",
    F.TYPE_INT32: "int32",
    F.TYPE_FIXED64: "fixed64",
    F.TYPE_FIXED32: "fixed32",
    F.TYPE_BOOL: "bool",
    F.TYPE_STRING: "string",
    F.TYPE_BYTES: "bytes",
    F.TYPE_UINT32: "uint32",
    F.TYPE_SFIXED32: "sfixed32",
    F.TYPE_SFIXED64: "sfixed64",
    F.TYPE_SINT32: "sint32",
    F.TYPE_SINT64: "sint64",
}
# Well-known types the API uses, linked to their reference.
WELL_KNOWN = "https://protobuf.dev/reference/protobuf/google.protobuf/"
EXTERNAL = {
    "google.protobuf.Timestamp": WELL_KNOWN + "#timestamp",
    "google.protobuf.Duration": WELL_KNOWN + "#duration",
    "google.protobuf.Empty": WELL_KNOWN + "#empty",
    "google.protobuf.Struct": WELL_KNOWN + "#struct",
}


# ---- reading the .proto files -------------------------------------------------------------------


def proto_files(root: Path = PROTO_DIR) -> list[Path]:
    """Every .proto under protos/cl_service/, in a fixed order."""
    return sorted(root.rglob("*.proto"))


def compile_protos(files: Sequence[Path]) -> descriptor_pb2.FileDescriptorSet:
    """The files' descriptors with their comments (protoc --include_source_info), imports left out."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    includes = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "descriptors.pb"
        arguments = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{includes}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *[str(path) for path in files],
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit(f"{SCRIPT}: protoc failed on {', '.join(_shown(p) for p in files)}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.as_posix()


class Comments:
    """The comment of each element of one file, by descriptor path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._leading: dict[tuple[int, ...], str] = {}
        self._lines: dict[tuple[int, ...], tuple[int, int]] = {}
        for location in file.source_code_info.location:
            path = tuple(location.path)
            text = location.leading_comments or location.trailing_comments
            if text.strip():
                self._leading[path] = text
            span = list(location.span)
            self._lines[path] = (span[0], span[2] if len(span) == 4 else span[0])

    def text(self, path: tuple[int, ...]) -> str:
        return self._leading.get(path, "")

    def lines(self, path: tuple[int, ...]) -> tuple[int, int] | None:
        return self._lines.get(path)


def comment_blocks(raw: str) -> list[str]:
    """A comment as markdown blocks: paragraphs (lines joined) and "- " list items, in order."""
    blocks: list[str] = []
    current: list[str] = []

    def close() -> None:
        if current:
            blocks.append(" ".join(current))
            current.clear()

    for line in raw.splitlines():
        text = line[1:] if line.startswith(" ") else line
        stripped = text.strip()
        if not stripped:
            close()
        elif stripped.startswith("- "):
            close()
            current.append(stripped)
        else:
            current.append(stripped)
    close()
    return blocks


_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A regular expression in prose, e.g. ^[a-z][a-z0-9_]{0,63}$ or [A-Za-z0-9._:@-]{1,128}: shown as code.
_PATTERN = re.compile(r"\^?(?:\[[^\]\s`]+\])+\{\d+(?:,\d*)?\}\$?")


def escape(text: str) -> str:
    """Markdown-escape prose: `code spans` are kept (and regular expressions become code spans); outside them
    characters that would become markup are escaped (an underscore only where it could start or end emphasis, so
    UPPER_SNAKE_CASE stays readable)."""
    text = _PATTERN.sub(lambda match: f"`{match.group(0)}`", text)
    out: list[str] = []
    position = 0
    for match in _CODE_SPAN.finditer(text):
        out.append(_escape_prose(text[position : match.start()]))
        out.append(match.group(0))
        position = match.end()
    out.append(_escape_prose(text[position:]))
    return "".join(out)


def _escape_prose(text: str) -> str:
    out: list[str] = []
    for i, char in enumerate(text):
        if char in "\\*[]<>|$`":
            out.append("\\" + char)
        elif char == "_":
            before = text[i - 1] if i > 0 else " "
            after = text[i + 1] if i + 1 < len(text) else " "
            out.append("_" if before.isalnum() and after.isalnum() else "\\_")
        else:
            out.append(char)
    return "".join(out)


def cell(raw: str) -> str:
    """A comment for a table cell: one line, pipes escaped (also inside code spans)."""
    return " ".join(escape(block) for block in comment_blocks(raw)).replace("`|", "`\\|")


def paragraphs(raw: str) -> str:
    """A comment as markdown paragraphs and lists."""
    out: list[str] = []
    for block in comment_blocks(raw):
        if block.startswith("- "):
            if out and out[-1].startswith("- "):
                out[-1] += "\n" + "- " + escape(block[2:])
                continue
            out.append("- " + escape(block[2:]))
        else:
            out.append(escape(block))
    return "\n\n".join(out)


# ---- the model of the page ----------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    number: int
    type_html: str
    label: str
    comment: str


@dataclass(frozen=True)
class Message:
    full_name: str
    display: str
    comment: str
    fields: tuple[Field, ...]


@dataclass(frozen=True)
class EnumValue:
    name: str
    number: int
    comment: str


@dataclass(frozen=True)
class Enum:
    full_name: str
    display: str
    comment: str
    values: tuple[EnumValue, ...]


@dataclass(frozen=True)
class Method:
    name: str
    request: str
    response: str
    client_streaming: bool
    server_streaming: bool
    comment: str


@dataclass(frozen=True)
class Service:
    full_name: str
    name: str
    comment: str
    methods: tuple[Method, ...]


@dataclass
class Page:
    files: list[str]
    overviews: list[tuple[str, str, str]]  # (file, package, comment)
    services: list[Service]
    messages: list[Message]
    enums: list[Enum]


def anchor(full_name: str) -> str:
    return full_name.lstrip(".")


def read_page(descriptors: descriptor_pb2.FileDescriptorSet) -> Page:
    page = Page([], [], [], [], [])
    files = sorted(descriptors.file, key=lambda f: f.name)
    documented = set()
    map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
    for file in files:
        prefix = f".{file.package}" if file.package else ""
        for full, message, _ in _walk_messages(file.message_type, prefix, ()):
            documented.add(full)
            if message.options.map_entry:
                map_entries[full] = message
        for full, _, _ in _walk_enums(file, prefix):
            documented.add(full)
    for file in files:
        comments = Comments(file)
        prefix = f".{file.package}" if file.package else ""
        page.files.append(f"protos/{file.name}")
        page.overviews.append((f"protos/{file.name}", file.package, comments.text((FILE_SYNTAX,))))
        for s_index, service in enumerate(file.service):
            methods = tuple(
                Method(
                    method.name,
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                    comments.text((FILE_SERVICE, s_index, SERVICE_METHOD, m_index)),
                )
                for m_index, method in enumerate(service.method)
            )
            full = f"{prefix}.{service.name}"
            page.services.append(Service(full, service.name, comments.text((FILE_SERVICE, s_index)), methods))
        for full, message, path in _walk_messages(file.message_type, prefix, (FILE_MESSAGE,)):
            if message.options.map_entry:
                continue
            fields = _fields(message, path, comments, documented, map_entries, file.syntax)
            page.messages.append(Message(full, _display(full, file.package), comments.text(path), fields))
        for full, enum, path in _walk_enums(file, prefix):
            values = tuple(
                EnumValue(value.name, value.number, comments.text((*path, ENUM_VALUE, v_index)))
                for v_index, value in enumerate(enum.value)
            )
            page.enums.append(Enum(full, _display(full, file.package), comments.text(path), values))
    return page


def _display(full_name: str, package: str) -> str:
    name = full_name.lstrip(".")
    return name[len(package) + 1 :] if package and name.startswith(package + ".") else name


def _walk_messages(
    messages: Sequence[descriptor_pb2.DescriptorProto], prefix: str, path: tuple[int, ...]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto, tuple[int, ...]]]:
    """Messages and their nested messages, depth first in declaration order, with their descriptor paths."""
    for index, message in enumerate(messages):
        full = f"{prefix}.{message.name}"
        here = (*path, index) if path else (index,)
        yield full, message, here
        yield from _walk_messages(message.nested_type, full, (*here, MESSAGE_NESTED))


def _walk_enums(
    file: descriptor_pb2.FileDescriptorProto, prefix: str
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto, tuple[int, ...]]]:
    for index, enum in enumerate(file.enum_type):
        yield f"{prefix}.{enum.name}", enum, (FILE_ENUM, index)
    for full, message, path in _walk_messages(file.message_type, prefix, (FILE_MESSAGE,)):
        for index, enum in enumerate(message.enum_type):
            yield f"{full}.{enum.name}", enum, (*path, MESSAGE_ENUM, index)


def _fields(
    message: descriptor_pb2.DescriptorProto,
    path: tuple[int, ...],
    comments: Comments,
    documented: set[str],
    map_entries: dict[str, descriptor_pb2.DescriptorProto],
    syntax: str,
) -> tuple[Field, ...]:
    out: list[Field] = []
    previous: tuple[str, tuple[int, int] | None] = ("", None)
    for index, field in enumerate(message.field):
        field_path = (*path, MESSAGE_FIELD, index)
        comment = comments.text(field_path)
        lines = comments.lines(field_path)
        if not comment and previous[0] and previous[1] and lines and lines[0] == previous[1][1] + 1:
            # A comment above a group of fields on consecutive lines ("Width and height in pixels.") covers each.
            comment = previous[0]
        previous = (comment, lines)
        entry = map_entries.get(field.type_name) if field.type == F.TYPE_MESSAGE else None
        if entry is not None:
            key, value = entry.field[0], entry.field[1]
            if key.type in SCALARS and value.type in SCALARS:
                type_html = f"`map<{SCALARS[key.type]}, {SCALARS[value.type]}>`"
            else:
                type_html = f"map&lt;{_type(key, documented)}, {_type(value, documented)}&gt;"
            label = ""
        else:
            type_html = _type(field, documented)
            label = _label(field, message, syntax)
        out.append(Field(field.name, field.number, type_html, label, comment))
    return tuple(out)


def _type(field: descriptor_pb2.FieldDescriptorProto, documented: set[str]) -> str:
    if field.type in SCALARS:
        return f"`{SCALARS[field.type]}`"
    name = field.type_name.lstrip(".")
    if field.type_name in documented:
        return f"[`{name.rsplit('.', 1)[-1]}`](#{anchor(field.type_name)})"
    if name in EXTERNAL:
        return f"[`{name}`]({EXTERNAL[name]})"
    return f"`{name}`"


def _label(field: descriptor_pb2.FieldDescriptorProto, message: descriptor_pb2.DescriptorProto, syntax: str) -> str:
    if field.label == F.LABEL_REPEATED:
        return "repeated"
    if field.proto3_optional:
        return "optional"
    if field.HasField("oneof_index"):
        return f"oneof `{message.oneof_decl[field.oneof_index].name}`"
    if field.label == F.LABEL_REQUIRED:
        return "required"
    if syntax == "proto2" or not syntax:
        return "optional"
    return ""


# ---- writing it ---------------------------------------------------------------------------------


def render(page: Page, doc_path: str = "docs/api-reference.md") -> str:
    sources = ", ".join(page.files)
    lines: list[str] = [
        f"<!-- Generated from {sources} by {SCRIPT}. Do not edit by hand: edit the .proto comments, then run "
        f"`python {SCRIPT}` (or `make docs`). -->",
        "",
        "# API reference",
        "",
        f"_Generated from {', '.join(f'`{f}`' for f in page.files)} by `{SCRIPT}`; do not edit by hand. "
        f"`python {SCRIPT} --check` (and `tests/unit/test_api_docs.py`) fail when this page and the .proto "
        "disagree._",
        "",
        "Every RPC, message, field and enum value below is documented by the comment above it in the .proto file. "
        "The error reasons (the `reason` of an `Error`, and the `cl-error-reason` trailer of a failed call) and the "
        "rules of the `Ingest` stream (ordering, idempotency, backpressure, the transport limit) are in "
        "[api.md](api.md); who may call which RPC (tokens and roles) is in [security.md](security.md). gRPC health "
        "checking (`grpc.health.v1.Health`) and server reflection are served beside the service.",
        "",
    ]
    for source, package, comment in page.overviews:
        lines += [f"## `{source}`", ""]
        if package:
            lines += [f"Package `{package}`.", ""]
        if comment:
            lines += [paragraphs(comment), ""]
    lines += ["Contents:", ""]
    for service in page.services:
        lines.append(f"- Service [`{service.name}`](#{anchor(service.full_name)})")
    lines.append(f"- [Messages](#messages): {len(page.messages)}")
    lines.append(f"- [Enums](#enums): {len(page.enums)}")
    lines.append("")
    for service in page.services:
        lines += _service(service)
    lines += ['<a id="messages"></a>', "", "## Messages", ""]
    for message in page.messages:
        lines += _message(message)
    lines += ['<a id="enums"></a>', "", "## Enums", ""]
    for enum in page.enums:
        lines += _enum(enum)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def _link(full_name: str) -> str:
    name = full_name.lstrip(".").rsplit(".", 1)[-1]
    return f"[`{name}`](#{anchor(full_name)})"


def _stream(streaming: bool, full_name: str) -> str:
    return ("stream of " if streaming else "") + _link(full_name)


def _service(service: Service) -> list[str]:
    lines = [f'<a id="{anchor(service.full_name)}"></a>', "", f"## Service `{service.name}`", ""]
    if service.comment:
        lines += [paragraphs(service.comment), ""]
    lines += ["| RPC | request | reply |", "| --- | --- | --- |"]
    for method in service.methods:
        lines.append(
            f"| [`{method.name}`](#{anchor(service.full_name)}.{method.name}) "
            f"| {_stream(method.client_streaming, method.request)} "
            f"| {_stream(method.server_streaming, method.response)} |"
        )
    lines.append("")
    for method in service.methods:
        request = ("stream " if method.client_streaming else "") + method.request.lstrip(".").rsplit(".", 1)[-1]
        response = ("stream " if method.server_streaming else "") + method.response.lstrip(".").rsplit(".", 1)[-1]
        kind = {
            (False, False): "unary",
            (True, False): "client streaming",
            (False, True): "server streaming",
            (True, True): "bidirectional streaming",
        }[(method.client_streaming, method.server_streaming)]
        lines += [
            f'<a id="{anchor(service.full_name)}.{method.name}"></a>',
            "",
            f"### {method.name}",
            "",
            f"`rpc {method.name}({request}) returns ({response})`: {kind}. Request "
            f"{_stream(method.client_streaming, method.request)}, reply "
            f"{_stream(method.server_streaming, method.response)}.",
            "",
        ]
        if method.comment:
            lines += [paragraphs(method.comment), ""]
    return lines


def _message(message: Message) -> list[str]:
    lines = [f'<a id="{anchor(message.full_name)}"></a>', "", f"### {message.display}", ""]
    if message.comment:
        lines += [paragraphs(message.comment), ""]
    if not message.fields:
        return [*lines, "No fields.", ""]
    lines += ["| field | type | label | number | description |", "| --- | --- | --- | --- | --- |"]
    for field in message.fields:
        lines.append(f"| `{field.name}` | {field.type_html} | {field.label} | {field.number} | {cell(field.comment)} |")
    return [*lines, ""]


def _enum(enum: Enum) -> list[str]:
    lines = [f'<a id="{anchor(enum.full_name)}"></a>', "", f"### {enum.display}", ""]
    if enum.comment:
        lines += [paragraphs(enum.comment), ""]
    lines += ["| name | number | description |", "| --- | --- | --- |"]
    for value in enum.values:
        lines.append(f"| `{value.name}` | {value.number} | {cell(value.comment)} |")
    return [*lines, ""]


def generate(files: Sequence[Path] | None = None) -> str:
    """The page for `files` (default: every .proto under protos/cl_service/)."""
    chosen = list(files) if files is not None else proto_files()
    if not chosen:
        raise SystemExit(f"{SCRIPT}: no .proto files under {_shown(PROTO_DIR)}")
    return render(read_page(compile_protos(chosen)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/api-reference.md from the .proto comments.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default docs/api-reference.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is out of date; write nothing")
    args = parser.parse_args(argv)
    text = generate()
    current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
    if args.check:
        if current != text:
            why = "does not exist" if current is None else "is out of date with the .proto files"
            print(f"{_shown(args.out)} {why}: run `python {SCRIPT}` (or `make docs`) and commit it", file=sys.stderr)
            return 1
        print(f"{_shown(args.out)} is up to date")
        return 0
    if current == text:
        print(f"{_shown(args.out)} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    print(f"wrote {_shown(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
