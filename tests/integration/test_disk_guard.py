"""The disk-space guard: below `min_free_disk_bytes` new images are refused with DISK_LOW before anything is
written; the stream and the server go on, and the store stays whole."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.errors import ServiceError
from cl_service.ingest.service import DiskGuard
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image

pytestmark = pytest.mark.integration


def test_the_guard_counts_what_it_let_through_between_measurements(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    guard = DiskGuard(tmp_path / "blobs" / "not-made-yet", free - 10_000_000, every_s=3600)
    guard.reserve(6_000_000)
    with pytest.raises(ServiceError) as caught:
        guard.reserve(6_000_000)  # the first 6 MB count against the free space measured once
    assert caught.value.reason == "DISK_LOW" and "min_free_disk_bytes" in caught.value.message
    DiskGuard(tmp_path, 0).reserve(1 << 60)  # 0: no guard


def test_a_low_disk_refuses_images_and_keeps_the_store_whole(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", min_free_disk_bytes=1 << 60)
    generator = SurfaceGenerator(SurfaceConfig(width=64, height=64, seed=0))
    images = [CameraImage(encode_image(image.pixels)) for image in generator.stream(0, 5)]
    with server_in_thread(settings) as running:
        target = f"127.0.0.1:{running.port}"
        results = list(CameraClient(target, "cam-1").stream(images))
        assert [r.error_reason for r in results] == ["DISK_LOW"] * 5
        assert not any(r.durable for r in results)
        assert "MiB free" in results[0].error_message
        with Client(target) as client:
            assert client.status().samples_total == 0  # the server answers, nothing was written
        assert running.core.store.integrity_problems(verify_bytes=True) == []
