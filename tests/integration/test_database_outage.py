"""The store's database goes away under traffic: a real PostgreSQL server of the test's own, stopped (as in a crash)
and started again while a camera streams and an operator polls. Meanwhile every call is answered UNAVAILABLE with
the reason STORE_UNAVAILABLE and a message that says the database cannot be reached, health says NOT_SERVING, and the
server recovers by itself once the database is back: nothing acknowledged is lost and nothing was half-stored.
And at start: health says NOT_SERVING (calls: UNAVAILABLE STORE_NOT_OPEN) until the store opens.

Runs wherever PostgreSQL's server binaries are installed (`make test` installs them as root on Debian)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client, channel
from cl_service.config import load_settings
from cl_service.v1 import inspection_pb2 as pb
from cl_service.v1 import inspection_pb2_grpc as pb_grpc
from tests.conftest import free_port, png_bytes, wait_until
from tests.postgres import Cluster, server_bindir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI = [sys.executable, "-c", "import sys; from cl_service.cli import main; sys.exit(main())"]
NOT_REACHED = "the store's database cannot be reached"


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    bindir = server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) here; `make test` installs them as root on Debian")
    cluster = Cluster(bindir).init()
    try:
        yield cluster
    finally:
        cluster.remove()


def _health(target: str) -> str:
    with channel(target) as chan:
        try:
            answer = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


@dataclass
class Traffic:
    """A camera sending one fresh image at a time and an operator asking GetStatus, until stopped."""

    target: str
    images: dict[str, bytes] = field(default_factory=dict)  # request id -> bytes
    acked: dict[str, int] = field(default_factory=dict)  # request id -> sample id, for each STORED reply
    refused: dict[str, str] = field(default_factory=dict)  # request id -> "REASON: message"
    status_answers: list[str] = field(default_factory=list)  # "OK" or "CODE: details", in order
    stop: threading.Event = field(default_factory=threading.Event)

    def camera(self) -> None:
        camera = CameraClient(self.target, "cam-1", window=1)
        for n in itertools.count():
            if self.stop.is_set():
                return
            request_id = f"r{n}"
            self.images[request_id] = png_bytes(10_000 + n)
            for result in camera.stream([CameraImage(self.images[request_id], request_id=request_id)]):
                if result.status == "stored":
                    self.acked[request_id] = result.sample_id
                else:
                    self.refused[request_id] = f"{result.error_reason}: {result.error_message}"
            time.sleep(0.02)

    def operator(self) -> None:
        with Client(self.target) as client:
            while not self.stop.is_set():
                try:
                    client.status()
                    self.status_answers.append("OK")
                except grpc.RpcError as exc:
                    self.status_answers.append(f"{exc.code().name}: {exc.details()}")
                time.sleep(0.05)


def test_postgresql_stopped_and_restarted_under_traffic(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start()
    settings = load_settings(
        data_dir=tmp_path / "data", database_url=cluster.url(), bind="127.0.0.1:0", store_check_s=0.3
    )
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        traffic = Traffic(target)
        threads = [threading.Thread(target=traffic.camera), threading.Thread(target=traffic.operator)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: len(traffic.acked) >= 20, 60, "20 images stored")
            outage_from = len(traffic.images)
            cluster.stop("immediate")  # as in a crash of the database server
            wait_until(lambda: _health(target) == "NOT_SERVING", 10, "health NOT_SERVING")
            wait_until(lambda: len(traffic.refused) >= 3, 30, "images refused while the database is down")
            wait_until(lambda: traffic.status_answers[-1] != "OK", 10, "GetStatus refused")
            cluster.start()
            wait_until(lambda: _health(target) == "SERVING", 30, "health SERVING again")
            outage_to = len(traffic.images)
            back = len(traffic.acked)
            wait_until(lambda: len(traffic.acked) >= back + 20, 60, "20 more images stored after the restart")
            wait_until(lambda: traffic.status_answers[-1] == "OK", 10, "GetStatus answered again")
        finally:
            traffic.stop.set()
            for thread in threads:
                thread.join(60)

        assert set(traffic.images) == set(traffic.acked) | set(traffic.refused)  # each image had its answer
        # Every refusal said what happened, and in a way a client can branch on.
        assert traffic.refused, "nothing was refused while the database was down"
        for request_id, why in traffic.refused.items():
            assert why.startswith(f"STORE_UNAVAILABLE: {NOT_REACHED}"), (request_id, why)
        failures = [answer for answer in traffic.status_answers if answer != "OK"]
        assert failures and all(a.startswith(f"UNAVAILABLE: STORE_UNAVAILABLE: {NOT_REACHED}") for a in failures)
        outage = range(outage_from - 1, outage_to + 2)  # health follows within store_check_s
        assert all(int(request_id[1:]) in outage for request_id in traffic.refused), (outage, sorted(traffic.refused))

        # Nothing acknowledged is lost; every refused image can be sent again and is stored once.
        with Client(target) as client:
            for request_id, sample_id in traffic.acked.items():
                sample = client.get_sample(sample_id, include_image=True)
                assert (sample.request_id, sample.image) == (request_id, traffic.images[request_id])
            retry = [CameraImage(traffic.images[r], request_id=r) for r in traffic.refused]
            results = list(CameraClient(target, "cam-1").stream(retry))
            assert all(result.durable for result in results), [r.error_message for r in results if not r.durable]
            stored = {r.request_id: r.sample_id for r in results}
            assert not set(stored.values()) & set(traffic.acked.values())
            assert client.status().samples_total == len(traffic.acked) + len(stored)
        assert running.core.store.integrity_problems(verify_bytes=True) == []


def test_health_says_not_serving_until_the_store_opens(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    environment = {**os.environ, "CL_SERVICE_DATABASE_URL": cluster.url(), "CL_SERVICE_STORE_OPEN_TIMEOUT_S": "120"}
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [*CLI, "serve", "--data-dir", str(tmp_path / "data"), "--bind", target, "--log-level", "WARNING"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment,
    )
    try:
        wait_until(lambda: _health(target) == "NOT_SERVING", 60, "the port answering health NOT_SERVING")
        with channel(target) as chan, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.InspectionServiceStub(chan).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details().startswith("STORE_NOT_OPEN: the service is starting")
        time.sleep(1.5)  # a few failed attempts to open the store
        assert server.poll() is None and _health(target) == "NOT_SERVING"
        cluster.start()
        wait_until(lambda: _health(target) == "SERVING", 30, "health SERVING once the database is up")
        results = list(CameraClient(target, "cam-1").stream([CameraImage(png_bytes(1))]))
        assert results[0].status == "stored"
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert f"{NOT_REACHED} (connection failed" in output and "trying again in" in output, output[-2000:]
