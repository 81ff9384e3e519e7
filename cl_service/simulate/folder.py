"""A camera that replays real images from a folder with one sub-folder per class.

`cl-service simulate --images ...` streams published inspection sets (for example
`../shared/datasets/xsdd/<class>/<file>`) in place, without copying them. Folder names become
class names under the service's naming rule, files are ordered deterministically from a seed,
and the stream can be shuffled over all classes or class-incremental (one class after another),
which is how new classes reach the continual learner.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
DEFAULT_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ORDERS: tuple[str, ...] = ("shuffled", "class_incremental")


def normalize_class_name(folder_name: str) -> str:
    """Turn a folder name into a class name matching ^[a-z][a-z0-9_]{0,63}$.

    Accents are folded to ASCII, letters lowercased, every run of other characters becomes one
    `_`, leading/trailing `_` are stripped, `c_` is prefixed when the name starts with a digit,
    and the result is cut to 64 characters. Raises ValueError when nothing usable is left.
    """
    ascii_name = unicodedata.normalize("NFKD", folder_name).encode("ascii", "ignore").decode("ascii")
    name = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
    if name[:1].isdigit():
        name = "c_" + name
    name = name[:64].rstrip("_")
    if not CLASS_NAME_RE.match(name):
        raise ValueError(f"the folder name {folder_name!r} has no letters or digits to make a class name from")
    return name


@dataclass(frozen=True)
class FolderItem:
    """One image file and the class of the folder it lies in."""

    path: Path
    label: str


class FolderSource:
    """The images under `root/<class folder>/<file>`, in a deterministic order.

    Only the files directly inside each class folder are used; hidden files and files whose
    extension is not in `extensions` (case-insensitive) are skipped, and so are files lying in
    `root` itself (MANIFEST.md, manifest.json, ...). Class folders that hold no image are left
    out and listed in `empty_folders`.
    """

    def __init__(
        self,
        root: Path,
        *,
        seed: int = 0,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        order: str = "shuffled",
    ) -> None:
        self.root = Path(root)
        self.seed = seed
        self.order = _check_order(order)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension")
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a directory")

        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root} has no class folders; expected {self.root}/<class>/<image files>")
        seen: dict[str, Path] = {}
        files: dict[str, list[Path]] = {}
        empty: list[Path] = []
        for folder in folders:
            name = normalize_class_name(folder.name)
            if name in seen:
                raise ValueError(
                    f"the class folders {seen[name].name!r} and {folder.name!r} in {self.root} "
                    f"both become the class name {name!r}; rename one of them"
                )
            seen[name] = folder
            images = sorted(
                p
                for p in folder.iterdir()
                if not p.name.startswith(".") and p.suffix.lower() in self.extensions and p.is_file()
            )
            if images:
                files[name] = images
            else:
                empty.append(folder)
        if not files:
            raise ValueError(f"no image files ({', '.join(self.extensions)}) in the class folders of {self.root}")
        self.classes: tuple[str, ...] = tuple(sorted(files))
        self.class_folders: dict[str, Path] = {name: seen[name] for name in self.classes}
        self.empty_folders: tuple[Path, ...] = tuple(empty)
        self._files = files
        self._items = {o: self._ordered(o) for o in ORDERS}

    @property
    def class_counts(self) -> dict[str, int]:
        """How many images each class has."""
        return {name: len(self._files[name]) for name in self.classes}

    def items(self, order: str | None = None) -> list[FolderItem]:
        """Every image, in the source's order (or `order`, if given); the same seed, the same list."""
        return list(self._items[_check_order(order or self.order)])

    def read(self, item: FolderItem) -> bytes:
        """The file's bytes, exactly as stored (the service decodes and validates them)."""
        return item.path.read_bytes()

    def __len__(self) -> int:
        return sum(len(paths) for paths in self._files.values())

    def __iter__(self) -> Iterator[FolderItem]:
        return iter(self._items[self.order])

    def _ordered(self, order: str) -> list[FolderItem]:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed))
        if order == "shuffled":
            everything = [FolderItem(p, name) for name in self.classes for p in self._files[name]]
            return [everything[i] for i in rng.permutation(len(everything))]
        out: list[FolderItem] = []
        for name in self.classes:
            paths = self._files[name]
            out.extend(FolderItem(paths[i], name) for i in rng.permutation(len(paths)))
        return out


def _check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; use one of {', '.join(ORDERS)}")
    return order
