"""Soak: 4 camera streams and an operator client against a real server for 10 minutes on loopback.

The server runs as its own process (`cl-service serve`, embedded defaults: SQLite and blob files in a temporary
folder). Each camera streams fresh synthetic 96x96 PNG images at a steady 20 images/s (80/s in all, about a
tenth of what the server ingests on 2 cores: a soak is about staying healthy, not about the ceiling), at most
SOAK_MAX_IMAGES per camera. The operator client loops over GetStatus, ListReviewQueue, GetSample and ListModels.
Measured: requests and errors (a camera image that is not durably stored is an error, as is any failed operator
call), reply latency (camera: from handing the image to the stream to its durable reply; operator: per call),
and the server's resident memory, sampled every 5 s: `rss_growth_ratio` is the largest sample after warm-up (the
first 10%) divided by the sample at the end of warm-up.

No model is live (no training runs during the soak), so Ingest replies carry no prediction.
Run: `python bench/soak.py` (no arguments; 10 minutes). SOAK_SECONDS shortens it (e.g. 60 for a smoke run).
Prints a markdown table and writes bench/results/soak.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Figure, cl_service_command, free_port, machine, markdown_table, stop, wait_for_port, write_results

from cl_service.client import CameraClient, CameraImage, Client
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from cl_service.v1 import inspection_pb2 as pb

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
CAMERAS = 4
RATE_PER_CAMERA = 20.0
MAX_IMAGES = int(os.environ.get("SOAK_MAX_IMAGES", "20000"))
SIDE = 96
WARMUP_FRACTION = 0.1
RSS_EVERY_S = 5.0


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Camera(threading.Thread):
    def __init__(self, target: str, index: int, deadline: float) -> None:
        super().__init__(name=f"camera-{index}", daemon=True)
        self.target, self.index, self.deadline = target, index, deadline
        self.sent: dict[str, float] = {}
        self.latencies_ms: list[float] = []
        self.requests = 0
        self.errors: list[str] = []

    def images(self) -> Iterator[CameraImage]:
        generator = SurfaceGenerator(SurfaceConfig(width=SIDE, height=SIDE, seed=100 + self.index))
        started = time.monotonic()
        for n, image in enumerate(generator.stream(0, MAX_IMAGES)):
            due = started + n / RATE_PER_CAMERA
            now = time.monotonic()
            if now >= self.deadline:
                return
            if due > now:
                time.sleep(due - now)
            request_id = uuid.uuid4().hex
            self.sent[request_id] = time.monotonic()
            yield CameraImage(encode_image(image.pixels), request_id=request_id)

    def run(self) -> None:
        try:
            for result in CameraClient(self.target, f"soak-cam-{self.index}").stream(self.images()):
                self.requests += 1
                sent = self.sent.pop(result.request_id, None)
                if sent is not None:
                    self.latencies_ms.append(1000 * (time.monotonic() - sent))
                if not result.durable:
                    self.errors.append(f"{result.error_reason}: {result.error_message}")
        except Exception as exc:  # a broken stream is an error of the soak, reported
            self.errors.append(f"stream failed: {exc}")


class Operator(threading.Thread):
    def __init__(self, target: str, deadline: float) -> None:
        super().__init__(name="operator", daemon=True)
        self.target, self.deadline = target, deadline
        self.latencies_ms: list[float] = []
        self.requests = 0
        self.errors: list[str] = []

    def run(self) -> None:
        rng = np.random.default_rng(0)
        stored = [1]

        def status(client: Client) -> None:
            stored[0] = max(1, int(client.status().samples_total))

        with Client(self.target, timeout_s=30) as client:
            while time.monotonic() < self.deadline:
                for name, call in (
                    ("GetStatus", lambda: status(client)),
                    ("ListReviewQueue", lambda: client.stub.ListReviewQueue(pb.ListReviewQueueRequest(page_size=20))),
                    ("GetSample", lambda: client.get_sample(int(rng.integers(1, stored[0] + 1)))),
                    ("ListModels", client.list_models),
                ):
                    started = time.monotonic()
                    try:
                        call()
                    except Exception as exc:  # counted and reported
                        if "SAMPLE_NOT_FOUND" not in str(exc):  # an id drawn beyond what is stored yet
                            self.errors.append(f"{name}: {exc}")
                    self.latencies_ms.append(1000 * (time.monotonic() - started))
                    self.requests += 1
                time.sleep(0.05)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cl-soak-") as folder:
        port = free_port()
        env = dict(os.environ, CL_SERVICE_SCHEDULER="false", CL_SERVICE_LOG_LEVEL="WARNING")
        command = cl_service_command("serve", "--data-dir", str(Path(folder) / "data"), "--bind", f"127.0.0.1:{port}")
        server = subprocess.Popen(command, env=env)
        try:
            wait_for_port(port, server)
            target = f"127.0.0.1:{port}"
            started = time.monotonic()
            deadline = started + SECONDS
            cameras = [Camera(target, i, deadline) for i in range(CAMERAS)]
            operator = Operator(target, deadline)
            for worker in [*cameras, operator]:
                worker.start()
            samples: list[tuple[float, int]] = []
            while any(worker.is_alive() for worker in [*cameras, operator]):
                samples.append((time.monotonic() - started, rss_bytes(server.pid)))
                time.sleep(RSS_EVERY_S)
            wall = time.monotonic() - started
            samples.append((wall, rss_bytes(server.pid)))
        finally:
            stop(server)
    warm = [rss for at, rss in samples if at >= WARMUP_FRACTION * SECONDS]
    baseline = warm[0] if warm else samples[-1][1]
    camera_ms = np.array([ms for camera in cameras for ms in camera.latencies_ms])
    operator_ms = np.array(operator.latencies_ms)
    errors = [e for worker in [*cameras, operator] for e in worker.errors]
    requests = sum(camera.requests for camera in cameras) + operator.requests
    figures: dict[str, Figure] = {
        "seconds": round(wall, 1),
        "cameras": CAMERAS,
        "camera_rate_per_s": RATE_PER_CAMERA,
        "requests": requests,
        "images": sum(camera.requests for camera in cameras),
        "operator_requests": operator.requests,
        "errors": len(errors),
        "p50_ms": float(np.percentile(camera_ms, 50)) if camera_ms.size else 0.0,
        "p99_ms": float(np.percentile(camera_ms, 99)) if camera_ms.size else 0.0,
        "operator_p50_ms": float(np.percentile(operator_ms, 50)) if operator_ms.size else 0.0,
        "operator_p99_ms": float(np.percentile(operator_ms, 99)) if operator_ms.size else 0.0,
        "rss_after_warmup_mb": baseline / 2**20,
        "rss_max_mb": max(rss for _, rss in samples) / 2**20,
        "rss_final_mb": samples[-1][1] / 2**20,
        "rss_growth_ratio": max(warm) / baseline if warm else 1.0,
        **machine(),
    }
    for error in errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    print(
        markdown_table(
            ["what", "requests", "errors", "p50 ms", "p99 ms"],
            [
                [
                    "camera images (4 streams)",
                    figures["images"],
                    len(errors) - len(operator.errors),
                    figures["p50_ms"],
                    figures["p99_ms"],
                ],
                [
                    "operator calls",
                    operator.requests,
                    len(operator.errors),
                    figures["operator_p50_ms"],
                    figures["operator_p99_ms"],
                ],
            ],
        )
    )
    print(
        f"\nserver RSS {figures['rss_after_warmup_mb']:.0f} MB after warm-up, max {figures['rss_max_mb']:.0f} MB "
        f"(growth ratio {figures['rss_growth_ratio']:.3f}; goal <= 1.10) over {wall:.0f} s"
    )
    write_results("soak", figures)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
