"""The anomaly model of a version, and the inspector that scores what the cameras send.

`fit_anomaly` runs in the update worker after a version is accepted: the autoencoder trains on the human-labelled
images of its classes (not the validation split), and is calibrated on the validation split (images the
classifier never trained on), with the new model's embeddings of the replay exemplars as the feature score's
reference set. It is saved into the version's folder (`anomaly/`), so every later update recalibrates (refits)
it together with the classifier.

`Inspector` runs in the server, off the request path: it takes stored samples in id order in small batches, runs
the live version (embeddings and probabilities) and its anomaly model, keeps each sample's latest prediction (what
the review queue ranks and GetSample returns), writes a heatmap for each anomalous image and records it with the
alerts (which group similar images into incidents). It resumes after the newest stored prediction, so a restart
neither loses nor repeats work; a backlog older than `inspect_backlog` samples is skipped at the first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl_service.alerts import AlertBook, Unusual
from cl_service.anomaly.config import AnomalyConfig
from cl_service.anomaly.model import AnomalyModel, CalibrationWarning, FitReport
from cl_service.learning.data import split_validation
from cl_service.learning.model import InspectionModel, preprocess_encoded
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import UpdateSettings
from cl_service.logs import log_failure
from replay_store import runs
from replay_store.exemplars import ReplayBuffer
from replay_store.files import write_atomically
from replay_store.models import PredictionRow, as_utc, utcnow
from replay_store.operator import newest_prediction_sample_id, newest_sample_id, samples_after, save_predictions
from replay_store.store import SnapshotRow, Store

log = logging.getLogger(__name__)

ANOMALY_DIR = "anomaly"
INSPECTOR_LEASE = "inspector"  # one inspector at a time over every process that shares the store
EMBED_BATCH = 64


def embed_and_classify(model: InspectionModel, images: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, D), probabilities (N, C)) of encoded images, in batches."""
    embeddings, probabilities = [], []
    with torch.inference_mode():
        for start in range(0, len(images), EMBED_BATCH):
            batch = preprocess_encoded(list(images[start : start + EMBED_BATCH]), model.config)
            features, logits = model.forward_features_and_logits(batch)
            embeddings.append(features.float().numpy())
            probabilities.append(torch.softmax(logits.float(), dim=1).numpy())
    return np.concatenate(embeddings), np.concatenate(probabilities)


