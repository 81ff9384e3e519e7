"""The Prometheus endpoint of a real server: counters and latency histograms move with the calls, gauges read
the store at scrape time."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage, Client
from cl_service.config import load_settings
from cl_service.metrics import pseudo_label_acceptance
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image

pytestmark = pytest.mark.integration


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_follow_the_traffic(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", bind="127.0.0.1:0", metrics_bind="127.0.0.1:0")
    generator = SurfaceGenerator(SurfaceConfig(width=64, height=64, seed=0))
    images = [encode_image(image.pixels) for image in generator.stream(0, 6)]
    with server_in_thread(settings) as running:
        assert running.metrics_port is not None
        target = f"127.0.0.1:{running.port}"
        before = _scrape(running.metrics_port)
        assert before[("cl_samples", ())] == 0
        results = list(CameraClient(target, "cam-1").stream([CameraImage(data, label="good") for data in images]))
        assert all(r.durable for r in results)
        list(CameraClient(target, "cam-1").stream([CameraImage(b"not an image")]))
        with Client(target) as client:
            client.status()
            with pytest.raises(grpc.RpcError):
                client.get_sample(987654)
        after = _scrape(running.metrics_port)
    assert after[("cl_samples", ())] == 6
    assert after[("cl_ingest_images_total", (("status", "stored"),))] == 6
    assert after[("cl_ingest_images_total", (("status", "rejected"),))] == 1
    assert after[("cl_ingest_bytes_total", ())] == sum(map(len, images)) + len(b"not an image")
    assert after[("cl_rpc_duration_seconds_count", (("code", "OK"), ("method", "GetStatus")))] == 1
    assert after[("cl_rpc_duration_seconds_count", (("code", "NOT_FOUND"), ("method", "GetSample")))] == 1
    assert after[("cl_rpc_duration_seconds_count", (("code", "OK"), ("method", "Ingest")))] == 2
    assert after[("cl_alerts_open", ())] == 0 and after[("cl_replay_buffer_exemplars", ())] == 0
    assert after[("cl_classify_queue_depth", ())] == 0 and after[("cl_blob_bytes", ())] > 0
    assert not any(name == "cl_live_model_info" for name, _ in after)  # no model yet


def test_the_pseudo_label_acceptance_ratio_counts_only_what_was_judged() -> None:
    counts = {
        "new_unlabeled": 100,
        "unlabeled_flagged_unknown": 10,  # not the teacher's to label
        "unlabeled_near_new_class": 30,  # next to a new class: 20 took it by propagation, 10 stayed unlabeled
        "pseudo_propagated": 20,
        "pseudo_accepted": 50,  # 30 kept by the teacher of the 60 it judged, and the 20 propagated
    }
    assert pseudo_label_acceptance(counts) == pytest.approx(50 / 80)
    assert pseudo_label_acceptance({**counts, "pseudo_propagated": 0, "pseudo_accepted": 30}) == pytest.approx(0.5)
    assert pseudo_label_acceptance({"new_unlabeled": 5, "unlabeled_flagged_unknown": 5}) is None
    assert pseudo_label_acceptance({}) is None  # a first model: nothing judged
