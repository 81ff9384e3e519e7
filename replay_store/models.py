"""The store's tables (SQLModel). Schema changes go through an alembic migration in `migrations/`.

Labels are append-only: a correction adds a row and the history stays. Which label counts is decided
when reading (operator > camera > pseudo, newest within a source), never by overwriting.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel

# SQLite only auto-increments an INTEGER PRIMARY KEY; everywhere else ids are 64-bit.
ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (every timestamp in the store is UTC)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Attach UTC to a naive timestamp read back from SQLite (which drops the zone)."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _id_column() -> Any:
    return Field(default=None, sa_column=Column(ID_TYPE, primary_key=True, autoincrement=True))


def _time_column(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable, index=index))


def _json_column(name: str | None = None) -> Any:
    column = Column(name, JSON, nullable=False) if name else Column(JSON, nullable=False)
    return Field(default_factory=dict, sa_column=column)


class LabelSource(StrEnum):
    """Where a label came from; PRECEDENCE decides which label counts."""

    OPERATOR = "operator"
    CAMERA = "camera"
    PSEUDO = "pseudo"


PRECEDENCE: dict[LabelSource, int] = {LabelSource.OPERATOR: 3, LabelSource.CAMERA: 2, LabelSource.PSEUDO: 1}


class ModelState(StrEnum):
    CANDIDATE = "candidate"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class UpdateState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    REJECTED = "rejected"
    FAILED = "failed"
    SKIPPED = "skipped"


class AlertState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"


class Sample(SQLModel, table=True):
    """One stored image: its blob address, where it came from, and its metadata."""

    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("camera_id", "request_id", name="uq_samples_camera_request"),)

    id: int | None = _id_column()
    camera_id: str = Field(sa_column=Column(String(128), nullable=False, index=True))
    request_id: str = Field(sa_column=Column(String(128), nullable=False))
    sha256: str = Field(sa_column=Column(String(64), ForeignKey("blobs.sha256"), nullable=False, index=True))
    image_format: str = Field(sa_column=Column(String(8), nullable=False))
    width: int
    height: int
    byte_size: int
    captured_at: datetime = _time_column()
    received_at: datetime = _time_column(index=True)
    meta: dict[str, str] = _json_column("metadata")


class Blob(SQLModel, table=True):
    """Where the bytes with a given SHA-256 lie (identical images are stored once)."""

    __tablename__ = "blobs"

    sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    segment: str = Field(sa_column=Column(String(64), nullable=False))
    offset: int = Field(sa_column=Column(BigInteger, nullable=False))
    length: int
    created_at: datetime = _time_column()


class ClassInfo(SQLModel, table=True):
    """A class name the service knows, and who introduced it."""

    __tablename__ = "classes"

    id: int | None = _id_column()
    name: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_at: datetime = _time_column()
    created_by: str = Field(sa_column=Column(String(128), nullable=False))
    source: str = Field(sa_column=Column(String(16), nullable=False))


class Label(SQLModel, table=True):
    """One label of one sample. Append-only: history is never overwritten."""

    __tablename__ = "labels"
    __table_args__ = (Index("ix_labels_sample_source", "sample_id", "source"),)

    id: int | None = _id_column()
    sample_id: int = Field(sa_column=Column(ID_TYPE, ForeignKey("samples.id", ondelete="CASCADE"), nullable=False))
    class_name: str = Field(sa_column=Column(String(64), ForeignKey("classes.name"), nullable=False, index=True))
    source: str = Field(sa_column=Column(String(16), nullable=False))
    confidence: float = 1.0
    model_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    author: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    note: str | None = Field(default=None, sa_column=Column(String(1024), nullable=True))
    created_at: datetime = _time_column(index=True)


class ModelVersionRow(SQLModel, table=True):
    """A trained model version with the configuration and metrics that describe it."""

    __tablename__ = "model_versions"

    version: str = Field(sa_column=Column(String(64), primary_key=True))
    parent_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    classes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    config: dict[str, Any] = _json_column()
    metrics: dict[str, Any] = _json_column()
    rejection_reason: str | None = Field(default=None, sa_column=Column(String(2048), nullable=True))
    created_at: datetime = _time_column()
    activated_at: datetime | None = _time_column(nullable=True)
    live: bool = False
    # set when retention removed the version's folder: the row stays (history, and names are never reused)
    pruned_at: datetime | None = _time_column(nullable=True)


class ModelActivation(SQLModel, table=True):
    """The audit trail of the live version: who made which version live, when, instead of which, and why."""

    __tablename__ = "model_activations"

    id: int | None = _id_column()
    version: str = Field(sa_column=Column(String(64), ForeignKey("model_versions.version"), nullable=False))
    previous_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    requested_by: str = Field(sa_column=Column(String(128), nullable=False))
    reason: str = Field(default="", sa_column=Column(String(2048), nullable=False))
    activated_at: datetime = _time_column()


class UpdateRun(SQLModel, table=True):
    """One incremental update: why it ran, where it got and how it ended."""

    __tablename__ = "update_runs"

    id: int | None = _id_column()
    trigger: str = Field(sa_column=Column(String(16), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    requested_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    reason: str | None = Field(default=None, sa_column=Column(String(2048), nullable=True))  # why rejected/failed
    request_reason: str | None = Field(default=None, sa_column=Column(String(2048), nullable=True))
    parent_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    candidate_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    created_at: datetime = _time_column()
    started_at: datetime | None = _time_column(nullable=True)
    finished_at: datetime | None = _time_column(nullable=True)
    heartbeat_at: datetime | None = _time_column(nullable=True)
    owner: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    progress: dict[str, Any] = _json_column()


class Alert(SQLModel, table=True):
    """An incident of similar unusual images."""

    __tablename__ = "alerts"

    id: int | None = _id_column()
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False, index=True))
    camera_id: str = Field(sa_column=Column(String(128), nullable=False))
    count: int = 1
    example_sample_ids: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    max_score: float = 0.0
    threshold: float = 0.0
    model_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    first_seen: datetime = _time_column()
    last_seen: datetime = _time_column()
    acknowledged_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    acknowledged_at: datetime | None = _time_column(nullable=True)
    note: str | None = Field(default=None, sa_column=Column(String(1024), nullable=True))
    # the mean L2-normalised embedding of the incident's images (float32 bytes): what groups similar images
    centroid: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class AlertEvent(SQLModel, table=True):
    """The alert log; its id is the resume cursor of WatchAlerts. `alert` is the alert as it was after the event."""

    __tablename__ = "alert_events"

    id: int | None = _id_column()
    alert_id: int = Field(sa_column=Column(ID_TYPE, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False))
    event_type: str = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = _time_column()
    alert: dict[str, Any] = _json_column()


class PredictionRow(SQLModel, table=True):
    """The latest prediction for a sample by the inspector (the live model and its anomaly model): what the
    review queue ranks and GetSample returns."""

    __tablename__ = "predictions"

    sample_id: int = Field(
        sa_column=Column(ID_TYPE, ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    )
    model_version: str = Field(sa_column=Column(String(64), nullable=False))
    class_name: str = Field(sa_column=Column(String(64), nullable=False))
    confidence: float
    margin: float  # top-1 minus top-2 probability
    top_classes: dict[str, float] = _json_column()
    anomaly_score: float | None = None
    anomaly_threshold: float | None = None
    anomalous: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, index=True))
    alert_id: int | None = Field(default=None, sa_column=Column(ID_TYPE, nullable=True))
    created_at: datetime = _time_column()


class Lease(SQLModel, table=True):
    """A named lease held by one process until it expires (single-flight jobs across server processes)."""

    __tablename__ = "leases"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    owner: str = Field(sa_column=Column(String(128), nullable=False))
    acquired_at: datetime = _time_column()
    expires_at: datetime = _time_column()


class EmbeddingRow(SQLModel, table=True):
    """The embedding of one sample under one embedding model: the truth the FAISS index file caches.

    `vector` holds `dim` little-endian float32 values, as the model produced them (not normalised).
    Keyed by (sample, model version), so a new backbone's embeddings can be written beside the live ones.
    """

    __tablename__ = "embeddings"
    __table_args__ = (Index("ix_embeddings_model_version_sample", "model_version", "sample_id"),)

    sample_id: int = Field(
        sa_column=Column(ID_TYPE, ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    )
    model_version: str = Field(sa_column=Column(String(64), primary_key=True))
    dim: int
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _time_column()


class ExemplarRow(SQLModel, table=True):
    """A sample kept in the replay buffer, with the logits stored for it (DER++-style distillation).

    `logits` holds float32 values in the order of `logits_classes`; both are NULL until set.
    """

    __tablename__ = "exemplars"

    sample_id: int = Field(
        sa_column=Column(ID_TYPE, ForeignKey("samples.id", ondelete="CASCADE"), primary_key=True, autoincrement=False)
    )
    class_name: str = Field(sa_column=Column(String(64), ForeignKey("classes.name"), nullable=False, index=True))
    strategy: str = Field(sa_column=Column(String(32), nullable=False))
    model_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    selected_at: datetime = _time_column()
    logits: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    logits_classes: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    logits_model_version: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


def _table(model: type[SQLModel]) -> Table:
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table


# The Core tables, for bulk statements that the ORM would only slow down.
SAMPLES = _table(Sample)
BLOBS = _table(Blob)
CLASSES = _table(ClassInfo)
LABELS = _table(Label)
EMBEDDINGS = _table(EmbeddingRow)
EXEMPLARS = _table(ExemplarRow)


class ApiToken(SQLModel, table=True):
    """A bearer token of the API. Only the SHA-256 of the secret is kept (the secret is shown once, when it is
    created); a revoked token keeps its row and its name, so the log of who could do what stays readable."""

    __tablename__ = "api_tokens"

    id: int | None = _id_column()
    name: str = Field(sa_column=Column(String(128), nullable=False, unique=True))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    token_sha256: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_by: str = Field(sa_column=Column(String(128), nullable=False))
    created_at: datetime = _time_column()
    revoked_at: datetime | None = _time_column(nullable=True)
