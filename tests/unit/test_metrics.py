"""Validation metrics, stream metrics and the gate, on hand-computed cases (and scikit-learn where it is installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cl_service.learning.metrics import (
    ClassMetrics,
    Flips,
    Metrics,
    compare,
    evaluate,
    paired_changes,
    stream_metrics,
)

CLASSES = ["good", "scratch", "pit"]


def test_evaluate_by_hand() -> None:
    # good: 4 images, 3 right (1 -> scratch); scratch: 2 images, 1 right (1 -> good); pit: 2 images, both right
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2]
    m = evaluate(y_true, y_pred, CLASSES)
    assert m.n == 8
    assert m.accuracy == pytest.approx(6 / 8)
    assert m.confusion == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    good, scratch, pit = (m.per_class[c] for c in CLASSES)
    assert good == ClassMetrics(support=4, accuracy=0.75, precision=0.75, f1=pytest.approx(0.75))
    assert scratch.support == 2 and scratch.accuracy == 0.5 and scratch.precision == 0.5
    assert scratch.f1 == pytest.approx(0.5)
    assert pit.accuracy == 1.0 and pit.f1 == 1.0
    assert m.macro_f1 == pytest.approx((0.75 + 0.5 + 1.0) / 3)


def test_macro_f1_counts_only_classes_present_in_the_truth() -> None:
    # 'pit' has no validation image; one image is wrongly predicted as 'pit'
    y_true = ["good", "good", "scratch", "scratch"]
    y_pred = ["good", "pit", "scratch", "scratch"]
    m = evaluate(y_true, y_pred, CLASSES)
    pit = m.per_class["pit"]
    assert pit.support == 0 and pit.accuracy is None and pit.precision == 0.0 and pit.f1 == 0.0
    good_f1 = 2 * 1 / (2 + 1)  # P = 1/1, R = 1/2
    scratch_f1 = 1.0  # P = 2/2, R = 2/2; the wrong 'pit' prediction costs 'good' recall only
    assert m.macro_f1 == pytest.approx((good_f1 + scratch_f1) / 2)
    # a class nobody predicts and nobody is: all undefined
    m2 = evaluate([0, 0], [0, 0], CLASSES)
    assert m2.per_class["scratch"] == ClassMetrics(0, None, None, None)
    assert m2.macro_f1 == 1.0


def test_matches_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    k = 5
    y_true = rng.integers(0, k - 1, 300)  # the last class never occurs in the truth
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, k, 300))
    classes = [f"c{i}" for i in range(k)]
    m = evaluate(y_true, y_pred, classes)
    present = sorted(set(y_true.tolist()))
    assert m.accuracy == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert m.macro_f1 == pytest.approx(sk.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
    np.testing.assert_array_equal(np.array(m.confusion), sk.confusion_matrix(y_true, y_pred, labels=list(range(k))))
    recall = sk.recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    f1 = sk.f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    for i, c in enumerate(present):
        assert m.per_class[classes[c]].accuracy == pytest.approx(recall[i])
        assert m.per_class[classes[c]].f1 == pytest.approx(f1[i])


def test_metrics_are_json_and_round_trip() -> None:
    m = evaluate([0, 1, 2, 2], [0, 2, 2, 1], CLASSES)
    data = json.loads(json.dumps(m.to_dict()))
    assert Metrics.from_dict(data) == m
    assert data["per_class"]["scratch"] == {"support": 1, "accuracy": 0.0, "precision": 0.0, "f1": 0.0}


def test_evaluate_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [], CLASSES)
    with pytest.raises(ValueError, match="length"):
        evaluate([0, 1], [0], CLASSES)
    with pytest.raises(ValueError, match="outside"):
        evaluate([0, 3], [0, 0], CLASSES)
    with pytest.raises(ValueError, match="not in the class list"):
        evaluate(["good", "crack"], ["good", "good"], CLASSES)
    with pytest.raises(ValueError, match="indices or class names"):
        evaluate([0.0, 1.0], [0, 1], CLASSES)
    with pytest.raises(ValueError, match="unique"):
        evaluate([0], [0], ["a", "a"])


# -- stream metrics ---------------------------------------------------------------------------------------------------


def test_stream_metrics_by_hand() -> None:
    nan = float("nan")
    r = [
        [0.90, nan, nan],
        [0.80, 0.95, nan],
        [0.70, 0.85, 0.92],
    ]
    s = stream_metrics(r)
    assert s.average_accuracy == pytest.approx([0.90, 0.875, (0.70 + 0.85 + 0.92) / 3])
    assert s.final_accuracy == pytest.approx((0.70 + 0.85 + 0.92) / 3)
    # forgetting: step 0: max(0.90, 0.80) - 0.70 = 0.20; step 1: 0.95 - 0.85 = 0.10
    assert s.per_step_forgetting == pytest.approx([0.20, 0.10])
    assert s.forgetting == pytest.approx(0.15)
    # backward transfer: ((0.70 - 0.90) + (0.85 - 0.95)) / 2
    assert s.backward_transfer == pytest.approx(-0.15)
    assert json.loads(json.dumps(s.to_dict()))["forgetting"] == pytest.approx(0.15)


def test_forgetting_uses_the_best_earlier_accuracy_and_can_be_negative() -> None:
    # step 0 improves after step 1 (0.6 -> 0.8) then drops to 0.7: forgetting uses the max 0.8, BWT the first 0.6
    s = stream_metrics([[0.6, None, None], [0.8, 0.9, None], [0.7, 0.95, 0.9]])
    assert s.per_step_forgetting == pytest.approx([0.1, -0.05])
    assert s.backward_transfer == pytest.approx(((0.7 - 0.6) + (0.95 - 0.9)) / 2)


def test_stream_metrics_edge_cases() -> None:
    one = stream_metrics([[0.8]])
    assert one.final_accuracy == 0.8 and one.forgetting is None and one.backward_transfer is None
    with pytest.raises(ValueError, match="square"):
        stream_metrics([[0.8, 0.1]])
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        stream_metrics([[0.8, None], [None, 0.9]])


# -- the gate ----------------------------------------------------------------------------------------------------------


def _validation(seed: int = 0, per_class: int = 50) -> np.ndarray:
    return np.repeat(np.arange(3), per_class)[np.random.default_rng(seed).permutation(3 * per_class)]


def _predict(y_true: np.ndarray, accuracy: dict[int, float], seed: int) -> np.ndarray:
    """Exactly `accuracy[c]` of class c right; the wrong ones go to the next class."""
    y_pred = y_true.copy()
    for c, acc in accuracy.items():
        idx = np.flatnonzero(y_true == c)
        wrong = idx[np.random.default_rng(seed + c).permutation(len(idx))[: round((1 - acc) * len(idx))]]
        y_pred[wrong] = (c + 1) % 3
    return y_pred


def test_gate_accepts_an_equal_or_better_candidate() -> None:
    y = _validation()
    live = evaluate(y, _predict(y, {0: 0.9, 1: 0.8, 2: 0.8}, 0), CLASSES)
    better = evaluate(y, _predict(y, {0: 0.9, 1: 0.9, 2: 0.88}, 1), CLASSES)
    decision = compare(better, live)
    assert decision.accepted and decision.reasons == []
    assert any("macro-F1" in note for note in decision.notes)
    assert compare(live, live).accepted


def test_gate_rejects_a_damaged_candidate_with_the_reason() -> None:
    y = _validation()
    live = evaluate(y, _predict(y, {0: 0.9, 1: 0.9, 2: 0.9}, 0), CLASSES)
    # 'scratch' is damaged (90% -> 70%), the others improve: overall accuracy stays at 90%, macro-F1 within 0.3 points
    damaged = evaluate(y, _predict(y, {0: 1.0, 1: 0.7, 2: 1.0}, 1), CLASSES)
    assert damaged.accuracy == pytest.approx(live.accuracy) and live.macro_f1 - damaged.macro_f1 < 0.02
    decision = compare(damaged, live, tolerance=0.02, min_support=10)
    assert not decision.accepted
    assert decision.reasons == [
        "class 'scratch': accuracy 90.0% -> 70.0% (-20.0 points > tolerance 2.0, n=50; misread as pit 15)"
    ]
    assert json.loads(json.dumps(decision.to_dict()))["accepted"] is False


def test_gate_tolerance_boundary_and_macro_f1() -> None:
    y = _validation()
    live = evaluate(y, _predict(y, {0: 0.9, 1: 0.9, 2: 0.9}, 0), CLASSES)
    two_points = evaluate(y, _predict(y, {0: 0.88, 1: 0.88, 2: 0.88}, 0), CLASSES)  # exactly 2 points on each class
    assert compare(two_points, live, tolerance=0.02).accepted
    four_points = evaluate(y, _predict(y, {0: 0.86, 1: 0.86, 2: 0.86}, 0), CLASSES)
    decision = compare(four_points, live, tolerance=0.02, old_classes=[])  # no class checks: macro-F1 alone
    assert not decision.accepted
    assert len(decision.reasons) == 1 and "macro-F1" in decision.reasons[0] and "-4.0 points" in decision.reasons[0]


def test_gate_skips_classes_with_too_few_images_and_checks_new_classes_not() -> None:
    # 'pit' has 5 validation images only: its drop is noted, not gated
    y = np.array([0] * 50 + [1] * 50 + [2] * 5)
    live_pred = y.copy()
    cand_pred = y.copy()
    cand_pred[-2:] = 0  # pit 100% -> 60%
    live = evaluate(y, live_pred, CLASSES)
    cand = evaluate(y, cand_pred, CLASSES)
    decision = compare(cand, live, min_support=10, tolerance=0.5)  # macro-F1 tolerance wide: class gating only
    assert decision.accepted
    assert any("'pit' not gated: 5 validation images < min_support 10" in note for note in decision.notes)


def test_gate_with_a_grown_class_list() -> None:
    """The candidate learnt 'crack'; both are scored with the candidate's class list on the same images."""
    classes = [*CLASSES, "crack"]
    y = np.array([0] * 20 + [1] * 20 + [2] * 20 + [3] * 20)
    live_pred = np.where(y == 3, 0, y)  # the live model has no 'crack' output
    cand_pred = y.copy()
    live = evaluate(y, live_pred, classes)
    cand = evaluate(y, cand_pred, classes)
    assert compare(cand, live, old_classes=CLASSES).accepted
    dropped = Metrics.from_dict(
        {**cand.to_dict(), "per_class": {k: v for k, v in cand.to_dict()["per_class"].items() if k != "pit"}}
    )
    decision = compare(dropped, live, old_classes=CLASSES)
    assert not decision.accepted and decision.reasons == ["old class 'pit' is missing from the candidate's classes"]


