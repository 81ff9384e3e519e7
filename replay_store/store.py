"""The store: one database (SQLite by default, any SQLAlchemy URL) plus the blob folder.

`add_samples` is the durable write path of ingest: blobs first (fsynced), then one transaction for
the whole batch. A row therefore never points at a missing blob, and a reply sent after it returns
can be trusted to survive a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from replay_store.batch_sql import BatchSQL, batch_sql_for
from replay_store.blobs import BlobCorruptError, BlobLocation, BlobStore
from replay_store.db import check_known_revision, create_store_engine, current_revision, head_revision, migrate
from replay_store.models import (
    BLOBS,
    CLASSES,
    LABELS,
    PRECEDENCE,
    SAMPLES,
    Blob,
    Label,
    LabelSource,
    Sample,
    utcnow,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewSample:
    """A validated image ready to be stored (the caller checked it and hashed the bytes)."""

    camera_id: str
    request_id: str
    sha256: str
    image_format: str
    width: int
    height: int
    data: bytes
    captured_at: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    label: str | None = None


@dataclass(frozen=True)
class StoredSample:
    """Where a NewSample ended up. `created` is False when (camera, request id) was stored before;
    `conflict` is True when that earlier sample has different bytes (a client reusing a request id)."""

    sample_id: int
    sha256: str
    created: bool
    conflict: bool = False


@dataclass(frozen=True)
class SnapshotRow:
    """One sample as an update sees it: its blob and the label that counts (None: unlabeled)."""

    sample_id: int
    sha256: str
    camera_id: str
    label: str | None
    source: LabelSource | None
    label_id: int = 0  # the effective label's row id (0: unlabeled); a correction gets a higher one


@dataclass(frozen=True)
class Snapshot:
    """Every sample up to `max_sample_id`, read in one transaction, ordered by sample id.

    `max_label_id` is the newest label row the snapshot saw: the next update's watermark for corrections.
    """

    rows: tuple[SnapshotRow, ...]
    max_sample_id: int
    max_label_id: int = 0

    @property
    def human(self) -> list[SnapshotRow]:
        """Samples labeled by an operator or a camera."""
        return [r for r in self.rows if r.source in (LabelSource.OPERATOR, LabelSource.CAMERA)]

    @property
    def unlabeled(self) -> list[SnapshotRow]:
        """Samples without a human label (pseudo-labeled ones included: the teacher labels them again)."""
        return [r for r in self.rows if r.source not in (LabelSource.OPERATOR, LabelSource.CAMERA)]


@dataclass(frozen=True)
class PseudoLabel:
    """A teacher's label for a sample that has no human label."""

    sample_id: int
    class_name: str
    confidence: float
    model_version: str


@dataclass(frozen=True)
class StoreCounts:
    samples: int
    unlabeled: int
    blobs: int
    blob_bytes: int


