"""Our loop on a stream: a folder of class sub-folders sent as a camera stream through ingest, then updates.

`run_ours` starts the real gRPC server on a free loopback port with its own store (SQLite + blob files) in
`data_dir`, and for each class-incremental step sends that step's training images through `CameraClient` (a
seeded `labeled_fraction` of each class with their labels, the rest without), runs `run_update` on the server's
store (the function the scheduler calls) and scores the live model on the step-cut test images. With
`send_unlabeled=False` the unlabeled share is never sent: the same model trained on the labels alone.

`padded_history` makes the history of an update-time measurement bigger without new content: copies of images
with one pixel changed (new bytes, so new samples) that keep their class.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from cl_service.api.server import server_in_thread
from cl_service.client import CameraClient, CameraImage
from cl_service.config import load_settings
from cl_service.evaluation.protocol import (
    AccuracyMatrix,
    Item,
    Result,
    StreamData,
    concat,
    evaluate_model,
    per_class_accuracy,
)
from cl_service.learning.metrics import compare
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import UpdateSettings
from cl_service.learning.update import UpdateResult, UpdateSkippedError, run_update
from replay_store.models import LabelSource
from replay_store.store import Store

Say = Callable[[str], None]


@dataclass(frozen=True)
class StreamPlan:
    """How the training images are sent: which share carries labels (drawn with `seed`), and whether the rest is
    sent at all; `update_seed`, when set, replaces the update settings' seed (the same stream learned again with
    other draws of initialisation, sampling and augmentation), and `classifier` their classifier mode (both modes
    in one run)."""

    labeled_fraction: float = 1.0
    send_unlabeled: bool = True
    seed: int = 0
    camera_id: str = "eval-camera"
    update_seed: int | None = None
    classifier: Literal["trained", "lda"] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.labeled_fraction <= 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1], got {self.labeled_fraction}")
        if self.classifier not in (None, "trained", "lda"):
            raise ValueError(f"classifier must be 'trained' or 'lda', got {self.classifier!r}")


def labeled_subset(items: Sequence[Item], fraction: float, seed: int) -> set[str]:
    """Hashes of a seeded `fraction` of each class's items (at least one per class) that are sent labeled."""
    chosen: set[str] = set()
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    for label in sorted({item.label for item in items}):
        members = sorted(item.sha256 for item in items if item.label == label)
        count = max(1, round(fraction * len(members)))
        chosen.update(members[i] for i in rng.permutation(len(members))[:count])
    return chosen


def send(target: str, items: Sequence[Item], labeled: set[str], camera_id: str) -> None:
    """Stream `items` to the server; every one must be acknowledged as stored (else RuntimeError)."""
    images = [
        CameraImage(image=item.data, label=item.label if item.sha256 in labeled else "", request_id=item.sha256[:32])
        for item in items
    ]
    failed = [r for r in CameraClient(target, camera_id).stream(images) if not r.durable]
    if failed:
        first = failed[0]
        raise RuntimeError(f"{len(failed)} images were rejected, e.g. {first.error_reason}: {first.error_message}")


