"""Pseudo-labels: adaptive thresholds, the labeler, TTA, FixMatch augmentation and loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cl_service.learning.pseudo import (
    STRONG_OPS,
    AdaptiveThresholds,
    PseudoLabeler,
    as_probabilities,
    cutout,
    fixmatch_loss,
    hflip,
    identity,
    pseudo_targets,
    strong_augment,
    tta_probs,
    vflip,
    weak_augment,
)

CLASSES = ["good", "scratch", "pit"]


def _probs(rng: np.random.Generator, n: int, top: int, confidence: float, k: int = 3) -> np.ndarray:
    """n rows whose argmax is `top` with about `confidence` on it, the rest spread over the other classes."""
    conf = np.clip(confidence + rng.normal(0.0, 0.02, n), 0.0, 1.0)
    rest = rng.dirichlet(np.ones(k - 1), n) * (1.0 - conf)[:, None]
    out = np.empty((n, k))
    out[:, top] = conf
    out[:, [c for c in range(k) if c != top]] = rest
    return out


def _stream(seed: int = 0, counts: tuple[int, int, int] = (34, 33, 33)) -> np.ndarray:
    """A teacher that is sure about 'good' (~0.98), less about 'scratch' (~0.9) and unsure about 'pit' (~0.7)."""
    rng = np.random.default_rng(seed)
    parts = [_probs(rng, n, c, conf) for c, (n, conf) in enumerate(zip(counts, (0.98, 0.9, 0.7), strict=True))]
    batch = np.concatenate(parts)
    return batch[rng.permutation(len(batch))]


# -- thresholds ------------------------------------------------------------------------------------------------------


def test_thresholds_start_at_base_then_adapt_per_class_within_floor_and_ceiling() -> None:
    t = AdaptiveThresholds(CLASSES, base=0.95, floor=0.5, ceiling=0.99, momentum=0.999)
    np.testing.assert_allclose(t.thresholds(), [0.95, 0.95, 0.95])
    for seed in range(30):
        t.update(_stream(seed))
    th = t.thresholds()
    assert th[0] > th[1] > th[2]  # the confident, frequent class keeps the highest bar
    assert np.all(th >= 0.5) and np.all(th <= 0.99)
    assert th[2] > 0.5  # not pushed to the floor: 'pit' still needs a clear majority
    # global EMA moved from 0.95 towards the mean max-confidence (~0.86) of the stream
    assert 0.85 < t.global_confidence < 0.88
    assert t.seen == 3000


def test_confidence_statistic_does_not_punish_rare_classes() -> None:
    """An imbalanced stream ('good' 90%): FreeMatch's mean probability sends both defects to the floor; the per-class
    confidence statistic keeps 'scratch' (confident, rare) high and lowers 'pit' (unsure) only."""
    kinds = ("probability", "confidence")
    t = {kind: AdaptiveThresholds(CLASSES, momentum=0.99, per_class=kind) for kind in kinds}  # type: ignore[arg-type]
    for seed in range(10):
        batch = _stream(seed, counts=(180, 10, 10))
        for thresholds in t.values():
            thresholds.update(batch)
    prob, conf = t["probability"].thresholds(), t["confidence"].thresholds()
    np.testing.assert_allclose(prob[1:], [0.5, 0.5])
    assert conf[0] > conf[1] > conf[2] > 0.6
    assert conf[1] > 0.85
    restored = AdaptiveThresholds.from_state(json.loads(json.dumps(t["confidence"].state_dict())))
    assert restored.per_class == "confidence"
    np.testing.assert_array_equal(restored.thresholds(), conf)


def test_threshold_formula_global_times_normalised_class_ema() -> None:
    t = AdaptiveThresholds(["a", "b"], base=0.9, floor=0.1, ceiling=1.0, momentum=0.5)
    t.update(np.array([[0.8, 0.2]]))  # one sample: EMAs keep half
    assert t.global_confidence == pytest.approx(0.5 * 0.9 + 0.5 * 0.8)
    np.testing.assert_allclose(t.class_ema, [0.5 * 0.5 + 0.5 * 0.8, 0.5 * 0.5 + 0.5 * 0.2])
    expected = t.global_confidence * t.class_ema / t.class_ema.max()
    np.testing.assert_allclose(t.thresholds(), expected)
    # momentum is per sample: a batch of two moves like two batches of one with the same rows
    u, v = AdaptiveThresholds(["a", "b"], momentum=0.9), AdaptiveThresholds(["a", "b"], momentum=0.9)
    u.update(np.array([[0.7, 0.3], [0.7, 0.3]]))
    v.update(np.array([[0.7, 0.3]]))
    v.update(np.array([[0.7, 0.3]]))
    assert u.global_confidence == pytest.approx(v.global_confidence)
    np.testing.assert_allclose(u.class_ema, v.class_ema)


def test_floor_and_ceiling_clamp() -> None:
    t = AdaptiveThresholds(["a", "b"], base=0.999, floor=0.6, ceiling=0.97, momentum=0.0)
    assert t.thresholds()[0] == pytest.approx(0.97)
    t.update(np.array([[0.99, 0.01]]))  # momentum 0: the EMAs are this batch
    th = t.thresholds()
    assert th[0] == pytest.approx(0.97) and th[1] == pytest.approx(0.6)


def test_growing_classes_keeps_state_and_starts_new_classes_conservative() -> None:
    t = AdaptiveThresholds(CLASSES)
    for seed in range(5):
        t.update(_stream(seed))
    before, ema, glob = t.thresholds(), t.class_ema.copy(), t.global_confidence
    t.add_classes(["crack"])
    assert t.classes == [*CLASSES, "crack"]
    np.testing.assert_allclose(t.thresholds()[:3], before)
    np.testing.assert_allclose(t.class_ema[:3], ema)
    assert t.global_confidence == glob
    assert t.threshold("crack") == pytest.approx(max(before))
    with pytest.raises(ValueError, match="unique"):
        t.add_classes(["pit"])
    t.update(np.full((4, 4), 0.25))  # probabilities now have four columns
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        t.update(np.full((4, 3), 1 / 3))


def test_state_is_json_and_round_trips() -> None:
    t = AdaptiveThresholds(CLASSES, base=0.9, floor=0.4, ceiling=0.98, momentum=0.99)
    t.update(_stream(1))
    state = json.loads(json.dumps(t.state_dict()))
    restored = AdaptiveThresholds.from_state(state)
    assert restored.state_dict() == t.state_dict()
    np.testing.assert_array_equal(restored.thresholds(), t.thresholds())
    with pytest.raises(ValueError, match="version"):
        AdaptiveThresholds.from_state({**state, "version": 0})
    with pytest.raises(ValueError, match="class_ema"):
        AdaptiveThresholds.from_state({**state, "class_ema": [0.1]})


def test_probabilities_are_checked_at_the_boundary() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        as_probabilities(np.array([[0.9, 0.9]]), 2)
    with pytest.raises(ValueError, match="finite"):
        as_probabilities(np.array([[np.nan, 1.0]]), 2)
    with pytest.raises(ValueError, match="shape"):
        as_probabilities(np.array([0.5, 0.5]), 2)
    out = as_probabilities(torch.tensor([[0.25, 0.75]], dtype=torch.float16), 2)
    assert out.dtype == np.float64 and out.flags.c_contiguous


# -- the labeler -----------------------------------------------------------------------------------------------------


def test_labeler_proposes_labels_above_the_class_threshold_only() -> None:
    t = AdaptiveThresholds(["a", "b"], base=0.9, floor=0.5, ceiling=0.99, momentum=0.0)
    t.class_ema = np.array([0.8, 0.4])  # b is hard: its threshold is half of a's
    labeler = PseudoLabeler(t, teacher_version="v3")
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.6, 0.4]])
    labels = labeler.label(probs, update=False)
    assert [lab.class_name if lab else None for lab in labels] == ["a", None, "b", None]
    first, third = labels[0], labels[2]
    assert first is not None and third is not None
    assert first.confidence == pytest.approx(0.95) and first.threshold == pytest.approx(0.9)
    assert third.class_index == 1 and third.threshold == pytest.approx(0.5) and third.teacher_version == "v3"


def test_labeler_updates_thresholds_and_accepts_torch() -> None:
    t = AdaptiveThresholds(CLASSES)
    labeler = PseudoLabeler(t)
    out = labeler.label(torch.tensor(_stream(0), dtype=torch.float32))
    assert len(out) == 100 and t.seen == 100
    accepted = [lab for lab in out if lab is not None]
    assert accepted and all(lab.confidence >= lab.threshold for lab in accepted)
    targets, mask = pseudo_targets(out)
    assert mask.sum().item() == len(accepted)
    assert targets[mask].tolist() == [lab.class_index for lab in accepted]


# -- TTA ---------------------------------------------------------------------------------------------------------------


def test_tta_averages_softmax_over_identity_and_flips() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    batch = torch.rand(5, 3, 8, 8)
    probs = tta_probs(model, batch)
    with torch.no_grad():
        expected = sum(F.softmax(model(t), dim=-1) for t in (batch, batch.flip(-1), batch.flip(-2))) / 3
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert not probs.requires_grad
    # a flip-invariant model gives the plain softmax
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    with torch.no_grad():
        torch.testing.assert_close(tta_probs(pooled, batch), F.softmax(pooled(batch), -1))
    assert torch.equal(tta_probs(model, batch, [identity]), F.softmax(model(batch), -1).detach())
    assert torch.equal(hflip(batch)[..., 0], batch[..., -1]) and torch.equal(vflip(batch)[..., 0, :], batch[..., -1, :])


# -- augmentation ------------------------------------------------------------------------------------------------------


def _images(n: int = 4, channels: int = 3, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, channels, size, size, generator=g)


def test_weak_augment_flips_and_shifts_and_is_seed_deterministic() -> None:
    x = _images()
    a = weak_augment(x, torch.Generator().manual_seed(1))
    b = weak_augment(x, torch.Generator().manual_seed(1))
    c = weak_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype
    no_shift = weak_augment(x[0], torch.Generator().manual_seed(3), translate=0.0)
    assert torch.equal(no_shift, x[0]) or torch.equal(no_shift, x[0].flip(-1))


@pytest.mark.parametrize("channels", [1, 3])
def test_strong_augment_changes_images_stays_in_range_and_is_seed_deterministic(channels: int) -> None:
    x = _images(channels=channels)
    a = strong_augment(x, torch.Generator().manual_seed(1))
    b = strong_augment(x, torch.Generator().manual_seed(1))
    c = strong_augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0.0 and a.max() <= 1.0
    for i in range(len(x)):  # cutout alone changes every image
        assert not torch.equal(a[i], x[i])


def test_every_strong_op_runs_and_unknown_ops_are_refused() -> None:
    x = _images(n=2)
    for op in STRONG_OPS:
        out = strong_augment(x, torch.Generator().manual_seed(0), ops=[op], num_ops=1, cutout_max=0.0)
        assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown"):
        strong_augment(x, ops=["mixup"])


def test_cutout_fills_a_square() -> None:
    x = torch.zeros(1, 10, 10)
    out = cutout(x, 4, torch.Generator().manual_seed(0), fill=1.0)
    filled = int(out.sum().item())
    assert 4 <= filled <= 16 and x.sum() == 0  # clipped at the border at worst, input untouched
    assert torch.equal(cutout(x, 0), x)


# -- the loss ----------------------------------------------------------------------------------------------------------


def test_fixmatch_loss_is_masked_cross_entropy_averaged_over_the_batch() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 2, -1, 1])
    mask = torch.tensor([True, True, False, True])
    loss = fixmatch_loss(logits, targets, mask)
    log_p = logits.detach().log_softmax(-1)
    manual = -(log_p[0, 0] + log_p[1, 2] + log_p[3, 1]) / 4  # masked-out row counts as zero, mean over all four
    torch.testing.assert_close(loss.detach(), manual)
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad[2], torch.zeros(3))
    weights = torch.tensor([1.0, 0.5, 0.0, 0.0])
    weighted = fixmatch_loss(logits.detach(), targets, weights)
    torch.testing.assert_close(weighted, -(log_p[0, 0] + 0.5 * log_p[1, 2]) / 4)
    assert fixmatch_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)) == 0
    with pytest.raises(ValueError):
        fixmatch_loss(logits, targets[:2], mask)
