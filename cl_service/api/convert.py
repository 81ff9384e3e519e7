"""Protobuf <-> core conversions (nothing else happens here)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from cl_service.app import ModelView, SampleView, StatusView
from cl_service.errors import ServiceError, invalid
from cl_service.ingest.service import IngestItem, IngestOutcome, IngestStatus
from cl_service.operator import CorrectionResult, ReviewItem, ReviewReason
from cl_service.v1 import inspection_pb2 as pb
from replay_store.models import AlertEvent as AlertEventRow
from replay_store.models import Label, LabelSource, ModelState, PredictionRow, as_utc
from replay_store.models import UpdateRun as UpdateRunRow

if TYPE_CHECKING:
    from cl_service.serving.live import Classified

_STATUS = {
    IngestStatus.STORED: pb.INGEST_STATUS_STORED,
    IngestStatus.ALREADY_STORED: pb.INGEST_STATUS_ALREADY_STORED,
    IngestStatus.REJECTED: pb.INGEST_STATUS_REJECTED,
}
_MODEL_STATE = {
    ModelState.CANDIDATE.value: pb.MODEL_STATE_CANDIDATE,
    ModelState.ACCEPTED.value: pb.MODEL_STATE_ACCEPTED,
    ModelState.REJECTED.value: pb.MODEL_STATE_REJECTED,
}
_REVIEW_REASON = {
    ReviewReason.LOW_CONFIDENCE: pb.REVIEW_REASON_LOW_CONFIDENCE,
    ReviewReason.ANOMALOUS: pb.REVIEW_REASON_ANOMALOUS,
    ReviewReason.DISAGREEMENT: pb.REVIEW_REASON_DISAGREEMENT,
    ReviewReason.RARE_CLASS: pb.REVIEW_REASON_RARE_CLASS,
}
_SOURCE = {
    LabelSource.OPERATOR: pb.LABEL_SOURCE_OPERATOR,
    LabelSource.CAMERA: pb.LABEL_SOURCE_CAMERA,
    LabelSource.PSEUDO: pb.LABEL_SOURCE_PSEUDO,
}


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(as_utc(value))
    return stamp


def error(exc: ServiceError) -> pb.Error:
    return pb.Error(code=exc.code.value, reason=exc.reason, message=exc.message)


def ingest_item(request: pb.IngestRequest) -> IngestItem:
    captured = request.captured_at.ToDatetime(tzinfo=UTC) if request.HasField("captured_at") else None
    return IngestItem(
        request_id=request.request_id,
        camera_id=request.camera_id,
        image=request.image,
        label=request.label,
        captured_at=captured,
        metadata=dict(request.metadata),
    )


def ingest_reply(
    sequence: int,
    request_id: str,
    outcome: IngestOutcome,
    extra_warnings: list[str],
    prediction: pb.Prediction | None = None,
) -> pb.IngestReply:
    reply = pb.IngestReply(
        request_id=request_id,
        sequence=sequence,
        status=_STATUS[outcome.status],
        sample_id=outcome.sample_id,
        image_sha256=outcome.sha256,
        warnings=[*extra_warnings, *outcome.warnings],
    )
    if outcome.error is not None:
        reply.error.CopyFrom(error(outcome.error))
    if prediction is not None:
        reply.prediction.CopyFrom(prediction)
    return reply


def label(row: Label) -> pb.Label:
    message = pb.Label(
        label_id=row.id or 0,
        class_name=row.class_name,
        source=_SOURCE[LabelSource(row.source)],
        confidence=row.confidence,
        model_version=row.model_version or "",
        author=row.author or "",
        note=row.note or "",
    )
    message.created_at.CopyFrom(timestamp(row.created_at))
    return message


def sample(view: SampleView) -> pb.Sample:
    row = view.sample
    message = pb.Sample(
        sample_id=row.id or 0,
        camera_id=row.camera_id,
        request_id=row.request_id,
        image_sha256=row.sha256,
        image_format=row.image_format,
        width=row.width,
        height=row.height,
        byte_size=row.byte_size,
        metadata=row.meta,
        label_history=[label(item) for item in view.labels],
        image=view.image or b"",
    )
    message.captured_at.CopyFrom(timestamp(row.captured_at))
    message.received_at.CopyFrom(timestamp(row.received_at))
    if view.effective_label is not None:
        message.effective_label.CopyFrom(label(view.effective_label))
    if view.prediction is not None:
        message.prediction.CopyFrom(stored_prediction(view.prediction))
    if view.heatmap_png:
        message.heatmap_png = view.heatmap_png
    return message


def stored_prediction(row: PredictionRow) -> pb.Prediction:
    """A prediction the inspector stored (top classes highest first, anomaly fields where it was scored)."""
    ranked = sorted(row.top_classes.items(), key=lambda item: -item[1])
    message = pb.Prediction(
        class_name=row.class_name,
        confidence=row.confidence,
        top_classes=[pb.ClassScore(class_name=name, probability=p) for name, p in ranked],
        anomalous=row.anomalous,
        model_version=row.model_version,
    )
    if row.anomaly_score is not None:
        message.anomaly_score = row.anomaly_score
        message.anomaly_threshold = row.anomaly_threshold or 0.0
    return message


def review_item(item: ReviewItem) -> pb.ReviewItem:
    view = SampleView(item.sample, [], None, None, item.prediction)
    return pb.ReviewItem(sample=sample(view), priority=item.priority, reasons=[_REVIEW_REASON[r] for r in item.reasons])


def review_reason(value: int) -> ReviewReason | None:
    """The core's reason for a request's filter (UNSPECIFIED: None); unknown numbers are refused."""
    if value == pb.REVIEW_REASON_UNSPECIFIED:
        return None
    for reason, number in _REVIEW_REASON.items():
        if number == value:
            return reason
    raise invalid("REVIEW_REASON_INVALID", f"unknown review reason {value}")


def correction_result(result: CorrectionResult) -> pb.CorrectionResult:
    message = pb.CorrectionResult(sample_id=result.sample_id, accepted=result.label is not None)
    if result.label is not None:
        message.label.CopyFrom(label(result.label))
    if result.error is not None:
        message.error.CopyFrom(error(result.error))
    return message


def status(view: StatusView) -> pb.ServiceStatus:
    message = pb.ServiceStatus(
        server_version=view.server_version,
        samples_total=view.samples_total,
        samples_unlabeled=view.samples_unlabeled,
        blobs_total=view.blobs_total,
        blob_bytes_total=view.blob_bytes_total,
        active_streams=view.active_streams,
        capabilities=list(view.capabilities),
        store_backend=view.store_backend,
        live_model_version=view.live_model_version,
        live_engine=view.live_engine,
        open_alerts=view.open_alerts,
        classes=[
            pb.ClassCount(
                class_name=name,
                operator_labels=counts.get("operator", 0),
                camera_labels=counts.get("camera", 0),
                pseudo_labels=counts.get("pseudo", 0),
            )
            for name, counts in sorted(view.class_counts.items())
        ],
    )
    message.started_at.CopyFrom(timestamp(view.started_at))
    if view.current_update is not None:
        message.current_update.CopyFrom(update_run(view.current_update))
    return message


def prediction(classified: Classified, top_k: int) -> pb.Prediction:
    """The top `top_k` classes (at least one) of a classification, highest first. The anomaly fields stay 0: the
    inspector scores stored images (GetSample, alerts), not Classify calls."""
    order = np.argsort(-classified.probabilities, kind="stable")[: max(1, top_k)]
    best = int(order[0])
    return pb.Prediction(
        class_name=classified.classes[best],
        confidence=float(classified.probabilities[best]),
        top_classes=[
            pb.ClassScore(class_name=classified.classes[int(i)], probability=float(classified.probabilities[int(i)]))
            for i in order
        ],
        model_version=classified.version,
        engine=classified.engine,
    )


def model_version(view: ModelView) -> pb.ModelVersion:
    row = view.row
    message = pb.ModelVersion(
        version=row.version,
        parent_version=row.parent_version or "",
        state=_MODEL_STATE.get(row.state, pb.MODEL_STATE_UNSPECIFIED),
        live=row.live,
        classes=list(row.classes),
        metrics=validation_metrics(row.metrics),
        rejection_reason=row.rejection_reason or "",
        engines=view.engines,
    )
    message.created_at.CopyFrom(timestamp(row.created_at))
    return message


def validation_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The flat validation figures of a version (its gate's candidate scores): accuracy, macro_f1,
    validation_images and accuracy/<class>; {} for a version scored without validation images."""
    candidate = report.get("candidate") or {}
    if not candidate:
        return {}
    flat = {
        "accuracy": float(candidate["accuracy"]),
        "macro_f1": float(candidate["macro_f1"]),
        "validation_images": float(candidate["n"]),
    }
    for name, scores in candidate.get("per_class", {}).items():
        if scores.get("accuracy") is not None:
            flat[f"accuracy/{name}"] = float(scores["accuracy"])
    return flat


