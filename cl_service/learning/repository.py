"""Model versions: one folder per version on disk, one row per version in the store.

A version's folder holds its checkpoint (`model.safetensors`: weights, classes, config, parent), the
online-EWC state it leaves for the next update (`ewc.safetensors`), the teacher's adaptive thresholds
(`teacher.json`) and the update's report (`report.json`: metrics, the gate's decision, timings).
The `model_versions` table says which versions exist, which were accepted or rejected and why, and
which one is live. A folder is written completely before its row names it accepted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from cl_service.learning.model import InspectionModel, load_checkpoint
from replay_store.files import write_atomically
from replay_store.models import ModelState, ModelVersionRow, utcnow
from replay_store.store import Store

CHECKPOINT = "model.safetensors"
EWC_STATE = "ewc.safetensors"
TEACHER_STATE = "teacher.json"
REPORT = "report.json"
_VERSION = re.compile(r"^v(\d{4,})$")


class ModelRepository:
    """The versions of one service: `root/<version>/...` and the store's `model_versions` rows."""

    def __init__(self, root: Path, store: Store) -> None:
        self.root = root
        self.store = store
        root.mkdir(parents=True, exist_ok=True)

    def folder(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise ValueError(f"not a model version name: {version!r}")
        return self.root / version

    def next_version(self) -> str:
        """v0001, v0002, ...: one more than any version in the store or on disk."""
        with self.store.session() as session:
            names = list(session.scalars(select(col(ModelVersionRow.version))))
        names += [path.name for path in self.root.iterdir() if path.is_dir()]
        numbers = [int(match.group(1)) for name in names if (match := _VERSION.match(name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def live(self) -> ModelVersionRow | None:
        with self.store.session() as session:
            return session.scalars(select(ModelVersionRow).where(col(ModelVersionRow.live))).first()

    def get(self, version: str) -> ModelVersionRow | None:
        with self.store.session() as session:
            return session.get(ModelVersionRow, version)

    def load_model(self, version: str) -> InspectionModel:
        model, _ = load_checkpoint(self.folder(version) / CHECKPOINT)
        return model

    def record(
        self,
        version: str,
        *,
        parent: str | None,
        accepted: bool,
        model: InspectionModel,
        metrics: dict[str, Any],
        reason: str | None,
        make_live: bool,
    ) -> None:
        """Add the version's row; with `make_live`, it becomes the live version in the same transaction."""
        now = utcnow()
        row = ModelVersionRow(
            version=version,
            parent_version=parent,
            state=(ModelState.ACCEPTED if accepted else ModelState.REJECTED).value,
            classes=list(model.classes),
            config=model.config.to_dict(),
            metrics=metrics,
            rejection_reason=None if accepted else (reason or "rejected")[:2048],
            created_at=now,
            activated_at=now if make_live else None,
            live=make_live,
        )
        with self.store.session() as session:
            if make_live:
                session.execute(update(ModelVersionRow).values(live=False))
            session.add(row)
            session.commit()


def write_json(path: Path, data: Any) -> None:
    """Write JSON durably and atomically."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
