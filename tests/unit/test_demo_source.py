"""The main job's image source for `--images DIR`: which class plays the new defect, and images used once each."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from cl_service.demo import DemoError, ImageSource


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for k, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            image = Image.new("L", (8, 8), i)
            image.putpixel((0, 0), 100 + k)  # every file differs
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            (root / name / f"{i}.png").write_bytes(buffer.getvalue())
    return root


def test_the_last_class_plays_the_new_defect_and_each_image_is_sent_once(tmp_path: Path) -> None:
    source = ImageSource(_folder(tmp_path / "images", {"good": 4, "Oxide Scale": 3, "pit": 2}))
    assert (source.known, source.new) == (("good", "oxide_scale"), "pit")
    first = source.take(source.known, 6, seed=0)
    assert [label for _, label in first] == ["good", "oxide_scale"] * 3
    rest = source.take(source.known, 6, seed=1)  # oxide_scale has run out: good goes on alone
    assert [label for _, label in rest] == ["good"]
    assert len({data for data, _ in first + rest}) == 7
    assert [label for _, label in source.take(("pit",), 5, seed=2)] == ["pit", "pit"]


def test_a_chosen_new_class_and_clear_errors(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images", {"a": 1, "b": 1, "c": 1})
    assert ImageSource(folder, new_class="a").known == ("b", "c")
    with pytest.raises(DemoError, match="'z' is not one of the class folders: a, b, c"):
        ImageSource(folder, new_class="z")
    with pytest.raises(DemoError, match="the demo needs at least three"):
        ImageSource(_folder(tmp_path / "two", {"a": 1, "b": 1}))
    synthetic = ImageSource(side=64)
    assert (synthetic.known, synthetic.new) == (("good", "crack"), "pit")
    assert [label for _, label in synthetic.take(("pit",), 3, seed=0)] == ["pit"] * 3