def test_gate_refuses_different_validation_sets() -> None:
    live = evaluate([0, 0, 1, 1], [0, 0, 1, 1], CLASSES)
    with pytest.raises(ValueError, match="different images"):
        compare(evaluate([0, 1, 1], [0, 1, 1], CLASSES), live)
    with pytest.raises(ValueError, match="images for the candidate"):
        compare(evaluate([0, 1, 1, 1], [0, 1, 1, 1], CLASSES), live)


def test_sign_test_p_values() -> None:
    assert Flips(0, 0).p_worse() == 1.0
    assert Flips(1, 0).p_worse() == pytest.approx(0.5)
    assert Flips(5, 0).p_worse() == pytest.approx(1 / 32)
    assert Flips(9, 2).p_worse() == pytest.approx(sum(__import__("math").comb(11, k) for k in range(9, 12)) / 2**11)
    assert Flips(2, 9).p_worse() > 0.9


def test_paired_changes_count_flips_per_true_class() -> None:
    y = [0, 0, 0, 1, 1, 2]
    live = [0, 0, 1, 1, 0, 2]
    cand = [0, 1, 0, 1, 1, 0]
    changes = paired_changes(y, live, cand, CLASSES)
    assert changes == {CLASSES[0]: Flips(1, 1), CLASSES[1]: Flips(0, 1), CLASSES[2]: Flips(1, 0)}
    with pytest.raises(ValueError, match="differ in length"):
        paired_changes(y, live, cand[:-1], CLASSES)


