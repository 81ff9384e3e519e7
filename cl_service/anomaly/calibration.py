"""Thresholds and scales from known images only: conformal order statistics, p-values, robust standardisation.

The threshold is picked without a single defective image. Given n calibration scores of known images the model
never trained on, exchangeable with future known images, the k-th smallest with k = ceil((n + 1)(1 - alpha))
bounds the false-alarm rate of the rule `score > threshold` by (n + 1 - k) / (n + 1) <= alpha, for any score
distribution and any n (split conformal prediction; Vovk et al. 2005, Angelopoulos & Bates 2021). When n is too
small for alpha (n + 1 < 1 / alpha) the largest score is used and the bound, 1 / (n + 1), is above the target:
`meets_target` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


def finite_scores(scores: npt.ArrayLike, what: str) -> Floats:
    """A non-empty 1-D float64 copy of `scores`; ValueError when it is empty or holds NaN/infinity."""
    array = np.array(scores, dtype=np.float64).reshape(-1) if np.ndim(scores) <= 1 else None
    if array is None:
        raise ValueError(f"{what} must be one-dimensional, got shape {np.shape(scores)}")
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return array


@dataclass(frozen=True)
class ConformalThreshold:
    """The alarm rule `score > threshold`, picked from `n` known calibration scores for `target_rate`."""

    threshold: float
    rank: int  # the order statistic used: 1 = smallest
    n: int
    target_rate: float
    false_alarm_bound: float  # guaranteed P(false alarm) <= this, for exchangeable known images

    @property
    def meets_target(self) -> bool:
        return self.false_alarm_bound <= self.target_rate + 1e-12


def conformal_threshold(scores: npt.ArrayLike, target_rate: float) -> ConformalThreshold:
    """The ceil((n + 1)(1 - target_rate))-th smallest score (the largest when n is too small for the target)."""
    check_rate(target_rate)
    values = np.sort(finite_scores(scores, "calibration scores"))
    n = int(values.size)
    rank = min(n, math.ceil((n + 1) * (1.0 - target_rate) - 1e-9))
    return ConformalThreshold(
        threshold=float(values[rank - 1]),
        rank=rank,
        n=n,
        target_rate=target_rate,
        false_alarm_bound=(n + 1 - rank) / (n + 1),
    )


def min_calibration_size(target_rate: float) -> int:
    """The fewest calibration scores for which the conformal rule can guarantee `target_rate`."""
    check_rate(target_rate)
    return max(1, math.ceil(1.0 / target_rate - 1.0 - 1e-9))


def p_values(reference: npt.ArrayLike, scores: npt.ArrayLike) -> Floats:
    """Conformal p-values: (1 + #{reference >= s}) / (n + 1) for each score s (small = unusual)."""
    ref = np.sort(finite_scores(reference, "reference scores"))
    values = finite_scores(scores, "scores")
    at_least = ref.size - np.searchsorted(ref, values, side="left")
    return np.asarray((1.0 + at_least) / (ref.size + 1.0), dtype=np.float64)


def check_rate(target_rate: float) -> None:
    if not (isinstance(target_rate, float | int) and 0.0 < float(target_rate) < 1.0):
        raise ValueError(f"the target false-alarm rate must be a number strictly between 0 and 1, got {target_rate!r}")


@dataclass(frozen=True)
class Standardiser:
    """(score - location) / scale, with a robust location and scale (median, IQR / 1.349) of known images."""

    location: float
    scale: float

    @classmethod
    def fit(cls, scores: npt.ArrayLike, what: str = "scores") -> Standardiser:
        values = finite_scores(scores, what)
        q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
        scale = float(q75 - q25) / 1.349  # the IQR of a normal distribution is 1.349 standard deviations
        if not scale > 0.0:
            scale = float(values.std())
        if not scale > 0.0:  # all equal: any positive scale keeps the order
            scale = max(abs(float(median)), 1.0) * 1e-6
        return cls(location=float(median), scale=scale)

    def __call__(self, scores: npt.ArrayLike) -> Floats:
        return np.asarray((np.asarray(scores, dtype=np.float64) - self.location) / self.scale, dtype=np.float64)

    def to_dict(self) -> dict[str, float]:
        return {"location": self.location, "scale": self.scale}
