"""What every benchmark shares: free ports, server subprocesses, result files and markdown tables."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_ROOT = BENCH_DIR.parent

Figure = float | int | str | bool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until something listens on the loopback port, or fail if the process died first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s:.0f} s")


def cl_service_command(*args: str) -> list[str]:
    """The `cl-service` CLI run by this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-c", "import sys; from cl_service.cli import main; sys.exit(main())", *args]


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def machine() -> dict[str, Figure]:
    return {
        "machine_cpus": os.cpu_count() or 0,
        "machine_platform": platform.platform(),
        "machine_python": platform.python_version(),
    }


def write_results(name: str, figures: Mapping[str, Figure]) -> Path:
    """Write bench/results/NAME.json: one flat object of named figures."""
    for key, value in figures.items():
        if not isinstance(value, (int, float, str, bool)):
            raise TypeError(f"figure {key!r} is a {type(value).__name__}; results are flat")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(figures), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)
