"""Shared fixtures: synthetic images, settings on a temporary data dir, a real server on a free port."""

from __future__ import annotations

import io
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from PIL import Image

from cl_service.api.server import RunningServer, server_in_thread
from cl_service.config import Settings, load_settings
from cl_service.learning.settings import ModelConfig, UpdateSettings

if TYPE_CHECKING:
    from cl_service.client import Client
    from cl_service.learning.model import InspectionModel
    from cl_service.learning.repository import ModelRepository

# Servers in tests run no update scheduler unless a test asks for one (scheduler=True): a nightly catch-up or an
# automatic trigger would otherwise start real training beside the test. Child processes inherit this.
os.environ["CL_SERVICE_SCHEDULER"] = "false"
os.environ["CL_SERVICE_INSPECT"] = "false"  # likewise the inspector (scoring stored images with the live model)

# Set by scripts/test_postgres.py (part of `make test`): the URL of a PostgreSQL server's maintenance database. The
# suite then runs with a fresh database per test instead of SQLite files.
POSTGRES_SERVER = os.environ.get("CL_TEST_POSTGRES_URL", "")

# An update that trains in a second or two: a tiny random-init backbone, one pass, any candidate accepted.
TINY_UPDATE = UpdateSettings(
    model=ModelConfig(image_size=32, backbone="resnet10t", pretrained="none"),
    epochs=1,
    min_steps=1,
    batch_size=16,
    replay_budget=8,
    cold_start_min_per_class=3,
    cold_start_min_accuracy=0.0,
    gate_tolerance=1.0,
    threads=1,
)
sqlite_only = pytest.mark.skipif(bool(POSTGRES_SERVER), reason="checks SQLite specifics (the PostgreSQL run skips it)")
_databases = itertools.count()

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
XSDD_CLASSES = (  # the class names of ../shared/datasets/xsdd under the naming rule
    "finishing_roll_printing",
    "iron_sheet_ash",
    "oxide_scale_of_plate_system",
    "oxide_scale_of_temperature_system",
    "red_iron",
    "slag_inclusion",
    "surface_scratch",
)


def png_bytes(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    """A small distinct greyscale image, encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    """Poll until `condition()` is true; fail saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(poll_s)


def wait_for_live(client: Client, version: str, timeout_s: float = 60.0) -> None:
    """Wait until the server serves `version`."""
    wait_until(lambda: client.status().live_model_version == version, timeout_s, f"{version} going live")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until a server subprocess answers health checks on the loopback port (fail if it exits first)."""
    from cl_service.client import Client

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited with code {process.returncode} before it was ready"
        try:
            with Client(f"127.0.0.1:{port}") as client:
                client.wait_ready(timeout_s=1.0)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"no server became ready on port {port} within {timeout_s:.0f} s")


def add_model_version(
    repository: ModelRepository,
    version: str,
    model: InspectionModel,
    *,
    accepted: bool = True,
    make_live: bool = False,
    metrics: dict[str, Any] | None = None,
    parent: str | None = None,
) -> None:
    """A version's folder and row as an update leaves them, without the training."""
    from cl_service.learning.model import save_checkpoint
    from cl_service.learning.repository import CHECKPOINT

    folder = repository.folder(version)
    folder.mkdir(parents=True)
    save_checkpoint(folder / CHECKPOINT, model, version=version, parent_version=parent)
    reason = "test" if accepted else "deliberately rejected in a test"
    repository.record(
        version,
        parent=parent,
        accepted=accepted,
        model=model,
        metrics=metrics or {},
        reason=reason,
        make_live=make_live,
    )


def store_url(folder: Path) -> str:
    """The database URL of a test's store: a SQLite file in `folder`, or the test's PostgreSQL database."""
    return os.environ.get("CL_SERVICE_DATABASE_URL") or f"sqlite:///{folder / 'store.sqlite'}"


@pytest.fixture(autouse=True)
def _postgres_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On the PostgreSQL run, a fresh database for each test, named in CL_SERVICE_DATABASE_URL: load_settings
    reads it, and server processes started by the test inherit it."""
    if not POSTGRES_SERVER:
        yield
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"test_{os.getpid()}_{next(_databases)}"
    admin = create_engine(POSTGRES_SERVER, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        url = make_url(POSTGRES_SERVER).set(database=name).render_as_string(hide_password=False)
        monkeypatch.setenv("CL_SERVICE_DATABASE_URL", url)
        yield
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", shutdown_grace_s=2.0)


@dataclass
class ServerHandle:
    """A real gRPC server running on its own event loop thread."""

    running: RunningServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


@pytest.fixture
def server(settings: Settings) -> Iterator[ServerHandle]:
    with server_in_thread(settings) as running:
        yield ServerHandle(running)


@pytest.fixture
def datasets() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"the real defect images are not at {DATASETS} (see ../shared/datasets/README.md)")
    return DATASETS