def run_ours(
    stream: StreamData,
    plan: StreamPlan,
    settings: UpdateSettings,
    data_dir: Path,
    *,
    name: str = "ours",
    say: Say = lambda line: None,
) -> Result:
    """Every step through ingest and one update; the accuracy matrix of the live model after each."""
    labeled = labeled_subset(stream.split.train, plan.labeled_fraction, plan.seed)
    if plan.update_seed is not None:
        settings = settings.model_copy(update={"seed": plan.update_seed})
    if plan.classifier is not None:
        settings = settings.model_copy(update={"classifier": plan.classifier})
    matrix = AccuracyMatrix(len(stream.steps))
    seconds: list[float] = []
    details: list[dict[str, Any]] = []
    # An evaluation keeps its own SQLite store in data_dir, whatever the environment says. It fits no anomaly model,
    # so the inspector would only score images into predictions nobody reads, on the update's cores. It does not
    # change the models: xsdd seed 0 gave the same figures with it (since heads are drawn from the update's own
    # generator; before, its model loads drew from torch's global generator between an update's draws).
    service = load_settings(
        data_dir=data_dir,
        database_url="",
        bind="127.0.0.1:0",
        log_level="WARNING",
        update=settings,
        scheduler=False,
        inspect=False,
    )
    truth = {item.sha256: item.label for item in stream.split.train}
    with server_in_thread(service) as running:
        target = f"127.0.0.1:{running.port}"
        repository = ModelRepository(data_dir / "models", running.core.store)
        final = 0.0
        model: Any = None
        for i, step in enumerate(stream.steps):
            items = [it for it in stream.split.train if it.label in step]
            sent = [it for it in items if plan.send_unlabeled or it.sha256 in labeled]
            send(target, sent, labeled, plan.camera_id)
            before = tuple(model.classes) if model is not None else ()
            start = time.perf_counter()
            try:
                result: UpdateResult | None = run_update(running.core.store, repository, settings)
            except UpdateSkippedError as exc:
                result = None
                say(f"{name} step {i}: no update ({exc})")
            seconds.append(time.perf_counter() - start)
            live = repository.live()
            seen = [c for s in stream.steps[: i + 1] for c in s]
            if live is None:
                per_step: list[float | None] = [0.0 if j <= i else None for j in range(len(stream.steps))]
                final = 0.0
            else:
                model = repository.load_model(live.version).eval()
                final, per_step = evaluate_model(model, stream.test, seen)
            matrix.add(per_step, final)
            details.append(_step_details(i, step, sent, labeled, result, seconds[-1], final))
            details[-1].update(_default_gate(result, before))
            details[-1].update(_pseudo_label_quality(running.core.store, truth))
            say(
                f"{name} step {i} ({', '.join(step)}): {len(sent)} images sent, update {seconds[-1]:.0f} s, "
                f"{'accepted' if result and result.accepted else 'not live'}; accuracy on seen classes {final:.1%}"
            )
    per_class = per_class_accuracy(model, concat(stream.test), stream.class_order) if model is not None else {}
    return Result.of(name, matrix, final, seconds, per_class=per_class, details=details)


def _step_details(
    index: int,
    classes: Sequence[str],
    sent: Sequence[Item],
    labeled: set[str],
    result: UpdateResult | None,
    seconds: float,
    accuracy: float,
) -> dict[str, Any]:
    n_labeled = sum(1 for it in sent if it.sha256 in labeled)
    out: dict[str, Any] = {
        "step": index,
        "classes": list(classes),
        "sent_labeled": n_labeled,
        "sent_unlabeled": len(sent) - n_labeled,
        "update_seconds": seconds,
        "accuracy_seen": accuracy,
        "version": result.version if result else None,
        "accepted": bool(result and result.accepted),
        "reasons": list(result.reasons) if result else [],
        "timings": dict(result.timings) if result else {},
        "counts": dict(result.counts) if result else {},
        "pseudo_accepted": dict(result.pseudo_accepted) if result else {},
    }
    return out


def _default_gate(result: UpdateResult | None, old_classes: Sequence[str]) -> dict[str, Any]:
    """What the default gate (UpdateSettings' tolerance and support) says about this update's candidate, whatever
    gate the evaluation itself ran with: an evaluation may open the gate to measure the learner alone."""
    if result is None or result.candidate is None or result.live is None:
        return {}
    defaults = UpdateSettings()
    decision = compare(
        result.candidate,
        result.live,
        old_classes=list(old_classes),
        tolerance=defaults.gate_tolerance,
        min_support=defaults.gate_min_support,
    )
    return {"default_gate_accepts": decision.accepted, "default_gate_reasons": list(decision.reasons)}


def padded_history(items: Sequence[Item], copies: int) -> list[Item]:
    """`items` plus `copies` variants of each (one pixel changed per variant, re-encoded as PNG): new samples of
    the same class, for measuring how update time depends on the size of the stored history."""
    out = list(items)
    for item in items:
        with Image.open(io.BytesIO(item.data)) as opened:
            pixels = np.array(opened.convert("L") if opened.mode not in ("L", "RGB") else opened)
        for k in range(1, copies + 1):
            variant = pixels.copy()
            variant.flat[k % variant.size] ^= 0x01 << (k % 8)
            buffer = io.BytesIO()
            Image.fromarray(variant).save(buffer, "PNG")
            data = buffer.getvalue()
            out.append(Item(hashlib.sha256(data).hexdigest(), item.label, data))
    return out


def _pseudo_label_quality(store: Store, truth: dict[str, str]) -> dict[str, Any]:
    """How many stored samples carry a pseudo-label as their effective label, and how many of those are right."""
    rows = [row for row in store.snapshot().rows if row.source == LabelSource.PSEUDO]
    right = sum(1 for row in rows if truth.get(row.sha256) == row.label)
    return {"pseudo_labels": len(rows), "pseudo_correct": right}