def test_gate_with_significance_rejects_real_forgetting_and_notes_chance() -> None:
    y = _validation()
    live_pred = _predict(y, {0: 0.9, 1: 0.9, 2: 0.9}, 0)
    live = evaluate(y, live_pred, CLASSES)
    # class 1 loses 2 images net (4 points) by swapping outcomes: within chance
    noisy_pred = live_pred.copy()
    ones = np.flatnonzero(y == 1)
    right = ones[live_pred[ones] == 1][:3]
    wrong = ones[live_pred[ones] != 1][:1]
    noisy_pred[right] = 2
    noisy_pred[wrong] = 1
    noisy = evaluate(y, noisy_pred, CLASSES)
    changes = paired_changes(y, live_pred, noisy_pred, CLASSES)
    assert changes[CLASSES[1]] == Flips(3, 1)
    assert not compare(noisy, live, tolerance=0.02, old_classes=CLASSES).accepted  # without the test: rejected
    decision = compare(noisy, live, tolerance=0.02, old_classes=CLASSES, changes=changes, significance=0.05)
    assert decision.accepted, decision.reasons
    assert any("3 worse, 1 better" in note and "within chance" in note for note in decision.notes)
    # the damaged candidate of the test above: 10 worse, 0 better is no accident
    damaged_pred = _predict(y, {0: 1.0, 1: 0.7, 2: 1.0}, 1)
    damaged = evaluate(y, damaged_pred, CLASSES)
    changes = paired_changes(y, live_pred, damaged_pred, CLASSES)
    decision = compare(damaged, live, tolerance=0.02, changes=changes, significance=0.05)
    assert not decision.accepted and "p=" in decision.reasons[0]
    with pytest.raises(ValueError, match="significance"):
        compare(live, live, significance=1.0)
