"""How well a score separates known from unknown images: AUROC (with ties) and rates at a threshold."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cl_service.anomaly.calibration import finite_scores


def auroc(known: npt.ArrayLike, unknown: npt.ArrayLike) -> float:
    """P(score of an unknown image > score of a known one) + half the ties: the Mann-Whitney U / (n_k * n_u)."""
    negatives = finite_scores(known, "scores of known images")
    positives = finite_scores(unknown, "scores of unknown images")
    ranks = _average_ranks(np.concatenate([negatives, positives]))
    rank_sum = float(ranks[negatives.size :].sum())
    u = rank_sum - positives.size * (positives.size + 1) / 2.0
    return u / (negatives.size * positives.size)


def rate_above(scores: npt.ArrayLike, threshold: float) -> float:
    """The share of scores strictly above `threshold` (false alarms on known images, recall on unknown ones)."""
    values = finite_scores(scores, "scores")
    return float(np.mean(values > threshold))


def _average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end), 1-based
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks
