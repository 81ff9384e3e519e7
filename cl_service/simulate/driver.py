"""`cl-service simulate`: cameras that stream synthetic surfaces or a folder of images to a server.

Each camera is a thread with its own `CameraClient` stream. A seeded fraction of the images carries
its true label (as a reject chute or test rig would); the rest go unlabeled. An optional rate limits
each camera to so many images per second.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cl_service.client import CameraClient, CameraImage, IngestResult, Tls
from cl_service.simulate.folder import FolderSource
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image


@dataclass(frozen=True)
class SimulationConfig:
    """What to stream, how much and how fast."""

    target: str
    cameras: int = 1
    count: int = 1000  # images per camera; for a folder, at most the folder's size
    rate: float = 0.0  # images per second per camera; 0: as fast as the server takes them
    labeled_fraction: float = 0.1
    seed: int = 0
    images: Path | None = None  # a folder with one sub-folder per class; None: synthetic surfaces
    surface: SurfaceConfig = field(default_factory=SurfaceConfig)
    image_format: str = "png"
    window: int = 64
    run_id: str = "run"  # request ids are f"{run_id}-{camera}-{index}": the same run_id resends the same images
    token: str | None = None  # API token (None: the CL_SERVICE_TOKEN variable, when set)
    tls: Tls | None = None  # None: plaintext

    def __post_init__(self) -> None:
        if self.cameras < 1:
            raise ValueError("cameras must be at least 1")
        if self.count < 0:
            raise ValueError("count must not be negative")
        if not 0.0 <= self.labeled_fraction <= 1.0:
            raise ValueError("labeled_fraction must be between 0 and 1")
        if self.rate < 0:
            raise ValueError("rate must not be negative")


@dataclass
class SimulationSummary:
    """Counts of what happened, for the terminal and for tests."""

    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return self.statuses["stored"] + self.statuses["already_stored"]


def camera_images(config: SimulationConfig, camera: int) -> Iterator[CameraImage]:
    """The images one camera sends, deterministic for (seed, camera)."""
    rng = np.random.default_rng([config.seed, camera, 1])
    if config.images is not None:
        yield from _folder_images(config, camera, rng)
        return
    surface = SurfaceConfig(**{**config.surface.__dict__, "seed": config.surface.seed + 7919 * camera})
    generator = SurfaceGenerator(surface)
    for index in range(config.count):
        sample = generator.sample(index)
        label = sample.label if rng.random() < config.labeled_fraction else ""
        yield CameraImage(
            image=encode_image(sample.pixels, config.image_format),
            label=label,
            request_id=f"{config.run_id}-{camera}-{index}",
            metadata={"source": "synthetic", "true_label": sample.label},
        )


def _folder_images(config: SimulationConfig, camera: int, rng: np.random.Generator) -> Iterator[CameraImage]:
    assert config.images is not None
    source = FolderSource(config.images, seed=config.seed)
    items = source.items()[camera :: config.cameras][: config.count]
    for index, item in enumerate(items):
        label = item.label if rng.random() < config.labeled_fraction else ""
        yield CameraImage(
            image=source.read(item),
            label=label,
            request_id=f"{config.run_id}-{camera}-{index}",
            metadata={"source": str(item.path.relative_to(config.images)), "true_label": item.label},
        )


def _paced(images: Iterator[CameraImage], rate: float) -> Iterator[CameraImage]:
    if rate <= 0:
        yield from images
        return
    start = time.monotonic()
    for index, image in enumerate(images):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield image


def run_simulation(
    config: SimulationConfig,
    on_result: Callable[[int, IngestResult], None] | None = None,
    stop: threading.Event | None = None,
) -> SimulationSummary:
    """Stream from every camera at once; call on_result(camera, result) for each reply."""
    summary = SimulationSummary()
    lock = threading.Lock()
    stop = stop or threading.Event()

    def run_camera(camera: int) -> None:
        client = CameraClient(
            config.target, f"sim-camera-{camera}", window=config.window, token=config.token, tls=config.tls
        )
        images = _paced(camera_images(config, camera), config.rate)
        try:
            for result in client.stream(_until(images, stop)):
                with lock:
                    summary.sent += 1
                    summary.statuses[result.status] += 1
                    if result.error_reason:
                        summary.errors[result.error_reason] += 1
                if on_result is not None:
                    on_result(camera, result)
        except Exception as exc:  # noqa: BLE001 - reported in the summary, the other cameras go on
            with lock:
                summary.failures.append(f"camera {camera}: {exc}")
        finally:
            with lock:
                summary.reconnects += client.reconnects

    started = time.monotonic()
    threads = [threading.Thread(target=run_camera, args=(camera,), daemon=True) for camera in range(config.cameras)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    summary.seconds = time.monotonic() - started
    return summary


def _until(images: Iterator[CameraImage], stop: threading.Event) -> Iterator[CameraImage]:
    for image in images:
        if stop.is_set():
            return
        yield image