def fit_anomaly(
    store: Store,
    repository: ModelRepository,
    version: str,
    settings: UpdateSettings,
    *,
    target_false_alarm_rate: float = 0.01,
    max_train_images: int = 400,
    config: AnomalyConfig | None = None,
) -> FitReport | None:
    """Fit and save `version`'s anomaly model; None (logged) when there are too few images yet."""
    model = repository.load_model(version)
    human = [row for row in store.snapshot().human if row.label in model.classes]
    train, validation = split_validation(human, settings.val_fraction, settings.val_max_per_class)
    train = balanced_sample(train, max_train_images, random.Random(settings.seed))
    exemplar_ids = {e.sample_id for e in ReplayBuffer(store, settings.replay_budget).load()}
    exemplars = [row for row in human if row.sample_id in exemplar_ids]
    if len(train) < 8 or len(validation) < 4 or not exemplars:
        log.warning(
            "%s: no anomaly model yet (%d training, %d calibration images, %d exemplars)",
            version,
            len(train),
            len(validation),
            len(exemplars),
        )
        return None
    blobs = store.read_blobs(sorted({row.sha256 for row in [*train, *validation, *exemplars]}))
    calibration_images = [blobs[row.sha256] for row in validation]
    calibration_embeddings, _ = embed_and_classify(model, calibration_images)
    exemplar_embeddings, _ = embed_and_classify(model, [blobs[row.sha256] for row in exemplars])
    anomaly = AnomalyModel(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        report = anomaly.fit(
            [blobs[row.sha256] for row in train],
            calibration_images,
            exemplar_embeddings=exemplar_embeddings,
            calibration_embeddings=calibration_embeddings,
            target_false_alarm_rate=target_false_alarm_rate,
            seed=settings.seed,
        )
    for warning in caught:
        log.warning("%s anomaly model: %s", version, warning.message)
    anomaly.save(repository.folder(version) / ANOMALY_DIR)
    log.info(
        "%s anomaly model: %d training images, threshold %.3f from %d calibration images",
        version,
        report.train_images,
        anomaly.threshold,
        len(validation),
    )
    return report


def balanced_sample(rows: Sequence[SnapshotRow], size: int, rng: random.Random) -> list[SnapshotRow]:
    """`size` training rows with every class an equal share: a class with fewer rows has them repeated.

    A class learnt in the last update has a few dozen labels beside hundreds of the old classes; drawn in
    proportion, the autoencoder would hardly see it and keep flagging the very defect operators just labelled.
    """
    by_class: dict[str, list[SnapshotRow]] = {}
    for row in rows:
        by_class.setdefault(row.label or "", []).append(row)
    if not by_class:
        return []
    share = max(1, size // len(by_class))
    chosen: list[SnapshotRow] = []
    for name in sorted(by_class):
        members = by_class[name]
        repeats, rest = divmod(share, len(members))
        chosen += members * repeats + rng.sample(members, rest)
    return chosen


@dataclass
class _Loaded:
    version: str
    model: InspectionModel
    anomaly: AnomalyModel | None


class Inspector:
    def __init__(
        self,
        store: Store,
        repository: ModelRepository,
        alerts: AlertBook,
        heatmaps: Path,
        *,
        batch: int = 32,
        poll_s: float = 1.0,
        backlog: int = 1000,
        lease_s: float = 30.0,
    ) -> None:
        self.store = store
        self.repository = repository
        self.alerts = alerts
        self.heatmaps = heatmaps
        self.batch = batch
        self.poll_s = poll_s
        self.backlog = backlog
        self.inspected = 0
        self._watermark: int | None = None
        self._loaded: _Loaded | None = None
        self._task: asyncio.Task[None] | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.lease_s = lease_s
        self.leading = False  # holds the inspector lease: this one scores, any other waits
        self._renew_at = 0.0  # monotonic time at which the held lease is renewed

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="inspector")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # another process's inspector takes over now, not a lease later
            await asyncio.to_thread(self.release)

    def _hold_lease(self) -> bool:
        """Take or renew the inspector lease; renewed once half of it has passed, not at every idle poll (a write)."""
        if self.leading and time.monotonic() < self._renew_at:
            return True
        if not runs.acquire_lease(self.store, self.owner, self.lease_s, name=INSPECTOR_LEASE):
            self.leading = False
            return False
        if not self.leading:  # (again) the inspector: go on after the newest prediction, whoever wrote it
            self.leading, self._watermark = True, None
        self._renew_at = time.monotonic() + self.lease_s / 2
        return True

    def release(self) -> None:
        """Give the inspector lease up (when held)."""
        if self.leading:
            runs.release_lease(self.store, self.owner, INSPECTOR_LEASE)
            self.leading = False

    async def _loop(self) -> None:
        while True:
            try:
                done = await asyncio.to_thread(self.inspect_batch)
            except Exception as exc:  # noqa: BLE001 - a bad batch or a database hiccup must not end inspection (log_failure logs it)
                log_failure(log, "inspecting stored images failed; trying again", exc)
                done = 0
            if not done:
                await asyncio.sleep(self.poll_s)

    def inspect_batch(self) -> int:
        """Score the next stored samples with the live version; returns how many were scored.

        Only the holder of the inspector lease scores (several servers on one store would record every alert
        twice); it renews the lease once half of it has passed, and another process takes over within `lease_s`
        of it stopping."""
        if not self._hold_lease():
            return 0
        loaded = self._live()
        if loaded is None:
            return 0
        if self._watermark is None:
            newest = newest_prediction_sample_id(self.store)
            self._watermark = newest if newest else max(0, newest_sample_id(self.store) - self.backlog)
        samples = samples_after(self.store, self._watermark, self.batch)
        if not samples:
            return 0
        blobs = self.store.read_blobs(sorted({s.sha256 for s in samples}))
        images = [blobs[s.sha256] for s in samples]
        embeddings, probabilities = embed_and_classify(loaded.model, images)
        scores = None
        anomaly = loaded.anomaly
        if anomaly is not None and not anomaly.uses_features:
            scores = anomaly.score(images)
        elif anomaly is not None and anomaly.embedding_dim == embeddings.shape[1]:
            scores = anomaly.score(images, embeddings)
        classes = loaded.model.classes
        now = utcnow()
        rows: list[PredictionRow] = []
        for i, sample in enumerate(samples):
            order = np.argsort(-probabilities[i], kind="stable")
            top = probabilities[i][order]
            rows.append(
                PredictionRow(
                    sample_id=sample.id or 0,
                    model_version=loaded.version,
                    class_name=classes[int(order[0])],
                    confidence=float(top[0]),
                    margin=float(top[0] - (top[1] if len(top) > 1 else 0.0)),
                    top_classes={classes[int(j)]: float(probabilities[i][j]) for j in order[:5]},
                    anomaly_score=None if scores is None else float(scores.combined[i]),
                    anomaly_threshold=None if scores is None else float(scores.threshold),
                    anomalous=bool(scores is not None and scores.anomalous[i]),
                    created_at=now,
                )
            )
        flagged = [i for i, row in enumerate(rows) if row.anomalous]
        if flagged and loaded.anomaly is not None:
            self.heatmaps.mkdir(parents=True, exist_ok=True)
            for i, png in zip(flagged, loaded.anomaly.heatmaps([images[i] for i in flagged]), strict=True):
                write_atomically(self.heatmaps / f"{rows[i].sample_id}.png", png)
        for i in flagged:
            alert, _ = self.alerts.record(
                Unusual(
                    sample_id=rows[i].sample_id,
                    camera_id=samples[i].camera_id,
                    embedding=embeddings[i],
                    score=float(rows[i].anomaly_score or 0.0),
                    threshold=float(rows[i].anomaly_threshold or 0.0),
                    model_version=loaded.version,
                    seen_at=as_utc(samples[i].received_at),
                )
            )
            rows[i].alert_id = alert.id
        save_predictions(self.store, rows)
        self._watermark = samples[-1].id or self._watermark
        self.inspected += len(rows)
        return len(rows)

    def _live(self) -> _Loaded | None:
        row = self.repository.live()
        if row is None:
            return None
        loaded = self._loaded
        folder = self.repository.folder(row.version) / ANOMALY_DIR
        if loaded is None or loaded.version != row.version:
            loaded = _Loaded(row.version, self.repository.load_model(row.version), None)
        if loaded.anomaly is None and folder.is_dir():  # the worker saves it after the version went live
            try:
                loaded.anomaly = AnomalyModel.load(folder)
            except Exception:
                log.exception("%s: its anomaly model cannot be loaded yet", row.version)
        self._loaded = loaded
        return loaded
