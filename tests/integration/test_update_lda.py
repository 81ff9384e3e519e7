"""The 'lda' classifier mode on a real SQLite store with simulated camera images: the first model and a new class
come from class statistics of the frozen pretrained backbone; nothing is trained, old classes' statistics stay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cl_service.learning.class_stats import ClassStatistics
from cl_service.learning.repository import CLASS_STATS, ModelRepository
from cl_service.learning.update import run_update
from replay_store.store import Store
from tests.conftest import store_url
from tests.integration.test_update import SETTINGS, _ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LDA = SETTINGS.model_copy(update={"classifier": "lda"})


def test_lda_mode_learns_the_first_classes_and_a_new_one_and_keeps_the_old_statistics(tmp_path: Path) -> None:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    repository = ModelRepository(tmp_path / "models", store)
    _ingest(store, ("good", "scratch"), 200, start=0, labeled_every=1)
    first = run_update(store, repository, LDA)
    assert first.accepted, first.reasons
    # Measured 74.3% (shrinkage 0.1, 64x64): below the trained mode's 77-89% on these synthetic scratches, whose
    # ImageNet features are alike; open question of the branch (see the note of 2026-12-02).
    assert first.candidate is not None and first.candidate.accuracy >= 0.7, first.candidate.to_dict()
    stats = ClassStatistics.load(repository.folder("v0001") / CLASS_STATS)
    assert stats.classes == ["good", "scratch"] and stats.total == first.counts["human_train"]
    backbone = {k: v.clone() for k, v in repository.load_model("v0001").backbone.state_dict().items()}

    _ingest(store, ("good", "scratch", "pit"), 150, start=1000, labeled_every=1)
    second = run_update(store, repository, LDA.model_copy(update={"gate_tolerance": 1.0}))
    assert second.accepted, second.reasons
    model = repository.load_model(second.version)
    assert model.classes == ("good", "scratch", "pit")
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())  # frozen
    after = ClassStatistics.load(repository.folder(second.version) / CLASS_STATS)
    assert after.classes == ["good", "scratch", "pit"] and after.counts[2] > 0
    assert second.candidate is not None
    assert (second.candidate.per_class["pit"].accuracy or 0.0) >= 0.8, second.candidate.to_dict()
