"""The inspector on a real store: it scores stored images with the live version and its anomaly model, keeps each
one's prediction, writes heatmaps and raises alerts for the unusual ones (grouped into one incident), and resumes
where it stopped. The anomaly model here is small (32x32, a short training) so that the test takes seconds."""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cl_service.alerts import AlertBook
from cl_service.anomaly.config import AnomalyConfig
from cl_service.anomaly.model import AnomalyModel
from cl_service.inspector import ANOMALY_DIR, Inspector, balanced_sample
from cl_service.learning.model import InspectionModel
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.simulate.surface import SurfaceConfig, SurfaceGenerator, encode_image
from replay_store.models import LabelSource
from replay_store.operator import prediction_of
from replay_store.store import NewSample, SnapshotRow, Store
from tests.conftest import add_model_version, store_url

pytestmark = pytest.mark.integration


def _images(classes: tuple[str, ...], count: int, seed: int) -> list[bytes]:
    generator = SurfaceGenerator(SurfaceConfig(width=64, height=64, classes=classes, seed=seed, noise=0.02))
    return [encode_image(image.pixels) for image in generator.stream(0, count)]


def _burn(data: bytes, seed: int) -> bytes:
    """The image with a large bright blotch: an obvious defect of a kind no model has seen."""
    pixels = np.array(Image.open(io.BytesIO(data)).convert("L"))
    y, x = np.random.default_rng(seed).integers(8, 36, 2)
    pixels[y : y + 20, x : x + 20] = 250
    return encode_image(pixels)


def _store(store: Store, images: list[bytes], prefix: str, label: str | None = None) -> list[int]:
    batch = [
        NewSample("cam-1", f"{prefix}{i}", hashlib.sha256(data).hexdigest(), "png", 64, 64, data, label=label)
        for i, data in enumerate(images)
    ]
    return [stored.sample_id for stored in store.add_samples(batch)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread: a tiny model gains nothing from more, and on a busy machine OpenMP's spinning threads
    made this test 30 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_unusual_images_get_scores_heatmaps_and_one_incident(tmp_path: Path, one_thread: None) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    repository = ModelRepository(tmp_path / "models", store)
    torch.manual_seed(0)
    model = InspectionModel(ModelConfig(image_size=32, backbone="resnet10t", pretrained="none"), ["good"])
    add_model_version(repository, "v0001", model, make_live=True)
    books = AlertBook(store)
    inspector = Inspector(store, repository, books, tmp_path / "heatmaps", batch=64)
    assert inspector.inspect_batch() == 0  # nothing stored yet

    good = _images(("good",), 90, seed=1)
    _store(store, good[:60], "known", label="good")
    assert inspector.inspect_batch() == 60  # no anomaly model yet: predictions only
    assert prediction_of(store, 1) is not None and prediction_of(store, 1).anomaly_score is None  # type: ignore[union-attr]

    anomaly = AnomalyModel(
        AnomalyConfig(image_size=32, channels=(8, 16, 32), latent_channels=2, min_steps=150, patch=4)
    )
    # the autoencoder score only: a random classifier's embeddings say nothing (the service's are trained). How
    # well the scores separate defects is bench/unknown_defect.py's business; here a loose threshold (half of the
    # known images above it) makes sure that images get flagged, and the test follows them through.
    anomaly.fit(good[:40], good[40:60], target_false_alarm_rate=0.5)
    anomaly.save(repository.folder("v0001") / ANOMALY_DIR)

    unusual = [_burn(data, i) for i, data in enumerate(_images(("good",), 10, seed=2))]
    new_ids = _store(store, good[60:90], "fresh") + _store(store, unusual, "burnt")
    assert inspector.inspect_batch() == 40
    rows = [prediction_of(store, sample_id) for sample_id in new_ids]
    assert all(row is not None and row.anomaly_score is not None for row in rows)
    assert all(row.anomalous == (row.anomaly_score > row.anomaly_threshold) for row in rows)  # type: ignore[union-attr,operator]
    flagged = [row for row in rows if row is not None and row.anomalous]
    assert 5 <= len(flagged) < len(rows)
    for row in flagged:
        assert row.alert_id is not None
        assert Image.open(tmp_path / "heatmaps" / f"{row.sample_id}.png").size == (64, 64)
    incidents = {row.alert_id for row in flagged}
    assert sum(event.event_type == "opened" for event in books.events_after(0)) == len(incidents)
    assert len(books.events_after(0)) == len(flagged)  # one event per flagged image: opened or joined
    assert books.open_count() == len(incidents)

    assert inspector.inspect_batch() == 0  # all done
    # another process's inspector waits while this one holds the inspector lease, then takes over where it stopped
    again = Inspector(store, repository, books, tmp_path / "heatmaps")
    later = _store(store, good[:5], "later")
    assert again.inspect_batch() == 0 and not again.leading
    assert inspector.inspect_batch() == 5 and inspector.leading
    inspector.release()
    assert again.inspect_batch() == 0 and again.leading  # resumes after the newest prediction: nothing new
    _store(store, good[5:8], "after")
    assert again.inspect_batch() == 3
    assert all(prediction_of(store, sample_id) is not None for sample_id in later)
    store.close()


def test_the_autoencoder_sees_every_class_equally_often() -> None:
    rows = [SnapshotRow(i, f"h{i}", "cam", "good" if i < 300 else "pit", LabelSource.CAMERA) for i in range(320)]
    chosen = balanced_sample(rows, 200, random.Random(0))
    counts = Counter(row.label for row in chosen)
    assert counts == {"good": 100, "pit": 100}
    assert len({row.sample_id for row in chosen if row.label == "good"}) == 100  # drawn without repeats
    assert {row.sample_id for row in chosen if row.label == "pit"} == set(range(300, 320))  # all 20, five times
    assert balanced_sample([], 200, random.Random(0)) == []
