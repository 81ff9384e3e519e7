"""The segment blob store: append, read back, verify, survive torn tails."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from replay_store.blobs import BlobCorruptError, BlobLocation, BlobStore


def _blob(i: int) -> tuple[str, bytes]:
    data = f"image-{i}".encode() * (i + 1)
    return hashlib.sha256(data).hexdigest(), data


def test_append_and_read_back(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blobs = [_blob(i) for i in range(50)]
    locations = store.append_many(blobs)
    assert [loc.sha256 for loc in locations] == [sha for sha, _ in blobs]
    for (_, data), location in zip(blobs, locations, strict=True):
        assert store.read(location, verify=True) == data
    store.close()


def test_a_new_store_never_appends_to_an_old_segment(tmp_path: Path) -> None:
    first = BlobStore(tmp_path)
    (old,) = first.append_many([_blob(1)])
    first.close()
    second = BlobStore(tmp_path)
    (new,) = second.append_many([_blob(2)])
    assert new.segment != old.segment
    assert second.read(old, verify=True) == _blob(1)[1]


def test_segments_roll_over(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, segment_bytes=100)
    locations = [store.append_many([_blob(i)])[0] for i in range(5)]
    assert len({loc.segment for loc in locations}) > 1


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    (location,) = store.append_many([_blob(3)])
    path = store.segment_path(location.segment)
    raw = bytearray(path.read_bytes())
    raw[location.offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(BlobCorruptError, match="corrupt"):
        store.read(location, verify=True)
    short = BlobLocation(location.sha256, location.segment, location.offset, location.length + 10_000)
    with pytest.raises(BlobCorruptError, match="truncated"):
        store.read(short)


def test_bad_names_are_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        store.append_many([("not-a-sha", b"x")])
    with pytest.raises(ValueError, match="segment"):
        store.segment_path("../escape")
