"""The FAISS replay index: changes and searches, atomic files, and rebuilds from the database."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from sqlalchemy import delete

from replay_store.models import SAMPLES
from replay_store.replay_index import (
    IndexFileError,
    ReplayIndex,
    delete_embeddings,
    embedding_ids,
    embedding_versions,
    id_set_checksum,
    read_embeddings,
    read_metadata,
    write_embeddings,
)
from replay_store.store import NewSample, Store
from tests.conftest import store_url

REPO_ROOT = Path(__file__).resolve().parents[2]
DIM = 8


def _vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    yield store
    store.close()


def _add_samples(store: Store, n: int, start: int = 0) -> list[int]:
    batch = []
    for i in range(start, start + n):
        data = f"image {i}".encode()
        batch.append(NewSample("cam", f"r{i}", hashlib.sha256(data).hexdigest(), "png", 4, 4, data))
    return [stored.sample_id for stored in store.add_samples(batch)]


@pytest.fixture
def embedded(store: Store) -> tuple[Store, np.ndarray, np.ndarray]:
    """A store with 40 samples, each with a v1 embedding."""
    ids = np.array(_add_samples(store, 40), dtype=np.int64)
    vectors = _vectors(40)
    write_embeddings(store, ids, vectors, "v1")
    return store, ids, vectors


# ------------------------------------------------------------------------------------------- in memory


def test_add_search_remove_and_replace() -> None:
    index = ReplayIndex(DIM, "v1")
    ids, vectors = np.arange(100, 150), _vectors(50)
    original = vectors.copy()
    index.add(ids, vectors)
    assert np.array_equal(vectors, original), "the caller's array is not normalised in place"
    assert len(index) == 50 and np.array_equal(index.ids(), ids)

    scores, found = index.search(vectors, 3)
    assert scores.shape == found.shape == (50, 3) and found.dtype == np.int64
    assert np.array_equal(found[:, 0], ids) and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "best first"

    assert index.remove([100, 101, 999]) == 2
    assert len(index) == 48 and 100 not in index and 102 in index
    _, found = index.search(vectors[:2], 48)
    assert not {100, 101} & set(found.ravel().tolist())
    with pytest.raises(KeyError):
        index.reconstruct(100)

    replacement = _vectors(1, seed=7)
    index.add([105], replacement)
    assert len(index) == 48, "re-adding an id replaces it"
    assert np.allclose(index.reconstruct(105), _unit(replacement[0]), atol=1e-6)
    assert index.search(replacement, 1)[1][0, 0] == 105

    scores, found = index.search(vectors[:1], 500)
    assert found.shape == (1, 48) and (found >= 0).all(), "k is capped at the number stored"


def test_bad_input_is_refused() -> None:
    index = ReplayIndex(DIM, "v1")
    assert index.search(_vectors(2), 5)[1].shape == (2, 0)
    with pytest.raises(ValueError, match="twice"):
        index.add([1, 1], _vectors(2))
    with pytest.raises(ValueError, match="zero vector"):
        index.add([1], np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="shape"):
        index.add([1], _vectors(1, dim=DIM + 1))
    with pytest.raises(ValueError, match="NaN"):
        index.add([1], np.full((1, DIM), np.nan))
    with pytest.raises(ValueError, match="2 ids for 1"):
        index.add([1, 2], _vectors(1))
    assert len(index) == 0


def test_near_duplicates() -> None:
    index = ReplayIndex(DIM, "v1")
    vectors = _vectors(30)
    index.add(np.arange(30), vectors)
    index.add([77], vectors[3] * 2.5)  # the same direction: an exact duplicate of sample 3
    noisy = vectors[[3, 10]] + np.random.default_rng(1).normal(scale=1e-3, size=(2, DIM)).astype(np.float32)
    found = index.near_duplicates(np.vstack([noisy, _vectors(1, seed=99)]), threshold=0.995)
    assert [(query, sample) for query, sample, _ in found] in ([(0, 3), (0, 77), (1, 10)], [(0, 77), (0, 3), (1, 10)])
    assert all(score >= 0.995 for _, _, score in found)

    own = index.near_duplicates(vectors[[3, 4]], query_ids=[3, 4])
    assert [(query, sample) for query, sample, _ in own] == [(0, 77)], "a sample is not its own duplicate"
    assert index.near_duplicates(vectors[:1], threshold=1.01) == []
    assert ReplayIndex(DIM, "v1").near_duplicates(vectors[:1]) == []


# ------------------------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    index = ReplayIndex(DIM, "v7")
    index.add(np.arange(10, 30), _vectors(20))
    path = tmp_path / "replay.faissidx"
    index.save(path)
    metadata = read_metadata(path)
    assert (metadata["dim"], metadata["model_version"], metadata["count"]) == (DIM, "v7", 20)
    assert metadata["ids_sha256"] == id_set_checksum(np.arange(10, 30))

    loaded = ReplayIndex.load(path)
    assert (loaded.dim, loaded.model_version) == (DIM, "v7")
    assert np.array_equal(loaded.ids(), index.ids())
    queries = _vectors(5, seed=3)
    (got_scores, got_ids), (want_scores, want_ids) = loaded.search(queries, 4), index.search(queries, 4)
    assert np.array_equal(got_ids, want_ids) and np.array_equal(got_scores, want_scores)
    assert np.array_equal(loaded.reconstruct(15), index.reconstruct(15)) and 15 in loaded and 9 not in loaded
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file is left behind"


def test_the_index_survives_a_restart(embedded: tuple[Store, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    store, _, vectors = embedded
    path = tmp_path / "index" / "replay.faissidx"
    index = ReplayIndex.open(store, path, "v1")  # first start: builds from the database and saves
    queries = _vectors(4, seed=11)
    scores, ids = index.search(queries, 5)
    store.engine.dispose()

    program = f"""
