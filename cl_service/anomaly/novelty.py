"""Feature-space novelty: how far an image's embedding is from its k nearest exemplar embeddings.

score = 1 - mean cosine similarity to the k nearest exemplars (0: among the exemplars; up to 2). The vectors are
L2-normalised here, so any embedding model works; the search is exact (faiss `IndexFlatIP`). faiss is imported
when an index is first built, not when this module is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
SELF_MATCH = 1.0 - 1e-5  # cosine similarity above which a neighbour is the query itself (leave-one-out)


def unit_embeddings(embeddings: npt.ArrayLike, what: str, dim: int | None = None) -> npt.NDArray[np.float32]:
    """An (N, D) C-contiguous float32 array of L2-normalised rows; ValueError for wrong shapes, NaN or zero rows."""
    if isinstance(embeddings, np.ndarray) and not (
        np.issubdtype(embeddings.dtype, np.floating) or np.issubdtype(embeddings.dtype, np.integer)
    ):
        raise ValueError(f"{what} must be numbers, got dtype {embeddings.dtype}")
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{what} must be a non-empty (N, D) array, got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have {array.shape[1]} dimensions; the exemplar embeddings have {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} hold an all-zero vector, which has no direction")
    return np.ascontiguousarray(array / norms, dtype=np.float32)


class FeatureNovelty:
    """Exact k-nearest-neighbour cosine distance to a fixed set of exemplar embeddings."""

    def __init__(self, exemplars: npt.ArrayLike, neighbours: int) -> None:
        if not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"neighbours must be a positive integer, got {neighbours!r}")
        self.exemplars = unit_embeddings(exemplars, "exemplar embeddings")
        if self.exemplars.shape[0] < neighbours:
            raise ValueError(
                f"{self.exemplars.shape[0]} exemplar embeddings are fewer than the {neighbours} neighbours asked for"
            )
        self.neighbours = neighbours
        self._index: Any = None

    @property
    def dim(self) -> int:
        return int(self.exemplars.shape[1])

    @property
    def count(self) -> int:
        return int(self.exemplars.shape[0])

    def score(self, embeddings: npt.ArrayLike, *, leave_one_out: bool = False) -> Floats:
        """1 - mean similarity to the k nearest exemplars, one per row of `embeddings`.

        `leave_one_out`: a query that is itself an exemplar (similarity ~1) does not count as its own neighbour,
        so known images that are also exemplars score like fresh known images (what calibration needs).
        """
        queries = unit_embeddings(embeddings, "embeddings", self.dim)
        k = self.neighbours
        wanted = min(k + 1, self.count) if leave_one_out else k
        similarities, _ = self._faiss_index().search(queries, wanted)
        similarities = np.asarray(similarities, dtype=np.float64)
        return np.asarray(1.0 - _mean_of_nearest(similarities, k, leave_one_out), dtype=np.float64)

    def _faiss_index(self) -> Any:
        if self._index is None:
            import faiss  # lazily: importing faiss costs time and memory the service may not need

            index = faiss.IndexFlatIP(self.dim)
            index.add(self.exemplars)
            self._index = index
        return self._index


def _mean_of_nearest(similarities: Floats, k: int, leave_one_out: bool) -> Floats:
    """Mean of the k highest similarities per row (sorted, highest first), skipping a leading self-match."""
    used = np.ones(similarities.shape, dtype=bool)
    if leave_one_out:
        used[:, 0] = similarities[:, 0] < SELF_MATCH
    used &= np.cumsum(used, axis=1) <= k
    used[used.sum(axis=1) == 0, 0] = True  # a single exemplar that is the query itself: nothing else to compare
    return np.asarray((similarities * used).sum(axis=1) / used.sum(axis=1), dtype=np.float64)
