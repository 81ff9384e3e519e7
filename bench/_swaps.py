"""Classify latency while model versions are hot-swapped, against the same load without swaps.

The real server runs in its own process on a free loopback port with the service's default model (ImageNet
EfficientNet-Lite0 at 96x96 with a 3-class head) on its default engine. Two versions of it are in the store, their
ONNX engines built and checked beforehand, as the update that accepts a version does in its own process; v0001
is live. `CALLERS` client threads call `Classify` back to back, each with its own synthetic camera image: first
`STEADY_S` seconds without swaps (the first `WARMUP_S` are not counted), then `SWAPS` activations through the
`ActivateModel` RPC alternating v0002 / v0001 (each one: load the engine, warm up, parity on the version's kept
golden batch, swap, drain), `PAUSE_S` apart. A request counts as "during a swap" when it overlaps an
activation call. Every reply must name a version; every failed request is counted.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from _common import Figure, cl_service_command, free_port, markdown_table, stop, wait_for_port

from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.repository import CHECKPOINT, ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.publish import prebuild
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from replay_store.store import Store

CLASSES = ("good", "scratch", "pit")
CALLERS = 4
STORED_IMAGES = 64
WARMUP_S = 5.0
STEADY_S = 25.0
SWAPS = 4  # three promotions and a rollback, as in the swap-under-load test
PAUSE_S = 3.0


@dataclass(frozen=True)
class _Call:
    started: float
    finished: float
    ok: bool


def measure_swaps(workdir: Path) -> tuple[dict[str, Figure], str]:
    """Figures `steady_p99_ms`, `swap_p99_ms`, `swap_p99_vs_steady_p99`, `swap_failed_requests`, ... and a
    markdown section."""
    data_dir = workdir / "swap-data"
    port = free_port()
    environment = {**os.environ, "CL_SERVICE_MODEL_POLL_S": "0.5", "CL_SERVICE_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        cl_service_command("serve", "--data-dir", str(data_dir), "--bind", f"127.0.0.1:{port}"), env=environment
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_for_port(port, server)
        images = _store_images_and_versions(target, data_dir)
        with Client(target, timeout_s=600) as admin:
            deadline = time.monotonic() + 600
            while admin.status().live_model_version != "v0001":
                if time.monotonic() > deadline:
                    raise TimeoutError("v0001 did not go live within 10 minutes")
                time.sleep(0.2)
            calls, swaps, engine = _drive(target, admin, images)
    finally:
        stop(server)
    return _summarise(calls, swaps, engine)


def _store_images_and_versions(target: str, data_dir: Path) -> list[bytes]:
    generator = SurfaceGenerator(SurfaceConfig(width=128, height=128, classes=CLASSES, seed=11))
    samples = list(generator.stream(0, STORED_IMAGES + CALLERS))
    stored = [CameraImage(encode_image(s.pixels), label=s.label) for s in samples[:STORED_IMAGES]]
    if not all(result.durable for result in CameraClient(target, "bench-swaps").stream(stored)):
        raise RuntimeError("the server did not store the benchmark's images")
    settings = load_settings(data_dir=data_dir)
    store = Store.open(settings.resolved_database_url, settings.blob_dir)
    try:
        repository = ModelRepository(data_dir / "models", store)
        for number, seed in ((1, 1), (2, 2)):
            version = f"v{number:04d}"
            torch.manual_seed(seed)
            model = InspectionModel(ModelConfig(), list(CLASSES))
            repository.folder(version).mkdir(parents=True)
            save_checkpoint(repository.folder(version) / CHECKPOINT, model, version=version, parent_version=None)
            prebuild(store, repository, version, "onnxruntime")  # what the update that made it does
            repository.record(
                version, parent=None, accepted=True, model=model, metrics={}, reason="bench", make_live=number == 1
            )
    finally:
        store.close()
    return [encode_image(s.pixels) for s in samples[STORED_IMAGES:]]


def _drive(target: str, admin: Client, images: list[bytes]) -> tuple[list[_Call], list[tuple[float, float]], str]:
    calls: list[_Call] = []
    stopping = threading.Event()

    def caller(image: bytes) -> None:
        with Client(target, timeout_s=60) as client:
            while not stopping.is_set():
                started = time.monotonic()
                try:
                    ok = bool(client.classify(image).model_version)
                except grpc.RpcError:
                    ok = False
                calls.append(_Call(started, time.monotonic(), ok))

    threads = [threading.Thread(target=caller, args=(image,)) for image in images]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(STEADY_S)
    swaps: list[tuple[float, float]] = []
    for n in range(SWAPS):
        asked = time.monotonic()
        admin.activate_model("v0002" if n % 2 == 0 else "v0001", requested_by="bench", reason="swap latency")
        swaps.append((asked, time.monotonic()))
        time.sleep(PAUSE_S)
    stopping.set()
    for thread in threads:
        thread.join()
    engine = admin.status().live_engine
    return [c for c in calls if c.started >= began + WARMUP_S], swaps, engine


def _summarise(calls: list[_Call], swaps: list[tuple[float, float]], engine: str) -> tuple[dict[str, Figure], str]:
    first_swap = swaps[0][0]
    steady = [c for c in calls if c.finished < first_swap]
    during = [c for c in calls if any(c.started <= end and c.finished >= start for start, end in swaps)]

    def ms(group: list[_Call], q: float) -> float:
        return round(float(np.percentile([(c.finished - c.started) * 1000 for c in group], q)), 2)

    seconds = [end - start for start, end in swaps]
    figures: dict[str, Figure] = {
        "swap_callers": CALLERS,
        "swap_engine": engine,
        "swaps": len(swaps),
        "swap_seconds_mean": round(float(np.mean(seconds)), 2),
        "swap_seconds_max": round(float(max(seconds)), 2),
        "steady_requests": len(steady),
        "swap_requests": len(during),
        "steady_p50_ms": ms(steady, 50),
        "steady_p99_ms": ms(steady, 99),
        "swap_p50_ms": ms(during, 50),
        "swap_p99_ms": ms(during, 99),
        "swap_failed_requests": sum(not c.ok for c in calls),
    }
    figures["swap_p99_vs_steady_p99"] = round(float(figures["swap_p99_ms"]) / float(figures["steady_p99_ms"]), 2)
    figures["goal_swap_p99_1_5x"] = figures["swap_p99_vs_steady_p99"] <= 1.5 and figures["swap_failed_requests"] == 0
    table = markdown_table(
        ["Classify, 4 callers", "requests", "p50 ms", "p99 ms", "failed"],
        [
            ["steady", len(steady), figures["steady_p50_ms"], figures["steady_p99_ms"], sum(not c.ok for c in steady)],
            [
                f"during {len(swaps)} swaps ({figures['swap_seconds_mean']} s each)",
                len(during),
                figures["swap_p50_ms"],
                figures["swap_p99_ms"],
                figures["swap_failed_requests"],
            ],
        ],
    )
    return figures, f"Hot swap under load ({engine}):\n\n{table}"


if __name__ == "__main__":  # the swap part alone
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-swaps-") as tmp:
        found, text = measure_swaps(Path(tmp))
    print(text)
    print(found)
    sys.exit(0)