import json, logging, numpy as np
from replay_store.db import create_store_engine
from replay_store.replay_index import ReplayIndex
logging.basicConfig(level=logging.WARNING)
engine = create_store_engine({str(store.engine.url)!r})
index = ReplayIndex.open(engine, {str(path)!r}, "v1")
scores, ids = index.search(np.array({queries.tolist()!r}, dtype=np.float32), 5)
print(json.dumps({{"scores": scores.tolist(), "ids": ids.tolist(), "count": len(index)}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "rebuilding" not in result.stderr, "a restart loads the saved file"
    reloaded = json.loads(result.stdout)
    assert reloaded["count"] == len(vectors)
    assert reloaded["ids"] == ids.tolist()
    assert np.allclose(reloaded["scores"], scores, atol=1e-6)


def _damage_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("missing_file", "does not exist"),
        ("flipped_byte", "checksum"),
        ("truncated_file", "footer"),
        ("not_an_index", "footer"),
        ("embedding_added_to_db", "count"),
        ("sample_deleted", "count"),
        ("vector_replaced_other_id", "ids_sha256"),
        ("other_model_version", "model_version"),
    ],
)
def test_rebuilds_from_the_database_when_they_disagree(
    embedded: tuple[Store, np.ndarray, np.ndarray],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    reason: str,
) -> None:
    store, ids, _ = embedded
    path = tmp_path / "replay.faissidx"
    ReplayIndex.open(store, path, "v1")
    caplog.clear()
    version = "v1"
    if damage == "missing_file":
        path.unlink()
    elif damage == "flipped_byte":
        _damage_payload(path)
    elif damage == "truncated_file":
        _truncate(path)
    elif damage == "not_an_index":
        path.write_bytes(b"not an index file " * 8)
    elif damage == "embedding_added_to_db":
        (extra,) = _add_samples(store, 1, start=1000)
        write_embeddings(store, [extra], _vectors(1, seed=5), "v1")
    elif damage == "sample_deleted":
        with store.engine.begin() as connection:
            connection.execute(delete(SAMPLES).where(SAMPLES.c.id == int(ids[0])))  # cascades to its embedding
    elif damage == "vector_replaced_other_id":  # same count, other ids
        delete_embeddings(store, "v1", ids[:1])
        (extra,) = _add_samples(store, 1, start=2000)
        write_embeddings(store, [extra], _vectors(1, seed=6), "v1")
    elif damage == "other_model_version":
        write_embeddings(store, ids, _vectors(len(ids), seed=42), "v2")
        version = "v2"

    with caplog.at_level(logging.WARNING, logger="replay_store.replay_index"):
        index = ReplayIndex.open(store, path, version)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0] and reason in warnings[0], warnings

    db_ids, db_vectors = read_embeddings(store, version)
    assert np.array_equal(index.ids(), db_ids) and index.model_version == version
    assert np.allclose(np.stack([index.reconstruct(int(i)) for i in db_ids]), _unit(db_vectors), atol=1e-6)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="replay_store.replay_index"):
        again = ReplayIndex.open(store, path, version)
    assert not caplog.records, "the rebuilt index was saved: the next start loads it"
    assert np.array_equal(again.ids(), db_ids)


