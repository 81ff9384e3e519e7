"""The test suite's PostgreSQL run (the second half of `make test`): a throwaway PostgreSQL server on loopback,
the integration tests and the store's tests against it (a fresh database per test), then the server removed.

PostgreSQL's server comes from Debian's packages: when it is missing and this runs as root with apt-get (CI, a
fresh machine), it is installed; elsewhere the run is skipped with a message, except under CI=true, where a
missing server fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.postgres import Cluster, server_bindir  # noqa: E402

SUITE = [
    "tests/integration",
    "tests/unit/test_store.py",
    "tests/unit/test_replay_index.py",
    "tests/unit/test_exemplars.py",
    "tests/unit/test_config_and_naming.py",
]


def install_server() -> None:
    print("PostgreSQL server not found: installing Debian's postgresql package", flush=True)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=environment)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=environment)


def main() -> int:
    bindir = server_bindir()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        install_server()
        bindir = server_bindir()
    if bindir is None:
        message = "no PostgreSQL server (initdb, pg_ctl) on this machine and it cannot be installed here"
        if os.environ.get("CI"):
            print(f"error: {message}", file=sys.stderr)
            return 1
        print(f"skipped the PostgreSQL run: {message} (install Debian's postgresql package to run it)")
        return 0
    cluster = Cluster(bindir).init()
    try:
        cluster.start()
        print(f"PostgreSQL run: {bindir.parent.name} on 127.0.0.1:{cluster.port}", flush=True)
        environment = {**os.environ, "CL_TEST_POSTGRES_URL": cluster.url()}
        arguments = sys.argv[1:]  # pytest arguments; test paths among them replace SUITE
        paths = [] if any(not a.startswith("-") for a in arguments) else SUITE
        # The story (the main job, 4 min of learning) runs once, on SQLite: its store operations have their own tests.
        selection = [] if "-m" in arguments else ["-m", "not story"]
        command = [sys.executable, "-m", "pytest", *paths, *selection, *arguments]
        return subprocess.run(command, env=environment, check=False).returncode
    finally:
        cluster.remove()


if __name__ == "__main__":
    sys.exit(main())
