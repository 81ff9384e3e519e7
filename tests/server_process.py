"""`cl-service serve` as a child process, for the tests that kill it (crash recovery, faults)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

from cl_service.client import Client

CLI = [sys.executable, "-c", "import sys; from cl_service.cli import main; sys.exit(main())"]


class ServerProcess:
    """`cl-service serve` in a child process on a free loopback port (the OS picks it; the server prints it)."""

    def __init__(self, data_dir: Path, logs: Path, *, config: Path | None = None, env: Mapping[str, str] = {}) -> None:
        self._stdout = logs.with_suffix(".out")
        self._stderr = logs.with_suffix(".err")
        command = [*CLI, "serve", "--data-dir", str(data_dir), "--bind", "127.0.0.1:0", "--log-level", "WARNING"]
        if config is not None:
            command += ["--config", str(config)]
        with self._stdout.open("wb") as out, self._stderr.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **env})
        self.target = ""
        self.children: list[psutil.Process] = []  # seen just before it was killed (update workers)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        port = 0
        while not port:
            for line in self._stdout.read_text().splitlines():
                if line.startswith("cl-service listening on "):
                    port = int(line.rsplit(":", 1)[1])
            if not port:
                assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.output()}"
                assert time.monotonic() < deadline, f"the server did not start in {timeout_s} s:\n{self.output()}"
                time.sleep(0.05)
        self.target = f"127.0.0.1:{port}"
        with Client(self.target) as client:
            client.wait_ready(timeout_s=max(1.0, deadline - time.monotonic()))

    def output(self) -> str:
        return self._stdout.read_text() + self._stderr.read_text()

    def workers(self) -> list[psutil.Process]:
        """Its update workers (`cl-service run-update` children) running now."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return [p for p in psutil.Process(self.pid).children(recursive=True) if _is_worker(p)]
        return []

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process. Its children are left as they are."""
        if self.process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.children = psutil.Process(self.pid).children(recursive=True)
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        """SIGTERM: the graceful shutdown; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _is_worker(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "run-update" in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE
    return False