class Store:
    """Opens (and migrates) the database and the blob folder; writes ingest batches durably."""

    def __init__(self, engine: Engine, blobs: BlobStore, *, batch_sql: BatchSQL | None = None) -> None:
        self.engine = engine
        self.blobs = blobs
        self._batch_sql = batch_sql or batch_sql_for(engine.dialect.name)

    @classmethod
    def open(cls, database_url: str, blob_root: Path, *, migrate_schema: bool = True) -> Store:
        """Open a store; migrate its schema to the newest revision unless told not to."""
        engine = create_store_engine(database_url)
        if migrate_schema:
            migrate(engine)
        else:
            check_known_revision(engine)
            if current_revision(engine) != head_revision(engine):
                raise RuntimeError(
                    f"the store's schema is at {current_revision(engine)!r}, this version needs "
                    f"{head_revision(engine)!r}: run `cl-service migrate`"
                )
        return cls(engine, BlobStore(blob_root))

    @property
    def backend(self) -> str:
        return self.engine.url.get_backend_name()

    def close(self) -> None:
        self.blobs.close()
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def ping(self) -> None:
        """Raise when the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    # ---------------------------------------------------------------------------------------- ingest

    def add_samples(self, batch: Sequence[NewSample]) -> list[StoredSample]:
        """Store a batch durably in one transaction; return one StoredSample per item, in order.

        Idempotent: an item whose (camera_id, request_id) is already stored, or appears earlier in the
        batch, is answered with the original sample and stores nothing.
        """
        try:
            return self._add_samples(batch)
        except IntegrityError:
            # Another process stored one of these keys between our lookup and our insert: retry one
            # by one so that each item gets the winner's sample id.
            log.info("ingest batch raced with another writer; retrying item by item")
            return [self._add_samples([item])[0] for item in batch]

    def _add_samples(self, batch: Sequence[NewSample]) -> list[StoredSample]:
        existing = self._existing_keys(batch)
        results: list[StoredSample | None] = [None] * len(batch)
        first_in_batch: dict[tuple[str, str], int] = {}
        new_items: list[tuple[int, NewSample]] = []
        for position, item in enumerate(batch):
            key = (item.camera_id, item.request_id)
            if key in existing:
                sample_id, sha = existing[key]
                results[position] = StoredSample(sample_id, sha, created=False, conflict=sha != item.sha256)
            elif key in first_in_batch:
                continue  # answered below, once the first one has its id
            else:
                first_in_batch[key] = position
                new_items.append((position, item))
        if new_items:
            ids = self._insert_new([item for _, item in new_items])
            for (position, item), sample_id in zip(new_items, ids, strict=True):
                results[position] = StoredSample(sample_id, item.sha256, created=True)
        for position, item in enumerate(batch):
            if results[position] is None:
                first = results[first_in_batch[(item.camera_id, item.request_id)]]
                assert first is not None
                results[position] = StoredSample(
                    first.sample_id, first.sha256, created=False, conflict=first.sha256 != item.sha256
                )
        return [result for result in results if result is not None]

    def _existing_keys(self, batch: Sequence[NewSample]) -> dict[tuple[str, str], tuple[int, str]]:
        with self.engine.connect() as connection:
            return self._batch_sql.existing_samples(connection, SAMPLES, {(i.camera_id, i.request_id) for i in batch})

    def _insert_new(self, items: Sequence[NewSample]) -> list[int]:
        """Append unseen blobs (one fsync), then commit blob index, samples and labels together."""
        now = utcnow()
        sql = self._batch_sql
        with self.engine.begin() as connection:
            known = sql.known_blobs(connection, BLOBS, {item.sha256 for item in items})
            unseen: dict[str, bytes] = {}
            for item in items:
                if item.sha256 not in known:
                    unseen.setdefault(item.sha256, item.data)
            if unseen:
                locations = self.blobs.append_many(list(unseen.items()))
                blob_rows = [
                    {"sha256": loc.sha256, "segment": loc.segment, "offset": loc.offset, "length": loc.length}
                    for loc in locations
                ]
                sql.insert_rows(connection, BLOBS, [{**row, "created_at": now} for row in blob_rows])
            ids = sql.insert_samples(connection, SAMPLES, [_sample_row(item, now) for item in items])
            labeled = [(sid, item) for sid, item in zip(ids, items, strict=True) if item.label]
            if labeled:
                self.ensure_classes(connection, {item.label for _, item in labeled if item.label}, now)
                label_rows = [
                    {
                        "sample_id": sid,
                        "class_name": item.label,
                        "source": LabelSource.CAMERA.value,
                        "confidence": 1.0,
                        "author": item.camera_id,
                        "created_at": now,
                    }
                    for sid, item in labeled
                ]
                sql.insert_rows(connection, LABELS, label_rows)
        return ids

    @staticmethod
    def ensure_classes(
        connection: Any, names: set[str], now: datetime, *, created_by: str = "camera", source: str | None = None
    ) -> None:
        """Create the classes among `names` that do not exist yet (in the caller's transaction)."""
        table = CLASSES
        known = set(connection.execute(select(table.c.name).where(table.c.name.in_(names))).scalars())
        missing = sorted(names - known)
        if missing:
            connection.execute(
                insert(table),
                [
                    {"name": name, "created_at": now, "created_by": created_by, "source": source or created_by}
                    for name in missing
                ],
            )

    # ---------------------------------------------------------------------------------------- reads

    def blob_location(self, sha256: str) -> BlobLocation | None:
        with self.session() as session:
            row = session.get(Blob, sha256)
        return None if row is None else BlobLocation(row.sha256, row.segment, row.offset, row.length)

    def read_blob(self, sha256: str, *, verify: bool = False) -> bytes:
        """The bytes of a stored blob (KeyError when no committed row refers to it)."""
        location = self.blob_location(sha256)
        if location is None:
            raise KeyError(f"no blob {sha256}")
        return self.blobs.read(location, verify=verify)

    def get_sample(self, sample_id: int) -> Sample | None:
        with self.session() as session:
            return session.get(Sample, sample_id)

    def labels_of(self, sample_id: int) -> list[Label]:
        """Every label of a sample, newest first."""
        with self.session() as session:
            ids = select(LABELS.c.id).where(LABELS.c.sample_id == sample_id).order_by(LABELS.c.id.desc())
            return [label for label_id in session.scalars(ids) if (label := session.get(Label, label_id))]

    def class_names(self) -> list[str]:
        with self.engine.connect() as connection:
            return list(connection.execute(select(CLASSES.c.name).order_by(CLASSES.c.name)).scalars())

    def counts(self) -> StoreCounts:
        with self.engine.connect() as connection:
            samples = connection.execute(select(func.count()).select_from(SAMPLES)).scalar_one()
            labeled = connection.execute(select(func.count(func.distinct(LABELS.c.sample_id)))).scalar_one()
            blobs, blob_bytes = connection.execute(
                select(func.count(), func.coalesce(func.sum(BLOBS.c.length), 0)).select_from(BLOBS)
            ).one()
        return StoreCounts(samples=samples, unlabeled=samples - labeled, blobs=blobs, blob_bytes=int(blob_bytes))

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Per class, how many samples have their effective label from each source."""
        ranked = self.effective_label_query().subquery()
        query = select(ranked.c.class_name, ranked.c.source, func.count()).group_by(
            ranked.c.class_name, ranked.c.source
        )
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as connection:
            for class_name, source, count in connection.execute(query):
                counts.setdefault(class_name, {s.value: 0 for s in LabelSource})[source] = count
        return counts

    def snapshot(self, *, up_to_sample_id: int | None = None) -> Snapshot:
        """Every sample (up to a sample id) with its effective label, read in one transaction."""
        ranked = self.effective_label_query().subquery()
        query = (
            select(
                SAMPLES.c.id, SAMPLES.c.sha256, SAMPLES.c.camera_id, ranked.c.class_name, ranked.c.source, ranked.c.id
            )
            .select_from(SAMPLES.outerjoin(ranked, ranked.c.sample_id == SAMPLES.c.id))
            .order_by(SAMPLES.c.id)
        )
        if up_to_sample_id is not None:
            query = query.where(SAMPLES.c.id <= up_to_sample_id)
        with self.engine.connect() as connection, connection.begin():
            rows = tuple(
                SnapshotRow(sid, sha, camera, label, LabelSource(source) if source else None, label_id or 0)
                for sid, sha, camera, label, source, label_id in connection.execute(query)
            )
            max_label = connection.execute(select(func.coalesce(func.max(LABELS.c.id), 0))).scalar_one()
        return Snapshot(rows, max((r.sample_id for r in rows), default=0), int(max_label))

    def read_blobs(self, sha256s: Sequence[str], *, verify: bool = False) -> dict[str, bytes]:
        """The bytes of many blobs (KeyError naming the first that no row refers to)."""
        wanted = sorted(set(sha256s))
        locations: dict[str, BlobLocation] = {}
        with self.engine.connect() as connection:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                query = select(BLOBS.c.sha256, BLOBS.c.segment, BLOBS.c.offset, BLOBS.c.length).where(
                    BLOBS.c.sha256.in_(chunk)
                )
                for sha, segment, offset, length in connection.execute(query):
                    locations[sha] = BlobLocation(sha, segment, offset, length)
        missing = [sha for sha in wanted if sha not in locations]
        if missing:
            raise KeyError(f"no blob {missing[0]} ({len(missing)} missing)")
        return {sha: self.blobs.read(location, verify=verify) for sha, location in locations.items()}

    def add_pseudo_labels(self, labels: Sequence[PseudoLabel]) -> int:
        """Append teacher labels; samples that have a human label by now are skipped. Returns how many were added.

        Pseudo-labels never replace a human label: they rank below camera and operator labels, and the
        teacher is never asked about human-labeled samples in the first place.
        """
        if not labels:
            return 0
        now = utcnow()
        human = (LabelSource.OPERATOR.value, LabelSource.CAMERA.value)
        with self.engine.begin() as connection:
            ids = sorted({label.sample_id for label in labels})
            labeled: set[int] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                query = select(LABELS.c.sample_id).where(LABELS.c.sample_id.in_(chunk), LABELS.c.source.in_(human))
                labeled.update(connection.execute(query).scalars())
            rows = [
                {
                    "sample_id": label.sample_id,
                    "class_name": label.class_name,
                    "source": LabelSource.PSEUDO.value,
                    "confidence": float(label.confidence),
                    "model_version": label.model_version,
                    "author": "teacher",
                    "created_at": now,
                }
                for label in labels
                if label.sample_id not in labeled
            ]
            if rows:
                names = {label.class_name for label in labels if label.sample_id not in labeled}
                self.ensure_classes(connection, names, now, created_by="teacher")
                connection.execute(insert(LABELS), rows)
        return len(rows)

    def effective_label(self, sample_id: int) -> Label | None:
        """The label that counts for a sample: operator > camera > pseudo, newest within a source."""
        labels = self.labels_of(sample_id)
        return max(labels, key=lambda label: (PRECEDENCE[LabelSource(label.source)], label.id or 0), default=None)

    @staticmethod
    def effective_label_query() -> Any:
        """One row per labeled sample: its effective label (a window over the append-only history)."""
        rank = case(*[(LABELS.c.source == source.value, value) for source, value in PRECEDENCE.items()], else_=0)
        numbered = select(
            LABELS.c.id,
            LABELS.c.sample_id,
            LABELS.c.class_name,
            LABELS.c.source,
            func.row_number()
            .over(partition_by=LABELS.c.sample_id, order_by=(rank.desc(), LABELS.c.id.desc()))
            .label("position"),
        ).subquery()
        return select(numbered.c.id, numbered.c.sample_id, numbered.c.class_name, numbered.c.source).where(
            numbered.c.position == 1
        )

    def integrity_problems(self, *, verify_bytes: bool = False) -> list[str]:
        """Check the database and that every row's blob is present (and intact with verify_bytes)."""
        problems: list[str] = []
        if self.backend == "sqlite":
            with self.engine.connect() as connection:
                result = connection.execute(text("PRAGMA integrity_check")).scalar_one()
                if result != "ok":
                    problems.append(f"sqlite integrity_check: {result}")
        with self.session() as session:
            for row in session.scalars(select(Blob)):
                location = BlobLocation(row.sha256, row.segment, row.offset, row.length)
                try:
                    self.blobs.read(location, verify=verify_bytes)
                except (OSError, BlobCorruptError) as exc:
                    problems.append(f"blob {row.sha256}: {exc}")
        return problems


def _sample_row(item: NewSample, now: datetime) -> dict[str, Any]:
    return {
        "camera_id": item.camera_id,
        "request_id": item.request_id,
        "sha256": item.sha256,
        "image_format": item.image_format,
        "width": item.width,
        "height": item.height,
        "byte_size": len(item.data),
        "captured_at": item.captured_at or now,
        "received_at": now,
        "metadata": dict(item.metadata),
    }
