"""The per-camera rate limit slows a fast camera down without refusing or losing an image, and leaves other
cameras alone. The checks are lower bounds on time (a throttle guarantees them), not performance targets."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage
from cl_service.config import load_settings
from cl_service.ingest.ratelimit import CameraRates
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image

pytestmark = pytest.mark.integration


def test_the_bucket_allows_a_burst_then_the_rate() -> None:
    async def run() -> list[float]:
        rates = CameraRates(per_s=100.0, burst=5)
        return [await rates.wait("cam") for _ in range(10)]

    waits = asyncio.run(run())
    assert waits[:5] == [0.0] * 5 and all(w > 0 for w in waits[5:])
    assert asyncio.run(CameraRates(per_s=0).wait("cam")) == 0.0  # 0: no limit


def test_a_fast_camera_is_slowed_and_loses_nothing(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", camera_max_images_per_s=20)
    generator = SurfaceGenerator(SurfaceConfig(width=48, height=48, seed=0))
    images = [CameraImage(encode_image(image.pixels)) for image in generator.stream(0, 70)]
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        other: list[float] = []

        def other_camera() -> None:
            started = time.monotonic()
            assert all(r.durable for r in CameraClient(target, "cam-2").stream(images[60:70]))
            other.append(time.monotonic() - started)

        thread = threading.Thread(target=other_camera)
        started = time.monotonic()
        thread.start()
        results = list(CameraClient(target, "cam-1").stream(images[:60]))
        elapsed = time.monotonic() - started
        thread.join(60)
    assert all(r.durable for r in results) and len(results) == 60  # slowed, never refused
    assert elapsed >= (60 - 40) / 20 * 0.9  # a burst of 2 s (40 images), then 20 per second
    assert other and other[0] < elapsed  # cam-2 (10 images, within its own burst) was not held up by cam-1
