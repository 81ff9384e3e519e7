"""The folder camera: class names from folder names, deterministic orders, clear errors."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cl_service.simulate.folder import FolderItem, FolderSource, normalize_class_name
from tests.conftest import DATASETS, XSDD_CLASSES


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Three class folders with awkward names, plus files the source must ignore."""
    for i in range(4):
        _png(tmp_path / "Surface Scratch" / f"s{i}.png", 10 + i)
    for i in range(3):
        _png(tmp_path / "2-pit" / f"p{i}.PNG", 50 + i)
    _png(tmp_path / "oxide--scale__" / "o0.png", 90)
    (tmp_path / "MANIFEST.md").write_text("# not an image\n")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "Surface Scratch" / "notes.txt").write_text("not an image")
    (tmp_path / "Surface Scratch" / "manifest.json").write_text("{}")
    _png(tmp_path / "Surface Scratch" / ".hidden.png", 0)
    _png(tmp_path / ".cache" / "x.png", 0)
    (tmp_path / "empty_class").mkdir()
    return tmp_path


def test_class_names_are_normalised(tree: Path) -> None:
    source = FolderSource(tree)
    assert source.classes == ("c_2_pit", "oxide_scale", "surface_scratch")
    assert source.class_folders["surface_scratch"] == tree / "Surface Scratch"
    assert source.class_counts == {"c_2_pit": 3, "oxide_scale": 1, "surface_scratch": 4}
    assert len(source) == 8
    assert source.empty_folders == (tree / "empty_class",)
    for item in source.items():
        assert re.match(r"^[a-z][a-z0-9_]{0,63}$", item.label)
        assert not item.path.name.startswith(".") and item.path.suffix.lower() == ".png"


def test_normalize_class_name_rules() -> None:
    assert normalize_class_name("Red  Iron") == "red_iron"
    assert normalize_class_name("__Crack!!__") == "crack"
    assert normalize_class_name("3d_dent") == "c_3d_dent"
    assert normalize_class_name("Kratzer-Übergröße") == "kratzer_ubergroe"
    assert len(normalize_class_name("x" * 100)) == 64
    with pytest.raises(ValueError, match="class name"):
        normalize_class_name("---")


def test_colliding_folder_names_are_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "Red Iron" / "a.png", 1)
    _png(tmp_path / "red_iron" / "b.png", 2)
    with pytest.raises(ValueError, match="both become the class name 'red_iron'"):
        FolderSource(tmp_path)


def test_missing_or_empty_roots_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no class folders"):
        FolderSource(tmp_path)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match="no image files"):
        FolderSource(tmp_path)


def test_order_is_deterministic_and_seeded(tree: Path) -> None:
    first = FolderSource(tree, seed=3).items()
    assert first == FolderSource(tree, seed=3).items()
    assert list(FolderSource(tree, seed=3)) == first
    assert sorted(map(str, first)) == sorted(map(str, FolderSource(tree, seed=4).items()))
    orders = {tuple(i.path for i in FolderSource(tree, seed=s).items()) for s in range(6)}
    assert len(orders) > 1  # the seed changes the order


def test_class_incremental_order(tree: Path) -> None:
    source = FolderSource(tree, seed=1, order="class_incremental")
    labels = [i.label for i in source.items()]
    assert labels == ["c_2_pit"] * 3 + ["oxide_scale"] + ["surface_scratch"] * 4
    assert source.items() == FolderSource(tree, seed=1).items(order="class_incremental")
    within = {
        tuple(i.path.name for i in FolderSource(tree, seed=s, order="class_incremental").items()) for s in range(8)
    }
    assert len(within) > 1  # shuffled within each class
    with pytest.raises(ValueError, match="unknown order"):
        FolderSource(tree, order="by_size")


def test_read_returns_the_file_bytes(tree: Path) -> None:
    source = FolderSource(tree)
    item = next(i for i in source.items() if i.label == "oxide_scale")
    assert item == FolderItem(tree / "oxide--scale__" / "o0.png", "oxide_scale")
    data = source.read(item)
    assert data == item.path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert np.asarray(image)[0, 0] == 90


@pytest.mark.dataset
@pytest.mark.parametrize(
    ("name", "n_classes", "n_images"),
    [("xsdd", 7, 1360), ("magnetic_tile", 6, 1344)],
)
def test_real_dataset_folders(name: str, n_classes: int, n_images: int) -> None:
    root = DATASETS / name
    if not root.is_dir():
        pytest.skip(f"the shared dataset folder {root} is not present on this machine")
    source = FolderSource(root, seed=0)
    assert len(source.classes) == n_classes
    assert len(source) == n_images
    assert source.empty_folders == ()
    if name == "xsdd":
        assert source.classes == XSDD_CLASSES
        assert source.class_counts["red_iron"] == 397
    first = source.items()[0]
    assert source.read(first)[:2] in (b"\xff\xd8", b"\x89P")  # JPEG or PNG, as stored
