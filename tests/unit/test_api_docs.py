"""docs/api-reference.md is generated from the .proto comments (scripts/gen_api_docs.py) and cannot drift from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cl_service.v1 import inspection_pb2

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_api_docs.py"
COMMITTED = REPO / "docs" / "api-reference.md"


def _generate(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_reference_is_what_the_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "api-reference.md"
    result = _generate(out)
    assert result.returncode == 0, result.stderr
    assert COMMITTED.read_bytes() == out.read_bytes(), (
        "docs/api-reference.md is out of date with protos/: run `python scripts/gen_api_docs.py` (or `make docs`)"
    )
    again = tmp_path / "again.md"
    assert _generate(again).returncode == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "api-reference.md"
    stale.write_text(COMMITTED.read_text(encoding="utf-8").replace("Streams images from a camera.", "Old text."))
    result = _generate(stale, "--check")
    assert result.returncode == 1
    assert "out of date" in result.stderr
    assert stale.read_text(encoding="utf-8") != COMMITTED.read_text(encoding="utf-8")  # --check writes nothing
    assert _generate(tmp_path / "missing.md", "--check").returncode == 1
    assert _generate(COMMITTED, "--check").returncode == 0


def test_every_rpc_message_and_enum_is_documented() -> None:
    text = COMMITTED.read_text(encoding="utf-8")
    assert text.startswith("<!-- Generated from protos/cl_service/v1/inspection.proto by scripts/gen_api_docs.py.")
    assert "](api.md)" in text  # error reasons and ingest rules live there
    file = inspection_pb2.DESCRIPTOR  # the compiled stubs: a second reading of the same .proto
    for service in file.services_by_name.values():
        assert f"## Service `{service.name}`" in text
        for method in service.methods:
            assert f'<a id="{service.full_name}.{method.name}"></a>\n\n### {method.name}\n' in text, method.name
            assert f"`rpc {method.name}(" in text
    for name, message in file.message_types_by_name.items():
        assert f'<a id="{message.full_name}"></a>\n\n### {name}\n' in text, name
        for field in message.fields:
            assert f"| `{field.name}` |" in text, f"{name}.{field.name}"
    for name, enum in file.enum_types_by_name.items():
        assert f'<a id="{enum.full_name}"></a>\n\n### {name}\n' in text, name
        for value in enum.values:
            assert f"| `{value.name}` | {value.number} |" in text, value.name


def test_comments_and_types_reach_the_page() -> None:
    text = COMMITTED.read_text(encoding="utf-8")
    # An RPC's comment, its streaming kinds and linked types.
    assert "`rpc Ingest(stream IngestRequest) returns (stream IngestReply)`: bidirectional streaming." in text
    assert "Streams images from a camera. One reply per request" in text
    # A field row: linked message type, label, number, comment.
    assert "| `label_history` | [`Label`](#cl_service.v1.Label) | repeated | 13 | All labels, newest first. |" in text
    assert "| `created_at` | [`google.protobuf.Timestamp`](https://protobuf.dev/" in text
    assert "| `metadata` | `map<string, string>` |  | 6 |" in text
    # An enum value's comment.
    assert "| `LABEL_SOURCE_OPERATOR` | 1 | Set by an operator through SubmitCorrection. |" in text
    # Every link to a type on the page has its anchor.
    for anchor in {part.split(")")[0] for part in text.split("](#")[1:]}:
        assert f'<a id="{anchor}"></a>' in text, anchor
