"""The service core: the store, the group committer and the services, opened and closed in order.

`ServiceCore.open` is the one place where start-up happens; `close` undoes it in reverse. The API
layer (gRPC) and the CLI hold a core; the core knows nothing about them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cl_service import __version__
from cl_service.alerts import AlertBook
from cl_service.config import Settings
from cl_service.errors import ErrorCode, ServiceError
from cl_service.ingest.service import IngestService
from cl_service.scheduler import UpdateScheduler
from replay_store import runs
from replay_store.committer import GroupCommitter
from replay_store.models import Label, ModelVersionRow, PredictionRow, Sample, UpdateRun, utcnow
from replay_store.operator import prediction_of
from replay_store.store import Store

log = logging.getLogger(__name__)

# RPCs built so far; the others answer UNIMPLEMENTED (GetStatus lists these).
CAPABILITIES = (
    "Ingest",
    "GetSample",
    "GetStatus",
    "Classify",
    "ListModels",
    "ActivateModel",
    "SubmitCorrection",
    "ListReviewQueue",
    "WatchAlerts",
    "AcknowledgeAlert",
    "TriggerUpdate",
    "WatchUpdate",
)


@dataclass(frozen=True)
class SampleView:
    """A stored sample with its labels (newest first) and, on request, its bytes."""

    sample: Sample
    labels: list[Label]
    effective_label: Label | None
    image: bytes | None
    prediction: PredictionRow | None = None
    heatmap_png: bytes | None = None


@dataclass(frozen=True)
class StatusView:
    server_version: str
    started_at: datetime
    samples_total: int
    samples_unlabeled: int
    blobs_total: int
    blob_bytes_total: int
    class_counts: dict[str, dict[str, int]]
    active_streams: int
    store_backend: str
    capabilities: tuple[str, ...]
    live_model_version: str
    live_engine: str
    open_alerts: int
    current_update: UpdateRun | None


@dataclass(frozen=True)
class ModelView:
    """A kept model version and the engines it was successfully published on."""

    row: ModelVersionRow
    engines: list[str]


class ServiceCore:
    """Everything the API serves, without the API."""

    def __init__(self, settings: Settings, store: Store, committer: GroupCommitter) -> None:
        self.settings = settings
        self.store = store
        self.committer = committer
        self.ingest = IngestService(settings, committer)
        self.started_at = utcnow()
        self.active_streams = 0
        from cl_service.serving.live import LiveModels  # torch and the engines load with the core, not on import

        self.live = LiveModels(settings, store)
        self.alerts = AlertBook(
            store, group_similarity=settings.alert_group_similarity, group_window_s=settings.alert_group_window_s
        )
        self.updates = UpdateScheduler(settings, store, alerted_since=self.alerts.alerted_since)
        from cl_service.inspector import Inspector  # torch, like LiveModels

        self.inspector = Inspector(
            store,
            self.live.repository,
            self.alerts,
            settings.data_dir / "heatmaps",
            batch=settings.inspect_batch,
            poll_s=settings.inspect_poll_s,
            backlog=settings.inspect_backlog,
        )

    @classmethod
    def open(cls, settings: Settings) -> ServiceCore:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store.open(settings.resolved_database_url, settings.blob_dir)
        committer = GroupCommitter(store, max_batch=settings.commit_max_batch)
        log.info("store open: %s, blobs in %s", store.backend, settings.blob_dir)
        return cls(settings, store, committer)

    def close(self) -> None:
        """Finish queued writes, then release the store (reverse order of open)."""
        self.ingest.close()
        self.committer.close()
        self.store.close()

    def heatmap_path(self, sample_id: int) -> Path:
        """Where the anomaly heatmap (PNG) of a sample is kept, when it has one."""
        return self.inspector.heatmaps / f"{sample_id}.png"

    def get_sample(self, sample_id: int, *, include_image: bool, include_heatmap: bool = False) -> SampleView:
        sample = self.store.get_sample(sample_id)
        if sample is None:
            raise ServiceError(ErrorCode.NOT_FOUND, "SAMPLE_NOT_FOUND", f"there is no sample {sample_id}")
        labels = self.store.labels_of(sample_id)
        image = self.store.read_blob(sample.sha256) if include_image else None
        prediction = prediction_of(self.store, sample_id)
        heatmap = None
        if include_heatmap:
            with contextlib.suppress(FileNotFoundError):
                heatmap = self.heatmap_path(sample_id).read_bytes()
        return SampleView(sample, labels, self.store.effective_label(sample_id), image, prediction, heatmap)

    def status(self) -> StatusView:
        counts = self.store.counts()
        return StatusView(
            server_version=__version__,
            started_at=self.started_at,
            samples_total=counts.samples,
            samples_unlabeled=counts.unlabeled,
            blobs_total=counts.blobs,
            blob_bytes_total=counts.blob_bytes,
            class_counts=self.store.label_counts(),
            active_streams=self.active_streams,
            store_backend=self.store.backend,
            capabilities=CAPABILITIES,
            live_model_version=self.live.slot.version or "",
            live_engine=self.live.engine_name if self.live.slot.version else "",
            open_alerts=self.alerts.open_count(),
            current_update=runs.active(self.store),
        )

    def list_models(self, *, include_rejected: bool) -> list[ModelView]:
        """The kept versions, newest first."""
        from cl_service.serving.publish import engine_records

        repository = self.live.repository
        return [
            ModelView(
                row, sorted(name for name, r in engine_records(repository.folder(row.version)).items() if r.get("ok"))
            )
            for row in repository.versions(include_rejected=include_rejected)
        ]