_ALERT_STATE = {"open": pb.ALERT_STATE_OPEN, "acknowledged": pb.ALERT_STATE_ACKNOWLEDGED}
_ALERT_EVENT = {
    "opened": pb.ALERT_EVENT_TYPE_OPENED,
    "updated": pb.ALERT_EVENT_TYPE_UPDATED,
    "acknowledged": pb.ALERT_EVENT_TYPE_ACKNOWLEDGED,
}


def alert(snapshot: dict[str, Any]) -> pb.Alert:
    """An alert from its JSON snapshot (`cl_service.alerts.alert_snapshot`)."""
    message = pb.Alert(
        alert_id=int(snapshot.get("id") or 0),
        kind=pb.ALERT_KIND_UNKNOWN_DEFECT if snapshot.get("kind") == "unknown_defect" else pb.ALERT_KIND_UNSPECIFIED,
        state=_ALERT_STATE.get(str(snapshot.get("state")), pb.ALERT_STATE_UNSPECIFIED),
        camera_id=str(snapshot.get("camera_id") or ""),
        count=int(snapshot.get("count") or 0),
        example_sample_ids=[int(i) for i in snapshot.get("example_sample_ids") or []],
        max_score=float(snapshot.get("max_score") or 0.0),
        threshold=float(snapshot.get("threshold") or 0.0),
        model_version=str(snapshot.get("model_version") or ""),
        acknowledged_by=str(snapshot.get("acknowledged_by") or ""),
        note=str(snapshot.get("note") or ""),
    )
    for field in ("first_seen", "last_seen", "acknowledged_at"):
        if snapshot.get(field):
            getattr(message, field).CopyFrom(timestamp(datetime.fromisoformat(snapshot[field])))
    return message


