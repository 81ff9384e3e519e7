"""docs/api.md's table of error reasons lists every reason the server can send, with its status code, and no other.

The reasons are read from the source: the reason argument of each `ServiceError(code, reason, ...)` and
`invalid(reason, ...)` call, as a literal, either branch of a conditional, or a local variable bound to literals
(by an assignment or a `for` over tuples). A reason built at run time must be listed in BUILT. A reason inside a
function that nothing names (a helper never called) is not sent.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "api.md"
SOURCES = sorted(
    path
    for package in ("cl_service", "replay_store")
    for path in (REPO / package).rglob("*.py")
    if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
)
REASON = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
FACTORIES = {"ServiceError": 1, "invalid": 0}  # function -> position of its reason argument
# Reasons built at run time: the expression's source -> every reason it can give.
BUILT = {"f'{name.upper()}_TOO_LONG'": {"REQUESTED_BY_TOO_LONG", "REASON_TOO_LONG"}}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _reason_values(expr: ast.expr, function: Function | None) -> set[str]:
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, ast.IfExp):
        return _reason_values(expr.body, function) | _reason_values(expr.orelse, function)
    if isinstance(expr, ast.Name) and function is not None:
        arguments = function.args
        if expr.id in {a.arg for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}:
            return set()  # a helper's parameter: its callers' arguments are read where they call it
        values: set[str] = set()
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and expr.id in _names(*node.targets):
                values |= _reason_values(node.value, function)
            elif isinstance(node, ast.For) and expr.id in _names(node.target):
                values |= {value for value in _strings(node.iter) if REASON.fullmatch(value)}
        if values:
            return values
    source = ast.unparse(expr)
    assert source in BUILT, f"cannot read the reason {source}: list the reasons it can give in BUILT"
    return BUILT[source]


def _names(*targets: ast.AST) -> set[str]:
    return {node.id for target in targets for node in ast.walk(target) if isinstance(node, ast.Name)}


def _strings(tree: ast.AST) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    if len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg == keyword), None)


def _sent_reasons() -> dict[str, set[str]]:
    """Every reason the code can send -> its status codes."""
    words = Counter(re.findall(r"\w+", "\n".join(path.read_text(encoding="utf-8") for path in SOURCES)))
    sent: dict[str, set[str]] = {}

    def visit(node: ast.AST, function: Function | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if words[node.name] < 2:
                return  # never called nor named anywhere but its definition
            function = node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FACTORIES:
            reason = _argument(node, FACTORIES[node.func.id], "reason")
            assert reason is not None, ast.unparse(node)
            code = "INVALID_ARGUMENT" if node.func.id == "invalid" else getattr(_argument(node, 0, "code"), "attr", "?")
            for value in _reason_values(reason, function):
                assert REASON.fullmatch(value), f"{value!r} is not an UPPER_SNAKE_CASE reason"
                sent.setdefault(value, set()).add(code)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    for path in SOURCES:
        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), None)
    return sent


def _documented_reasons() -> dict[str, str]:
    """Every reason in the tables of docs/api.md's Errors section -> the code of its row."""
    section = DOC.read_text(encoding="utf-8").split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            reasons, code = line.split(" | ")[:2]
            for reason in re.findall(r"`([^`]+)`", reasons):
                assert reason not in documented, f"{reason} has two rows"
                documented[reason] = code.strip()
    return documented


def test_every_sent_reason_is_documented_with_its_code() -> None:
    sent, documented = _sent_reasons(), _documented_reasons()
    assert len(sent) >= 30, sorted(sent)  # the scan works: it cannot pass by finding nothing
    assert {"SAMPLE_NOT_FOUND", "IMAGE_TRUNCATED", "CAMERA_ID_INVALID", "REQUESTED_BY_TOO_LONG"} <= set(sent)
    missing = sorted(set(sent) - set(documented))
    assert not missing, f"reasons sent by the code but not in docs/api.md: {missing}"
    wrong = {
        reason: (documented[reason], sorted(codes)) for reason, codes in sent.items() if codes != {documented[reason]}
    }
    assert not wrong, f"reasons whose code in docs/api.md is not the one sent (doc, code): {wrong}"


def test_every_documented_reason_is_still_sent() -> None:
    stale = sorted(set(_documented_reasons()) - set(_sent_reasons()))
    assert not stale, f"reasons in docs/api.md that no code sends any more: {stale}"
