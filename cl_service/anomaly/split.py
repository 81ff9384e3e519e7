"""Which known images train the autoencoder and which calibrate the threshold: a seeded split, by group if asked.

Images of the same part (several exposures, repeated captures of one item) must land on one side: a calibration
image whose twin was trained on scores too low, and the threshold then lets through more false alarms than
promised. `groups` (any hashable per image: part id, capture burst) keeps each group whole.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import numpy.typing as npt

Indices = npt.NDArray[np.int64]


def split_for_calibration(
    count: int, calibration_fraction: float = 0.3, *, seed: int = 0, groups: Sequence[Hashable] | None = None
) -> tuple[Indices, Indices]:
    """(train indices, calibration indices), sorted; about `calibration_fraction` of the images (or groups) calibrate.

    Both sides get at least one image (one group): ValueError when `count` (or the number of groups) is below 2.
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be strictly between 0 and 1, got {calibration_fraction!r}")
    if groups is None:
        keys: list[Hashable] = list(range(count))
    else:
        if len(groups) != count:
            raise ValueError(f"{len(groups)} group labels for {count} images; give one per image")
        keys = list(groups)
    distinct = list(dict.fromkeys(keys))  # first-seen order: deterministic whatever the key type
    if len(distinct) < 2:
        raise ValueError(
            f"a split needs at least 2 {'groups' if groups is not None else 'images'}, got {len(distinct)}"
        )
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_calibration = min(len(distinct) - 1, max(1, round(calibration_fraction * len(distinct))))
    calibration_keys = {distinct[i] for i in order[:n_calibration]}
    is_calibration = np.array([key in calibration_keys for key in keys], dtype=bool)
    return np.flatnonzero(~is_calibration).astype(np.int64), np.flatnonzero(is_calibration).astype(np.int64)