def alert_event(event: AlertEventRow) -> pb.AlertEvent:
    message = pb.AlertEvent(
        cursor=str(event.id), type=_ALERT_EVENT.get(event.event_type, pb.ALERT_EVENT_TYPE_UNSPECIFIED)
    )
    message.alert.CopyFrom(alert(event.alert))
    message.at.CopyFrom(timestamp(event.created_at))
    return message


_TRIGGER = {
    "schedule": pb.UPDATE_TRIGGER_SCHEDULE,
    "manual": pb.UPDATE_TRIGGER_MANUAL,
    "new_labels": pb.UPDATE_TRIGGER_NEW_LABELS,
    "alerts": pb.UPDATE_TRIGGER_ALERTS,
}
_UPDATE_STATE = {
    "queued": pb.UPDATE_STATE_QUEUED,
    "running": pb.UPDATE_STATE_RUNNING,
    "succeeded": pb.UPDATE_STATE_SUCCEEDED,
    "rejected": pb.UPDATE_STATE_REJECTED,
    "failed": pb.UPDATE_STATE_FAILED,
    "skipped": pb.UPDATE_STATE_SKIPPED,
}


def update_run(run: UpdateRunRow) -> pb.UpdateRun:
    message = pb.UpdateRun(
        run_id=run.id or 0,
        trigger=_TRIGGER.get(run.trigger, pb.UPDATE_TRIGGER_UNSPECIFIED),
        state=_UPDATE_STATE.get(run.state, pb.UPDATE_STATE_UNSPECIFIED),
        requested_by=run.requested_by or "",
        parent_version=run.parent_version or "",
        candidate_version=run.candidate_version or "",
        reason=run.reason or "",
    )
    for field in ("created_at", "started_at", "finished_at"):
        value = getattr(run, field)
        if value is not None:
            getattr(message, field).CopyFrom(timestamp(value))
    return message


def update_progress(run: UpdateRunRow) -> pb.UpdateProgress:
    progress = run.progress or {}
    message = pb.UpdateProgress(
        run_id=run.id or 0,
        state=_UPDATE_STATE.get(run.state, pb.UPDATE_STATE_UNSPECIFIED),
        stage=str(progress.get("stage") or run.state),
        step=int(progress.get("step") or 0),
        total_steps=int(progress.get("total_steps") or 0),
        loss=float(progress.get("loss") or 0.0),
        eta_seconds=float(progress.get("eta_s") or 0.0),
        message=run.reason
        if run.reason and run.state in ("rejected", "failed")
        else str(progress.get("message") or ""),
    )
    message.at.CopyFrom(timestamp(run.heartbeat_at or run.finished_at or run.started_at or run.created_at))
    return message
