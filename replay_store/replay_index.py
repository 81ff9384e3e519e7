"""The FAISS replay index: embeddings of stored samples, searched by cosine similarity, removable by id.

The database is the truth (table `embeddings`, one row per sample and embedding model version); the
index file is a cache of it that loads in one read instead of a table scan. `ReplayIndex.open`
compares the file with the rows (model version, count, a checksum of the id set) and rebuilds from the
rows when they disagree, when the file is missing, or when it is damaged.

One file, replaced atomically, so the cache and its description can never disagree:

    [faiss.write_index payload][metadata JSON][footer: payload length, metadata length, magic]

faiss reads its payload and ignores what follows. `load` reads the footer first and checks the
payload's SHA-256 before faiss sees a byte, so a torn or damaged file is refused, never half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Engine, delete, func, insert, select

from replay_store.files import replacing
from replay_store.models import EMBEDDINGS, utcnow

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MAGIC = b"CLRIDX01"
_FOOTER = struct.Struct("<QQ8s")  # payload bytes, metadata bytes, magic
_READ_CHUNK = 1 << 20
_REBUILD_ROWS = 2048  # embedding rows per database round trip while rebuilding
_IN_CHUNK = 500  # ids per IN (...) list: far below SQLite's and PostgreSQL's parameter limits

FloatMatrix = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


class HasEngine(Protocol):
    """Anything that holds the store's engine (replay_store.Store does)."""

    @property
    def engine(self) -> Engine: ...


EngineSource = Engine | HasEngine


def engine_of(source: EngineSource) -> Engine:
    return source if isinstance(source, Engine) else source.engine


class IndexFileError(Exception):
    """The index file is torn, damaged, or does not hold what its metadata says."""


@dataclass(frozen=True)
class IndexInfo:
    """What an index holds, as recorded in its file and as computed from the database."""

    dim: int
    model_version: str
    count: int
    ids_sha256: str

    def disagreement(self, other: IndexInfo) -> str | None:
        """Why `self` (the file) does not describe `other` (the database), or None when it does."""
        for name in ("model_version", "dim", "count", "ids_sha256"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} is {mine!r} in the file but {theirs!r} in the database"
        return None


def id_set_checksum(ids: npt.ArrayLike) -> str:
    """SHA-256 of the sorted, distinct int64 ids: equal exactly when the id sets are equal."""
    distinct = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1))
    return hashlib.sha256(distinct.astype("<i8").tobytes()).hexdigest()


def as_ids(ids: npt.ArrayLike) -> IdArray:
    """Sample ids as a contiguous 1-D int64 array."""
    array = np.asarray(ids)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"sample ids must be integers, not {array.dtype}")
    return np.ascontiguousarray(array.reshape(-1), dtype=np.int64)


