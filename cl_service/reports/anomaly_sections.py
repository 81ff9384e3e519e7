"""The anomaly part of a version report: the anomaly model's threshold, the scores of the images scored under the
version (by what their human label says about them), and example alerts with heatmaps."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlmodel import col

from cl_service.anomaly.model import META_FILE, AnomalyModel
from cl_service.ingest.images import decode_image, pil_array
from cl_service.inspector import ANOMALY_DIR
from cl_service.reports import charts
from cl_service.reports.html import Html, definitions, esc, image, join, note, table, tag, when
from replay_store.models import Alert, LabelSource, ModelVersionRow, PredictionRow
from replay_store.store import Store

log = logging.getLogger(__name__)

MAX_ALERTS = 6
MAX_EXAMPLES = 3
THUMBNAIL = 200  # pixels, longer side
KNOWN, UNKNOWN, UNLABELED = "known class", "class it does not know", "unlabeled"
HUMAN = (LabelSource.OPERATOR.value, LabelSource.CAMERA.value)


@dataclass(frozen=True)
class Scored:
    """One image's latest prediction under the version, with its human label (None: none)."""

    sample_id: int
    score: float | None
    threshold: float | None
    label: str | None


def anomaly_meta(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """The saved anomaly model's JSON (None) and what to say when there is none."""
    path = folder / ANOMALY_DIR / META_FILE
    if not folder.is_dir():
        return None, "There is no anomaly model for this version: its folder is gone (pruned), and the model with it."
    if not path.exists():
        return None, "There is no anomaly model for this version (too few images when it was trained, or not fitted)."
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"The anomaly model of this version cannot be read: {exc}"
    if not isinstance(meta, dict) or not isinstance(meta.get("calibration"), dict):
        return None, f"{path} is not an anomaly model's description."
    return meta, ""


def scored_under(store: Store, version: str) -> list[Scored]:
    """The images whose latest prediction was made by `version`, with their human label (pseudo-labels: none)."""
    ranked = Store.effective_label_query().subquery()
    query = (
        select(
            col(PredictionRow.sample_id),
            col(PredictionRow.anomaly_score),
            col(PredictionRow.anomaly_threshold),
            ranked.c.class_name,
            ranked.c.source,
        )
        .outerjoin(ranked, ranked.c.sample_id == col(PredictionRow.sample_id))
        .where(col(PredictionRow.model_version) == version)
        .order_by(col(PredictionRow.sample_id))
    )
    with store.session() as session:
        rows = session.execute(query).all()
    return [
        Scored(int(sid), score, limit, name if source in HUMAN else None) for sid, score, limit, name, source in rows
    ]


def group_of(label: str | None, classes: Sequence[str]) -> str:
    if label is None:
        return UNLABELED
    return KNOWN if label in classes else UNKNOWN


def anomaly_section(store: Store, folder: Path, row: ModelVersionRow) -> Html:
    meta, missing = anomaly_meta(folder)
    parts: list[Html] = []
    threshold: float | None = None
    if meta is None:
        parts.append(note(missing))
    else:
        calibration = meta["calibration"]
        threshold = float(calibration["threshold"])
        parts.append(definitions(_calibration_facts(meta)))
    scored = scored_under(store, row.version)
    if not scored:
        parts.append(
            note(
                f"No image has a prediction under {row.version}: the inspector has not scored any with it "
                "(each image keeps only its latest prediction, so a later version's scores replace it)."
            )
        )
        return join(parts)
    recorded = Counter(s.threshold for s in scored if s.threshold is not None)
    if threshold is None and recorded:
        threshold = recorded.most_common(1)[0][0]
        parts.append(note(f"Threshold taken from the predictions: {threshold:.4f}."))
    elif threshold is not None and any(abs(t - threshold) > 1e-6 for t in recorded):
        parts.append(
            note(
                "Some predictions were scored with another threshold than the model's current one: "
                + ", ".join(f"{t:.4f} ({n} images)" for t, n in sorted(recorded.items()))
            )
        )
    classes = list(row.classes)
    groups: dict[str, list[float]] = {KNOWN: [], UNKNOWN: [], UNLABELED: []}
    totals = Counter(group_of(s.label, classes) for s in scored)
    for s in scored:
        if s.score is not None:
            groups[group_of(s.label, classes)].append(float(s.score))
    if any(groups.values()):
        parts.append(image(charts.score_histogram(groups, threshold), f"anomaly scores under {row.version}"))
    else:
        parts.append(
            note(
                f"The {len(scored)} predictions under {row.version} carry no anomaly score (the version had "
                "no anomaly model when they were made)."
            )
        )
    parts.append(_groups_table(groups, totals, threshold))
    parts.append(
        tag(
            "p",
            "Groups by the image's human label: a class this version knows (above the threshold: false alarms, "
            "expected near the target rate), a class it does not know (new defect types: above the threshold is a "
            "detection), or none (pseudo-labels count as none: they are a model's guess). Each image keeps only its "
            "latest prediction.",
        )
    )
    return join(parts)


def _calibration_facts(meta: dict[str, Any]) -> list[tuple[str, object]]:
    calibration: dict[str, Any] = meta["calibration"]
    fit: dict[str, Any] = meta.get("fit") or {}
    facts: list[tuple[str, object]] = [
        ("threshold", f"{float(calibration['threshold']):.4f}"),
        ("target false-alarm rate", f"{float(calibration.get('target_false_alarm_rate', 0)):.2%}"),
        (
            "guaranteed bound",
            f"{float(calibration.get('false_alarm_bound', 0)):.2%}"
            + ("" if calibration.get("meets_target", True) else " (does not meet the target: too few images)"),
        ),
        ("calibration images", calibration.get("calibration_images", "n/a")),
        ("feature score", f"{calibration['exemplars']} exemplars" if calibration.get("exemplars") else "off"),
    ]
    if fit:
        facts.append(("autoencoder", f"{fit.get('train_images', '?')} images, {fit.get('steps', '?')} steps"))
    if calibration.get("calibrated_at"):
        facts.append(("calibrated", str(calibration["calibrated_at"])))
    return facts


def _groups_table(groups: dict[str, list[float]], totals: Counter[str], threshold: float | None) -> Html:
    rows: list[list[object]] = []
    for name, scores in groups.items():
        above = sum(score > threshold for score in scores) if threshold is not None else None
        share = f"{above / len(scores):.1%}" if above is not None and scores else "n/a"
        rows.append([name, totals.get(name, 0), len(scores), "n/a" if above is None else above, share])
    return table(["images with", "images", "scored", "above threshold", "share above"], rows, numeric=(1, 2, 3, 4))


# ---- alerts ------------------------------------------------------------------------------------------------------


def alerts_under(store: Store, version: str) -> tuple[int, list[Alert]]:
    """How many alerts were raised under `version`, and the newest MAX_ALERTS of them."""
    query = select(Alert).where(col(Alert.model_version) == version)
    with store.session() as session:
        alerts = list(session.scalars(query.order_by(col(Alert.first_seen).desc(), col(Alert.id).desc())))
    return len(alerts), alerts[:MAX_ALERTS]


def alerts_section(store: Store, folder: Path, row: ModelVersionRow) -> Html:
    total, alerts = alerts_under(store, row.version)
    if not alerts:
        return note(f"No alerts were raised under {row.version}.")
    shown = f"; the {len(alerts)} newest:" if total > len(alerts) else ":"
    parts = [tag("p", f"{total} {'alert' if total == 1 else 'alerts'} raised under {row.version}{shown}")]
    model: AnomalyModel | None = None
    meta, missing = anomaly_meta(folder)
    if meta is None:
        parts.append(note(missing + " The examples are shown without heatmaps."))
    else:
        try:
            model = AnomalyModel.load(folder / ANOMALY_DIR)
        except Exception as exc:  # noqa: BLE001 - no heatmaps, but the alerts are still worth showing
            parts.append(note(f"The anomaly model cannot be loaded ({exc}): the examples are shown without heatmaps."))
    parts += [_alert(store, alert, model) for alert in alerts]
    return join(parts)


def _alert(store: Store, alert: Alert, model: AnomalyModel | None) -> Html:
    state = alert.state
    title = tag("h3", join([esc(f"Alert #{alert.id}"), tag("span", state, class_=f"badge {state}")]))
    facts: list[tuple[str, object]] = [
        ("camera", alert.camera_id),
        ("images", alert.count),
        ("highest score", f"{alert.max_score:.4f} (threshold {alert.threshold:.4f})"),
        ("first seen", when(alert.first_seen)),
        ("last seen", when(alert.last_seen)),
    ]
    if alert.acknowledged_by:
        facts.append(("acknowledged", f"by {alert.acknowledged_by} at {when(alert.acknowledged_at)}"))
    if alert.note:
        facts.append(("note", alert.note))
    examples = list(alert.example_sample_ids)[:MAX_EXAMPLES]
    shown = _examples(store, examples, model) if examples else note("This alert names no example images.")
    return Html(f'<div class="alert">{join([title, definitions(facts), shown])}</div>')


def _examples(store: Store, sample_ids: Sequence[int], model: AnomalyModel | None) -> Html:
    found: list[tuple[int, bytes]] = []
    figures: dict[int, Html] = {}
    for sample_id in sample_ids:
        sample = store.get_sample(sample_id)
        try:
            if sample is None:
                raise KeyError("no such sample")
            found.append((sample_id, store.read_blob(sample.sha256)))
        except (KeyError, OSError) as exc:
            figures[sample_id] = _caption_only(sample_id, f"not in the store any more ({exc})")
    heatmaps: list[bytes | None] = [None] * len(found)
    problem = "" if model is not None else "no anomaly model"
    if model is not None and found:
        try:
            heatmaps = list(model.heatmaps([data for _, data in found], max_side=THUMBNAIL))
        except (ValueError, RuntimeError) as exc:
            problem = f"heatmaps failed: {exc}"
    for (sample_id, data), heat in zip(found, heatmaps, strict=True):
        figures[sample_id] = _example(sample_id, data, heat, problem)
    return Html(f'<div class="examples">{"".join(figures[s] for s in sample_ids)}</div>')


def _example(sample_id: int, data: bytes, heatmap: bytes | None, problem: str) -> Html:
    try:
        picture = image(thumbnail_png(data), f"sample {sample_id}", css_class="thumb")
    except ValueError as exc:
        return _caption_only(sample_id, f"cannot be decoded ({exc})")
    heat = image(heatmap, f"heatmap of sample {sample_id}", css_class="heatmap") if heatmap else Html("")
    caption = f"sample {sample_id}: image" + (" | heatmap" if heatmap else f" (no heatmap: {problem})")
    return Html(
        f'<figure class="example"><div class="pair">{picture}{heat}</div>'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _caption_only(sample_id: int, why: str) -> Html:
    return Html(f'<figure class="example"><figcaption>{esc(f"sample {sample_id}: {why}")}</figcaption></figure>')


def thumbnail_png(data: bytes, side: int = THUMBNAIL) -> bytes:
    """The encoded image as an 8-bit PNG whose longer side is at most `side` (16-bit and float images scaled)."""
    pixels = pil_array(decode_image(data))
    if pixels.dtype == np.uint16:
        pixels = (pixels // 257).astype(np.uint8)
    elif pixels.dtype.kind == "f":
        pixels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(pixels))
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()
