"""Running class statistics and their discriminant head: order-free, additive, new classes change nothing old."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cl_service.learning.class_stats import ClassStatistics, load_features, save_features

DIM = 16


def _blobs(n_per_class: int, classes: int, draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with correlated features: class c around a fixed random mean, one shared covariance;
    `draw` picks the images (the classes stay the same)."""
    generator = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(classes, DIM, generator=generator)
    mixing = torch.randn(DIM, DIM, generator=generator) / DIM**0.5
    targets = torch.arange(classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(targets), DIM, generator=torch.Generator().manual_seed(1 + draw))
    features = centres[targets] + noise @ mixing
    return features, targets


def test_folding_in_parts_and_in_any_order_gives_the_statistics_of_one_fold() -> None:
    features, targets = _blobs(50, 3)
    whole = ClassStatistics(DIM, ["a", "b", "c"])
    whole.fold(features, targets)
    parts = ClassStatistics(DIM, ["a", "b", "c"])
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(1))
    for chunk in order.split(37):
        parts.fold(features[chunk], targets[chunk])
    assert torch.equal(whole.counts, parts.counts)
    assert torch.allclose(whole.sums, parts.sums) and torch.allclose(whole.scatter, parts.scatter)
    weight_whole, bias_whole = whole.head()
    weight_parts, bias_parts = parts.head()
    assert torch.allclose(weight_whole, weight_parts, atol=1e-5) and torch.allclose(bias_whole, bias_parts, atol=1e-4)


def test_the_head_is_lda_with_a_shrunk_shared_covariance_and_tells_the_blobs_apart() -> None:
    features, targets = _blobs(200, 4)
    stats = ClassStatistics(DIM, ["a", "b", "c", "d"])
    stats.fold(features, targets)
    weight, bias = stats.head(shrinkage=0.2)

    x = features.double()
    means = torch.stack([x[targets == c].mean(0) for c in range(4)])
    centred = x - means[targets]
    within = centred.T @ centred / (len(x) - 4)
    shrunk = 0.8 * within + 0.2 * within.diagonal().mean() * torch.eye(DIM, dtype=torch.float64)
    expected = torch.linalg.solve(shrunk, means.T).T
    assert torch.allclose(weight.double(), expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(bias.double(), -0.5 * (expected * means).sum(1), rtol=1e-4, atol=1e-5)

    unseen, truth = _blobs(100, 4, draw=1)  # other images of the same classes
    assert ((unseen @ weight.T + bias).argmax(1) == truth).float().mean() > 0.95


def test_a_new_class_leaves_the_old_statistics_alone_and_never_wins_before_its_images_arrive() -> None:
    features, targets = _blobs(60, 3)
    stats = ClassStatistics(DIM, ["a", "b"])
    old = targets < 2
    stats.fold(features[old], targets[old])
    before = (stats.counts.clone(), stats.sums.clone())

    stats.add_classes(["c"])
    assert stats.classes == ["a", "b", "c"]
    assert torch.equal(stats.counts[:2], before[0]) and torch.equal(stats.sums[:2], before[1])
    weight, bias = stats.head()
    assert torch.equal(weight[2], torch.zeros(DIM)) and bias[2] < -1e3
    assert set((features @ weight.T + bias).argmax(1).tolist()) <= {0, 1}

    stats.fold(features[~old], targets[~old])
    assert torch.equal(stats.sums[:2], before[1])  # the old classes' sums do not move
    weight, bias = stats.head()
    assert ((features @ weight.T + bias).argmax(1) == targets).float().mean() > 0.95


def test_saved_statistics_load_back_the_same(tmp_path: Path) -> None:
    features, targets = _blobs(30, 3)
    stats = ClassStatistics(DIM, ["a", "b", "c"])
    stats.fold(features, targets)
    stats.save(tmp_path / "stats.safetensors")
    loaded = ClassStatistics.load(tmp_path / "stats.safetensors")
    assert loaded.classes == ["a", "b", "c"] and loaded.dim == DIM
    assert torch.equal(loaded.counts, stats.counts) and torch.equal(loaded.scatter, stats.scatter)
    assert torch.equal(loaded.head()[0], stats.head()[0])

    save_file({"counts": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no class statistics"):
        ClassStatistics.load(tmp_path / "other.safetensors")


def test_bad_input_is_refused_with_the_reason() -> None:
    stats = ClassStatistics(DIM, ["a", "b"])
    with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
        stats.fold(torch.zeros(3, DIM + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="feature rows"):
        stats.fold(torch.zeros(3, DIM), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="class indices"):
        stats.fold(torch.zeros(1, DIM), torch.tensor([2]))
    with pytest.raises(ValueError, match="at least two classes"):
        stats.fold(torch.ones(4, DIM), torch.zeros(4, dtype=torch.long))
        stats.head()
    with pytest.raises(ValueError, match="already known"):
        stats.add_classes(["a"])
    with pytest.raises(TypeError, match="not the string"):
        stats.add_classes("c")
    with pytest.raises(ValueError, match="shrinkage"):
        stats.head(shrinkage=0.0)


def test_features_save_and_load_by_hash_and_a_damaged_cache_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    features = torch.randn(3, 4)
    path = tmp_path / "features.safetensors"
    save_features(path, ["a", "b", "c"], features)
    loaded = load_features(path, 4)
    assert list(loaded) == ["a", "b", "c"] and torch.equal(torch.stack(list(loaded.values())), features)
    assert load_features(tmp_path / "missing.safetensors", 4) == {}
    assert load_features(path, 5) == {}  # another backbone's dimension
    path.write_bytes(path.read_bytes()[:40])
    assert load_features(path, 4) == {}
    assert "ignoring the feature cache" in caplog.text
    with pytest.raises(ValueError, match="2 hashes but features of shape"):
        save_features(path, ["a", "b"], features)
