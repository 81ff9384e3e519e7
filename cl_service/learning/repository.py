"""Model versions: one folder per version on disk, one row per version in the store.

A version's folder holds its checkpoint (`model.safetensors`: weights, classes, config, parent), the
online-EWC state it leaves for the next update (`ewc.safetensors`), the teacher's adaptive thresholds
(`teacher.json`) and the update's report (`report.json`: metrics, the gate's decision, timings).
The `model_versions` table says which versions exist, which were accepted or rejected and why, and
which one is live; `model_activations` is the audit trail of who made which version live and why. A folder
is written completely before its row names it accepted.

Retention (`prune`) keeps the newest N versions plus the live one; an older version's folder is deleted and its
row marked pruned (kept for history, so that a version name is never reused).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlmodel import Session, col

from cl_service.learning.model import InspectionModel, load_checkpoint
from replay_store.files import write_atomically
from replay_store.models import ModelActivation, ModelState, ModelVersionRow, utcnow
from replay_store.store import Store

log = logging.getLogger(__name__)

CHECKPOINT = "model.safetensors"
EWC_STATE = "ewc.safetensors"
CLASS_STATS = "class_stats.safetensors"
VALIDATION_FEATURES = "validation_features.safetensors"  # 'lda' mode: the frozen backbone's, by image hash
TEACHER_STATE = "teacher.json"
REPORT = "report.json"
UPDATE_REQUESTER = "update"  # requested_by of an activation made by an accepted update
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

    def versions(self, *, include_rejected: bool = False) -> list[ModelVersionRow]:
        """The kept versions (not pruned), newest first."""
        query = select(ModelVersionRow).where(col(ModelVersionRow.pruned_at).is_(None))
        if not include_rejected:
            query = query.where(col(ModelVersionRow.state) != ModelState.REJECTED.value)
        with self.store.session() as session:
            rows = list(session.scalars(query))
        return sorted(rows, key=lambda row: _number(row.version), reverse=True)

    def activations(self) -> list[ModelActivation]:
        """The audit trail of the live version, oldest first."""
        with self.store.session() as session:
            return list(session.scalars(select(ModelActivation).order_by(col(ModelActivation.id))))

    def set_live(self, version: str, *, requested_by: str, reason: str) -> str | None:
        """Make `version` the live one and add it to the audit trail, in one transaction; returns the version
        that was live before. The caller checked that it may be (accepted, kept) and, on a server, built its engine."""
        with self.store.session() as session:
            previous = self._make_live(session, version, requested_by, reason)
            session.commit()
        return previous

    @staticmethod
    def _make_live(session: Session, version: str, requested_by: str, reason: str) -> str | None:
        previous = session.scalars(select(col(ModelVersionRow.version)).where(col(ModelVersionRow.live))).first()
        session.execute(update(ModelVersionRow).where(col(ModelVersionRow.live)).values(live=False))
        session.execute(
            update(ModelVersionRow)
            .where(col(ModelVersionRow.version) == version)
            .values(live=True, activated_at=utcnow())
        )
        session.add(
            ModelActivation(
                version=version,
                previous_version=previous,
                requested_by=requested_by[:128],
                reason=reason[:2048],
                activated_at=utcnow(),
            )
        )
        return previous

    def prune(self, keep: int) -> list[str]:
        """Delete the folders of all but the newest `keep` versions and the live one; returns the pruned names."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        kept = self.versions(include_rejected=True)
        doomed = [row.version for row in kept[keep:] if not row.live]
        if not doomed:
            return []
        with self.store.session() as session:
            session.execute(
                update(ModelVersionRow)
                .where(col(ModelVersionRow.version).in_(doomed), col(ModelVersionRow.live).is_(False))
                .values(pruned_at=utcnow())
            )
            session.commit()
        for version in doomed:  # rows first: a crash in between leaves a folder nobody lists, never a dangling row
            shutil.rmtree(self.folder(version), ignore_errors=True)
        log.info("retention: removed %s (keeping the newest %d and the live version)", ", ".join(doomed), keep)
        return doomed

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
            activated_at=None,
            live=False,
        )
        with self.store.session() as session:
            session.add(row)
            if make_live:
                session.flush()  # the row exists before the live flag and the audit trail refer to it
                self._make_live(session, version, UPDATE_REQUESTER, reason or "accepted by the validation gate")
            session.commit()


def _number(version: str) -> int:
    match = _VERSION.match(version)
    return int(match.group(1)) if match else -1


def write_json(path: Path, data: Any) -> None:
    """Write JSON durably and atomically."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