def as_vectors(vectors: npt.ArrayLike, dim: int | None = None) -> FloatMatrix:
    """Vectors as a contiguous (n, dim) float32 matrix of finite values (a 1-D vector is one row)."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or (dim is not None and matrix.shape[1] != dim):
        raise ValueError(f"expected vectors of shape (n, {dim or 'dim'}), got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("vectors hold NaN or infinite values")
    return np.ascontiguousarray(matrix)


def normalized(vectors: npt.ArrayLike, dim: int | None = None) -> FloatMatrix:
    """L2-normalised copy of `vectors` (the caller's array is never changed); zero vectors are refused."""
    matrix = as_vectors(vectors, dim)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a zero vector has no direction and cannot be normalised")
    return np.ascontiguousarray(matrix / norms, dtype=np.float32)


class ReplayIndex:
    """Normalised embeddings keyed by sample id in `IndexIDMap2(IndexFlatIP)`: scores are cosines.

    Exact search (a flat index): the replay buffer holds thousands to a few hundred thousand vectors,
    where exact search takes milliseconds and needs no training. Thread-safe: one lock around the index.
    """

    def __init__(self, dim: int, model_version: str) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.model_version = model_version
        self._index: faiss.IndexIDMap2 = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, sample_id: object) -> bool:
        if not isinstance(sample_id, int | np.integer):
            return False
        with self._lock:
            try:
                self._index.reconstruct(int(sample_id))
            except RuntimeError:
                return False
            return True

    def ids(self) -> IdArray:
        """The stored sample ids, sorted."""
        with self._lock:
            return np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))

    def info(self) -> IndexInfo:
        return IndexInfo(self.dim, self.model_version, len(self), id_set_checksum(self.ids()))

    # -------------------------------------------------------------------------------- changes

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add (or replace) the embeddings of `ids`; vectors are normalised, the caller's array is untouched."""
        id_array = as_ids(ids)
        matrix = normalized(vectors, self.dim)
        if len(id_array) != len(matrix):
            raise ValueError(f"{len(id_array)} ids for {len(matrix)} vectors")
        if len(np.unique(id_array)) != len(id_array):
            raise ValueError("an id appears twice in one add")
        if not len(id_array):
            return
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(id_array))
            self._index.add_with_ids(matrix, id_array)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove `ids` (absent ones are ignored); return how many were removed."""
        id_array = as_ids(ids)
        if not len(id_array):
            return 0
        with self._lock:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(id_array)))

    def record(self, source: EngineSource, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Write the embeddings to the database (the truth, one transaction), then add them here."""
        write_embeddings(source, ids, vectors, self.model_version)
        self.add(ids, vectors)

    # -------------------------------------------------------------------------------- queries

    def search(self, vectors: npt.ArrayLike, k: int) -> tuple[FloatMatrix, IdArray]:
        """The k most similar stored samples of each query: (cosine scores, sample ids), best first.

        k is capped at the number of stored vectors, so every returned id is a real one."""
        queries = normalized(vectors, self.dim)
        with self._lock:
            k = min(k, len(self))
            if k <= 0:
                return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
            scores, ids = self._index.search(queries, k)
        return scores, ids.astype(np.int64, copy=False)

    def near_duplicates(
        self,
        vectors: npt.ArrayLike,
        threshold: float = 0.995,
        *,
        query_ids: Sequence[int] | None = None,
    ) -> list[tuple[int, int, float]]:
        """Every stored sample whose cosine with a query is at least `threshold`.

        Returns (query index, sample id, score), grouped by query, best first. `query_ids[i]`, when
        given, is the query's own sample id, which does not count as its own duplicate.
        """
        queries = normalized(vectors, self.dim)
        if query_ids is not None and len(query_ids) != len(queries):
            raise ValueError(f"{len(query_ids)} query ids for {len(queries)} queries")
        if not len(self):
            return []
        # range_search keeps scores strictly above the radius: step just below the threshold.
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
        with self._lock:
            limits, scores, ids = self._index.range_search(queries, radius)
        found: list[tuple[int, int, float]] = []
        for query in range(len(queries)):
            start, end = int(limits[query]), int(limits[query + 1])
            order = start + np.lexsort((ids[start:end], -scores[start:end]))
            own = None if query_ids is None else int(query_ids[query])
            found.extend(
                (query, int(ids[i]), float(scores[i])) for i in order if scores[i] >= threshold and ids[i] != own
            )
        return found

    def reconstruct(self, sample_id: int) -> FloatMatrix:
        """The stored (normalised) vector of a sample; KeyError when it is not stored."""
        with self._lock:
            try:
                vector: Any = self._index.reconstruct(int(sample_id))  # the stubs' first overload is torch's
            except RuntimeError:
                raise KeyError(sample_id) from None
        return np.asarray(vector, dtype=np.float32)

    # -------------------------------------------------------------------------------- files

    def save(self, path: Path) -> None:
        """Write the index atomically: temp file in the same folder, fsync, rename, fsync the folder.

        A crash at any point leaves either the old file or the new one, never a mix of both."""
        path = Path(path)
        with replacing(path) as temp:
            with self._lock:
                info = self.info()
                faiss.write_index(self._index, str(temp))
            with open(temp, "r+b") as handle:
                payload_bytes = os.fstat(handle.fileno()).st_size
                payload_sha256 = _digest(handle, payload_bytes)
                metadata = {
                    "format": FORMAT_VERSION,
                    "dim": info.dim,
                    "model_version": info.model_version,
                    "count": info.count,
                    "ids_sha256": info.ids_sha256,
                    "metric": "inner_product_on_l2_normalised",
                    "payload_bytes": payload_bytes,
                    "payload_sha256": payload_sha256,
                    "faiss_version": faiss.__version__,
                    "saved_at": utcnow().isoformat(),
                }
                encoded = json.dumps(metadata, sort_keys=True).encode()
                handle.seek(payload_bytes)
                handle.write(encoded + _FOOTER.pack(payload_bytes, len(encoded), _MAGIC))

    @classmethod
    def load(cls, path: Path) -> ReplayIndex:
        """Read an index file; IndexFileError when it is torn, damaged or inconsistent."""
        path = Path(path)
        metadata = read_metadata(path)
        info = _info_of(metadata)
        with open(path, "rb") as handle:
            payload_sha256 = _digest(handle, int(metadata["payload_bytes"]))
        if payload_sha256 != metadata["payload_sha256"]:
            raise IndexFileError(f"{path}: the payload's checksum does not match (the file is damaged)")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexFileError(f"{path}: faiss cannot read it: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexFileError(f"{path}: holds a {type(index).__name__}, not an IndexIDMap2")
        loaded = cls(info.dim, info.model_version)
        loaded._index = index
        problem = info.disagreement(loaded.info())
        if problem is not None:
            raise IndexFileError(f"{path}: the payload does not match its metadata: {problem}")
        return loaded

    @classmethod
    def rebuild(cls, source: EngineSource, model_version: str, dim: int) -> ReplayIndex:
        """A new index holding every embedding of `model_version` in the database (read in pages)."""
        index = cls(dim, model_version)
        for ids, vectors in iter_embeddings(source, model_version):
            index.add(ids, vectors)
        return index

    @classmethod
    def open(
        cls,
        source: EngineSource,
        path: Path,
        model_version: str,
        *,
        dim: int | None = None,
    ) -> ReplayIndex:
        """Load the index file when it agrees with the database, else rebuild it from the database.

        `dim` is needed only when the database holds no embedding of `model_version` yet.
        A rebuilt index is saved back to `path` (a failure to save is logged: the file is only a cache).
        """
        path = Path(path)
        file_info: IndexInfo | None = None
        try:
            file_info = _info_of(read_metadata(path))
        except FileNotFoundError:
            reason = "the index file does not exist"
        except (OSError, IndexFileError) as exc:
            reason = f"the index file is unusable: {exc}"
        expected = _database_info(engine_of(source), model_version, dim, file_info.dim if file_info else None)
        if file_info is not None:
            reason = file_info.disagreement(expected) or ""
            if not reason:
                try:
                    return cls.load(path)
                except (OSError, IndexFileError) as exc:
                    reason = f"the index file is unusable: {exc}"
        fresh = file_info is None and expected.count == 0 and not path.exists()
        log.log(
            logging.INFO if fresh else logging.WARNING,
            "rebuilding the replay index %s from the database (%d embeddings of %s): %s",
            path,
            expected.count,
            model_version,
            reason,
        )
        index = cls.rebuild(source, model_version, expected.dim)
        try:
            index.save(path)
        except OSError as exc:
            log.error("could not save the rebuilt replay index to %s: %s", path, exc)
        return index


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of an index file, from its footer (the payload is not read)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < _FOOTER.size:
            raise IndexFileError(f"{path}: {size} bytes is too short to be an index file")
        handle.seek(size - _FOOTER.size)
        payload_bytes, metadata_bytes, magic = _FOOTER.unpack(handle.read(_FOOTER.size))
        if magic != _MAGIC:
            raise IndexFileError(f"{path}: no index footer (a torn write, or not an index file)")
        if payload_bytes + metadata_bytes + _FOOTER.size != size:
            raise IndexFileError(f"{path}: the footer's lengths do not add up to the file size {size}")
        handle.seek(payload_bytes)
        try:
            metadata = json.loads(handle.read(metadata_bytes))
        except ValueError as exc:
            raise IndexFileError(f"{path}: unreadable metadata: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        raise IndexFileError(f"{path}: unknown index file format")
    if metadata.get("payload_bytes") != payload_bytes:
        raise IndexFileError(f"{path}: the metadata and the footer disagree on the payload size")
    return metadata


def _info_of(metadata: dict[str, Any]) -> IndexInfo:
    try:
        return IndexInfo(
            int(metadata["dim"]), str(metadata["model_version"]), int(metadata["count"]), str(metadata["ids_sha256"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"incomplete metadata: {exc!r}") from exc


def _digest(handle: Any, length: int) -> str:
    """SHA-256 of the first `length` bytes of an open file."""
    handle.seek(0)
    hasher, remaining = hashlib.sha256(), length
    while remaining:
        chunk = handle.read(min(_READ_CHUNK, remaining))
        if not chunk:
            raise IndexFileError(f"the payload is {length - remaining} bytes, shorter than {length}")
        hasher.update(chunk)
        remaining -= len(chunk)
    return hasher.hexdigest()


# ------------------------------------------------------------------------------------ database side


def write_embeddings(source: EngineSource, ids: npt.ArrayLike, vectors: npt.ArrayLike, model_version: str) -> int:
    """Store (or replace) the embeddings of `ids` under `model_version`, in one transaction.

    Vectors are stored as given (float32, not normalised). All embeddings of one model version share
    one dimension: a batch of another dimension is refused. Returns the number of rows written."""
    id_array = as_ids(ids)
    matrix = as_vectors(vectors).astype("<f4", copy=False)
    if len(id_array) != len(matrix):
        raise ValueError(f"{len(id_array)} ids for {len(matrix)} vectors")
    if len(np.unique(id_array)) != len(id_array):
        raise ValueError("a sample id appears twice in one batch")
    if not len(id_array):
        return 0
    dim, now = int(matrix.shape[1]), utcnow()
    table = EMBEDDINGS
    with engine_of(source).begin() as connection:
        known_dim = _dim_of(connection, model_version)
        if known_dim is not None and known_dim != dim:
            raise ValueError(f"embeddings of {model_version!r} have {known_dim} dimensions, not {dim}")
        for chunk in _chunks(id_array):
            connection.execute(
                delete(table).where(table.c.model_version == model_version, table.c.sample_id.in_(chunk))
            )
        rows = [
            {
                "sample_id": int(i),
                "model_version": model_version,
                "dim": dim,
                "vector": row.tobytes(),
                "created_at": now,
            }
            for i, row in zip(id_array, matrix, strict=True)
        ]
        connection.execute(insert(table), rows)
    return len(rows)


def read_embeddings(
    source: EngineSource, model_version: str, ids: npt.ArrayLike | None = None
) -> tuple[IdArray, FloatMatrix]:
    """(sample ids, vectors) of `model_version`, sorted by id; only `ids` (those stored) when given."""
    if ids is None:
        pages = list(iter_embeddings(source, model_version))
    else:
        table = EMBEDDINGS
        pages = []
        with engine_of(source).connect() as connection:
            for chunk in _chunks(as_ids(ids)):
                query = select(table.c.sample_id, table.c.dim, table.c.vector).where(
                    table.c.model_version == model_version, table.c.sample_id.in_(chunk)
                )
                pages.append(_decode(connection.execute(query).all()))
    pages = [page for page in pages if len(page[0])]
    if not pages:
        dim = _dim_of_engine(engine_of(source), model_version) or 0
        return np.empty(0, np.int64), np.empty((0, dim), np.float32)
    all_ids = np.concatenate([page_ids for page_ids, _ in pages])
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], np.concatenate([vectors for _, vectors in pages])[order]


def iter_embeddings(source: EngineSource, model_version: str) -> Iterator[tuple[IdArray, FloatMatrix]]:
    """Every embedding of `model_version` in pages of (ids, vectors), by ascending id (keyset paging)."""
    table, after = EMBEDDINGS, None
    with engine_of(source).connect() as connection:
        while True:
            query = select(table.c.sample_id, table.c.dim, table.c.vector).where(table.c.model_version == model_version)
            if after is not None:
                query = query.where(table.c.sample_id > after)
            rows = connection.execute(query.order_by(table.c.sample_id).limit(_REBUILD_ROWS)).all()
            if not rows:
                return
            ids, vectors = _decode(rows)
            yield ids, vectors
            after = int(ids[-1])


def embedding_ids(source: EngineSource, model_version: str) -> IdArray:
    """The sample ids that have an embedding of `model_version`, sorted."""
    table = EMBEDDINGS
    query = select(table.c.sample_id).where(table.c.model_version == model_version).order_by(table.c.sample_id)
    with engine_of(source).connect() as connection:
        return np.fromiter(connection.execute(query).scalars(), dtype=np.int64)


def embedding_versions(source: EngineSource) -> dict[str, int]:
    """How many embeddings each model version has in the database."""
    table = EMBEDDINGS
    query = select(table.c.model_version, func.count()).group_by(table.c.model_version)
    with engine_of(source).connect() as connection:
        return {version: int(count) for version, count in connection.execute(query)}


def delete_embeddings(source: EngineSource, model_version: str, ids: npt.ArrayLike | None = None) -> int:
    """Delete the embeddings of `model_version` (only those of `ids` when given); return how many."""
    table, deleted = EMBEDDINGS, 0
    with engine_of(source).begin() as connection:
        if ids is None:
            return int(connection.execute(delete(table).where(table.c.model_version == model_version)).rowcount)
        for chunk in _chunks(as_ids(ids)):
            statement = delete(table).where(table.c.model_version == model_version, table.c.sample_id.in_(chunk))
            deleted += int(connection.execute(statement).rowcount)
    return deleted


def _database_info(engine: Engine, model_version: str, dim: int | None, file_dim: int | None) -> IndexInfo:
    """What the index of `model_version` must hold. Its dimension comes from the rows, else from the
    caller, else (no rows, no dim given) from the file, whose index is then expected to be empty."""
    ids = embedding_ids(engine, model_version)
    stored_dim = _dim_of_engine(engine, model_version)
    if stored_dim is not None and dim is not None and stored_dim != dim:
        raise ValueError(f"the database holds {stored_dim}-dimensional embeddings of {model_version!r}, not {dim}")
    resolved = next((d for d in (stored_dim, dim, file_dim) if d is not None), None)
    if resolved is None:
        raise ValueError(f"the database holds no embedding of {model_version!r}: pass dim to open an empty index")
    return IndexInfo(resolved, model_version, len(ids), id_set_checksum(ids))


def _dim_of(connection: Connection, model_version: str) -> int | None:
    table = EMBEDDINGS
    query = select(table.c.dim).where(table.c.model_version == model_version).limit(1)
    value = connection.execute(query).scalar_one_or_none()
    return None if value is None else int(value)


def _dim_of_engine(engine: Engine, model_version: str) -> int | None:
    with engine.connect() as connection:
        return _dim_of(connection, model_version)


def _decode(rows: Sequence[Any]) -> tuple[IdArray, FloatMatrix]:
    """Rows of (sample_id, dim, vector bytes) as an id array and a float32 matrix."""
    if not rows:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    dim = int(rows[0][1])
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    blob = b"".join(bytes(row[2]) for row in rows)
    if any(int(row[1]) != dim for row in rows) or len(blob) != 4 * dim * len(rows):
        raise ValueError("stored embeddings of one model version differ in size")
    return ids, np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(len(rows), dim)


def _chunks(ids: IdArray) -> Iterable[list[int]]:
    for start in range(0, len(ids), _IN_CHUNK):
        yield [int(i) for i in ids[start : start + _IN_CHUNK]]