@pytest.mark.parametrize("failure", ["write_index", "fsync", "rename"])
def test_a_failed_save_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "replay.faissidx"
    old = ReplayIndex(DIM, "v1")
    old.add(np.arange(10), _vectors(10))
    old.save(path)
    before = path.read_bytes()

    new = ReplayIndex(DIM, "v1")
    new.add(np.arange(500), _vectors(500, seed=1))
    real_write_index = faiss.write_index

    def write_half_then_fail(index: Any, filename: str) -> None:
        real_write_index(index, filename)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(28, "No space left on device")

    def fail(*_: Any) -> None:
        raise OSError(5, "Input/output error")

    if failure == "write_index":
        monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    elif failure == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    else:
        monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError):
        new.save(path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "the temp file is removed"
    assert np.array_equal(ReplayIndex.load(path).ids(), np.arange(10))


def test_load_refuses_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "replay.faissidx"
    index = ReplayIndex(DIM, "v1")
    index.add(np.arange(10), _vectors(10))
    index.save(path)
    _damage_payload(path)
    with pytest.raises(IndexFileError, match="checksum"):
        ReplayIndex.load(path)
    index.save(path)
    _truncate(path)
    with pytest.raises(IndexFileError, match="footer"):
        ReplayIndex.load(path)


# ------------------------------------------------------------------------------------------- database


def test_embeddings_in_the_database(store: Store) -> None:
    ids = _add_samples(store, 6)
    vectors = _vectors(6)
    assert write_embeddings(store, ids, vectors, "v1") == 6
    write_embeddings(store.engine, ids[:2], vectors[:2] * 3, "v1")  # re-embedding replaces
    write_embeddings(store, ids[:3], _vectors(3, seed=2, dim=4), "v2")  # another model, another size
    assert embedding_versions(store) == {"v1": 6, "v2": 3}
    got_ids, got = read_embeddings(store, "v1")
    assert got_ids.tolist() == ids and got.dtype == np.float32
    assert np.array_equal(got[:2], vectors[:2] * 3) and np.array_equal(got[2:], vectors[2:])
    subset_ids, subset = read_embeddings(store, "v2", [ids[2], ids[0], 10_000])
    assert subset_ids.tolist() == [ids[0], ids[2]] and subset.shape == (2, 4)
    assert read_embeddings(store, "v3")[1].shape == (0, 0)

    with pytest.raises(ValueError, match="dimensions"):
        write_embeddings(store, ids[3:4], _vectors(1, dim=5), "v1")
    with pytest.raises(ValueError, match="twice"):
        write_embeddings(store, [ids[0], ids[0]], _vectors(2), "v1")
    assert embedding_versions(store) == {"v1": 6, "v2": 3}, "a refused batch writes nothing"

    assert delete_embeddings(store, "v1", ids[:2]) == 2
    assert delete_embeddings(store, "v2") == 3
    assert embedding_ids(store, "v1").tolist() == ids[2:]


def test_record_writes_the_database_then_the_index(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "replay.faissidx"
    with pytest.raises(ValueError, match="pass dim"):
        ReplayIndex.open(store, path, "v1")
    index = ReplayIndex.open(store, path, "v1", dim=DIM)
    assert len(index) == 0 and path.exists()
    assert len(ReplayIndex.open(store, path, "v1")) == 0, "an empty index's dim comes from its file"

    ids = _add_samples(store, 5)
    index.record(store, ids, _vectors(5))
    assert embedding_ids(store, "v1").tolist() == ids and index.ids().tolist() == ids
    index.save(path)
    assert read_metadata(path)["count"] == 5
    with pytest.raises(ValueError, match="8-dimensional"):
        ReplayIndex.open(store, path, "v1", dim=16)
