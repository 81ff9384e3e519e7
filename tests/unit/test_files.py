"""Durable file replacement: the old file or the new one, never a mix, no temporary files left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay_store.files import replacing, write_atomically, write_private


def test_a_failed_replacement_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")
    with pytest.raises(RuntimeError), replacing(path) as temp:
        temp.write_bytes(b"half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_replacement_creates_folders_and_replaces_the_content(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "model.bin"
    write_atomically(path, b"one")
    write_atomically(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["model.bin"]


def test_a_private_file_is_readable_by_its_owner_only_even_when_it_existed(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "1.settings.json"
    write_private(path, b"postgresql://cl:secret@db/cl")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"postgresql://cl:secret@db/cl"
    path.chmod(0o644)
    write_private(path, b"again")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"again"
