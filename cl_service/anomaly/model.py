"""`AnomalyModel`: how unusual an image is, from its pixels and its embedding, and whether to raise an alarm.

Two scores, each standardised against known images the model never trained on, then combined:

- autoencoder: the largest windowed reconstruction error of a small convolutional autoencoder trained on known
  images (`reconstruction.py`);
- feature: 1 - mean cosine similarity of the image's embedding to its k nearest exemplar embeddings
  (`novelty.py`); the caller chooses the embedding model (docs/anomaly.md: a frozen pretrained backbone did
  better than a briefly fine-tuned classifier). Optional: without exemplars (day one, before the first
  classifier) the autoencoder alone decides.

Calibration uses known images only. They are split (seeded) into a part that fixes each score's location and
scale and a part whose combined scores give the conformal threshold for the target false-alarm rate
(`calibration.py`). Calibration images the autoencoder trained on are left out (their errors are too small);
exemplars that are calibration images do not count as their own neighbour. After each classifier update,
`recalibrate` with the new exemplar and calibration embeddings; the autoencoder stays.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from cl_service.anomaly.calibration import (
    ConformalThreshold,
    Standardiser,
    check_rate,
    conformal_threshold,
    min_calibration_size,
    p_values,
)
from cl_service.anomaly.config import AnomalyConfig
from cl_service.anomaly.heatmap import render_heatmap
from cl_service.anomaly.images import ImageBatch, grey_batch, grey_unit, image_list
from cl_service.anomaly.novelty import FeatureNovelty, unit_embeddings
from cl_service.anomaly.reconstruction import (
    Progress,
    build_autoencoder,
    local_error_maps,
    max_scores,
    normalise_intensity,
    train_autoencoder,
    training_steps,
)

Floats = npt.NDArray[np.float64]
FORMAT = "cl-service/anomaly-model"
FORMAT_VERSION = 1
TENSORS_FILE = "anomaly.safetensors"
META_FILE = "anomaly.json"
HEAT_FULL_QUANTILE = 0.9
NOT_FITTED = "the anomaly model is not fitted yet; call fit() or load() first"


class AnomalyModelError(Exception):
    """A saved anomaly model that cannot be read (missing, corrupt, another format), or a model not fitted yet."""


class CalibrationWarning(UserWarning):
    """Too few calibration images to guarantee the target false-alarm rate (the bound reached is recorded)."""


@dataclass(frozen=True)
class Scores:
    """Per image: the raw scores, the combined standardised score, its conformal p-value and the verdict.

    `feature` is None when the model has no exemplars. `anomalous` is `combined > threshold`.
    """

    autoencoder: Floats
    feature: Floats | None
    combined: Floats
    p_value: Floats
    anomalous: npt.NDArray[np.bool_]
    threshold: float


@dataclass(frozen=True)
class Calibration:
    """How the threshold was chosen; saved as JSON beside the weights."""

    target_false_alarm_rate: float
    threshold: float
    rank: int  # the order statistic of the threshold scores used as threshold
    false_alarm_bound: float  # guaranteed for exchangeable known images
    meets_target: bool
    autoencoder_location: float
    autoencoder_scale: float
    feature_location: float | None
    feature_scale: float | None
    combine: str
    calibration_images: int  # given
    excluded_training_images: int  # of those, images the autoencoder trained on (left out)
    standardise_images: int
    threshold_images: int
    exemplars: int  # 0: no feature score
    heat_low: float  # windowed error where heatmap colour starts (the median known image's worst window)
    heat_high: float  # windowed error drawn in full colour (red)
    seed: int
    calibrated_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)


@dataclass(frozen=True)
class FitReport:
    train_images: int
    steps: int
    epochs: int
    losses: tuple[float, ...]
    train_seconds: float
    calibration: Calibration


class AnomalyModel:
    """Scores images for how unusual they are; alarms above a threshold calibrated on known images only."""

    def __init__(self, config: AnomalyConfig | None = None) -> None:
        self.config = config or AnomalyConfig()
        self._net = build_autoencoder(self.config).eval()
        self._novelty: FeatureNovelty | None = None
        self._calibration: Calibration | None = None
        self._reference = np.empty(0, dtype=np.float64)  # sorted combined scores of the threshold images
        self._trained_on: frozenset[str] = frozenset()
        self._fit_info: dict[str, Any] = {}

    # ---- state -----------------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return self._calibration is not None

    @property
    def calibration(self) -> Calibration:
        if self._calibration is None:
            raise AnomalyModelError(NOT_FITTED)
        return self._calibration

    @property
    def threshold(self) -> float:
        return self.calibration.threshold

    @property
    def uses_features(self) -> bool:
        return self._novelty is not None

    @property
    def embedding_dim(self) -> int | None:
        return None if self._novelty is None else self._novelty.dim

    # ---- fitting ---------------------------------------------------------------------------------------

    def fit(
        self,
        train_images: ImageBatch,
        calibration_images: ImageBatch,
        *,
        exemplar_embeddings: npt.ArrayLike | None = None,
        calibration_embeddings: npt.ArrayLike | None = None,
        target_false_alarm_rate: float = 0.01,
        seed: int = 0,
        epochs: int | None = None,
        progress: Progress | None = None,
    ) -> FitReport:
        """Train the autoencoder on `train_images` (known classes, defect-free parts included), then calibrate.

        `calibration_images` are other known images (held out: not trained on, and better not the same parts
        as training images); `calibration_embeddings` are their embeddings, row for row, and
        `exemplar_embeddings` the reference set of the feature score (both or neither). `epochs` overrides
        the config's. Torch uses however many threads the caller set.
        """
        check_rate(target_false_alarm_rate)
        epochs = self.config.epochs if epochs is None else epochs
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        grey, _ = grey_batch(train_images, self.config.image_size)
        inputs = normalise_intensity(grey, self.config.intensity)
        # Validate the calibration inputs before spending time on training.
        calibration_grey, _ = grey_batch(calibration_images, self.config.image_size)
        novelty = _novelty_for(exemplar_embeddings, calibration_embeddings, len(calibration_grey), self.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_autoencoder(self.config)
        started = time.perf_counter()
        losses = train_autoencoder(net, inputs, self.config, seed=seed, epochs=epochs, progress=progress)
        seconds = time.perf_counter() - started
        previous = (self._net, self._trained_on, self._novelty)
        self._net, self._trained_on, self._novelty = net, frozenset(_fingerprints(grey)), novelty
        try:
            calibration = self._calibrate(calibration_grey, calibration_embeddings, target_false_alarm_rate, seed)
        except BaseException:  # a model that cannot be calibrated is not kept: the previous one stays whole
            self._net, self._trained_on, self._novelty = previous
            raise
        steps, _ = training_steps(len(grey), self.config, epochs)
        self._fit_info = {"train_images": len(grey), "steps": steps, "epochs": len(losses), "seed": seed}
        self._fit_info["losses"] = [round(v, 6) for v in losses]
        self._fit_info["train_seconds"] = round(seconds, 3)
        return FitReport(len(grey), steps, len(losses), tuple(losses), seconds, calibration)

    def recalibrate(
        self,
        calibration_images: ImageBatch,
        calibration_embeddings: npt.ArrayLike | None = None,
        *,
        exemplar_embeddings: npt.ArrayLike | None = None,
        target_false_alarm_rate: float | None = None,
        seed: int = 0,
    ) -> Calibration:
        """A new threshold from known held-out images; new exemplars (after a classifier update) when given.

        Passing exemplar embeddings to a model without a feature score turns the feature score on. Without
        them the current exemplars stay, and the calibration embeddings must come from the same embedding
        model as those exemplars. The autoencoder is not retrained.
        """
        current = self.calibration  # AnomalyModelError before the autoencoder is trained
        rate = current.target_false_alarm_rate if target_false_alarm_rate is None else target_false_alarm_rate
        check_rate(rate)
        grey, _ = grey_batch(calibration_images, self.config.image_size)
        if exemplar_embeddings is not None:
            novelty = _novelty_for(exemplar_embeddings, calibration_embeddings, len(grey), self.config)
        else:
            novelty = self._novelty
            _check_embeddings_match(novelty, calibration_embeddings, len(grey), "calibration")
        previous = self._novelty
        self._novelty = novelty
        try:
            return self._calibrate(grey, calibration_embeddings, rate, seed)
        except BaseException:
            self._novelty = previous
            raise

    def _calibrate(self, grey: Tensor, embeddings: npt.ArrayLike | None, rate: float, seed: int) -> Calibration:
        fresh = np.array([fp not in self._trained_on for fp in _fingerprints(grey)], dtype=bool)
        if fresh.sum() < 2:
            raise ValueError(
                f"calibration needs at least 2 known images the autoencoder did not train on; "
                f"got {int(fresh.sum())} of {len(fresh)}"
            )
        ae = self._autoencoder_scores(grey[torch.from_numpy(fresh)])
        feature = None
        if self._novelty is not None and embeddings is not None:
            vectors = unit_embeddings(embeddings, "calibration embeddings", self._novelty.dim)[fresh]
            feature = self._novelty.score(vectors, leave_one_out=True)
        order = np.random.default_rng(seed).permutation(len(ae))
        n_scale = min(len(ae) - 1, max(1, round(self.config.standardise_fraction * len(ae))))
        scale_part, threshold_part = order[:n_scale], order[n_scale:]
        ae_scale = Standardiser.fit(ae[scale_part], "autoencoder scores")
        feature_scale = feature_z = None
        if feature is not None:
            feature_scale = Standardiser.fit(feature[scale_part], "feature scores")
            feature_z = feature_scale(feature)
        combined = _combine(ae_scale(ae), feature_z, self.config.combine)
        rule = conformal_threshold(combined[threshold_part], rate)
        if not rule.meets_target:
            warnings.warn(_too_few(rule), CalibrationWarning, stacklevel=3)
        # Heatmaps: colour starts at the worst window of a typical known image (the median autoencoder score)
        # and is full at the worst window of the 1-in-10 most unusual known images, the same scale for every image.
        heat_low, heat_high = (float(v) for v in np.quantile(ae[threshold_part], [0.5, HEAT_FULL_QUANTILE]))
        if not heat_high > heat_low:
            heat_high = heat_low + max(abs(heat_low), 1.0) * 1e-6
        self._reference = np.sort(combined[threshold_part])
        self._calibration = Calibration(
            target_false_alarm_rate=float(rate),
            threshold=rule.threshold,
            rank=rule.rank,
            false_alarm_bound=rule.false_alarm_bound,
            meets_target=rule.meets_target,
            autoencoder_location=ae_scale.location,
            autoencoder_scale=ae_scale.scale,
            feature_location=None if feature_scale is None else feature_scale.location,
            feature_scale=None if feature_scale is None else feature_scale.scale,
            combine=self.config.combine,
            calibration_images=len(fresh),
            excluded_training_images=int((~fresh).sum()),
            standardise_images=len(scale_part),
            threshold_images=len(threshold_part),
            exemplars=0 if self._novelty is None else self._novelty.count,
            heat_low=heat_low,
            heat_high=heat_high,
            seed=seed,
            calibrated_at=datetime.now(UTC).isoformat(),
        )
        return self._calibration

    # ---- scoring ---------------------------------------------------------------------------------------

    def score(self, images: ImageBatch, embeddings: npt.ArrayLike | None = None) -> Scores:
        """Scores of each image; `embeddings` (row for row) are required when the model uses the feature score."""
        calibration = self.calibration
        grey, _ = grey_batch(images, self.config.image_size)
        _check_embeddings_match(self._novelty, embeddings, len(grey), "scored")
        ae = self._autoencoder_scores(grey)
        feature = None if self._novelty is None or embeddings is None else self._novelty.score(embeddings)
        ae_z = Standardiser(calibration.autoencoder_location, calibration.autoencoder_scale)(ae)
        feature_z = None
        if feature is not None and calibration.feature_location is not None and calibration.feature_scale:
            feature_z = Standardiser(calibration.feature_location, calibration.feature_scale)(feature)
        combined = _combine(ae_z, feature_z, calibration.combine)
        return Scores(
            autoencoder=ae,
            feature=feature,
            combined=combined,
            p_value=p_values(self._reference, combined),
            anomalous=np.asarray(combined > calibration.threshold, dtype=np.bool_),
            threshold=calibration.threshold,
        )

    def error_maps(self, images: ImageBatch) -> npt.NDArray[np.float32]:
        """(N, S, S) windowed error maps at the autoencoder's resolution (an image's score is its map's max)."""
        if not self.is_fitted:
            raise AnomalyModelError(NOT_FITTED)
        grey, _ = grey_batch(images, self.config.image_size)
        return self._local_maps(grey)[:, 0].numpy().astype(np.float32)

    def heatmaps(self, images: ImageBatch, *, max_side: int = 512) -> list[bytes]:
        """One PNG per image: its error map in colour over the image, at the image's size (longer side capped).

        Colour fades in where the windowed error passes the worst window of a typical known image and is full
        (red) at the worst window of the 1-in-10 most unusual known images; elsewhere the image shows through.
        """
        low, high = self.calibration.heat_low, self.calibration.heat_high
        items = image_list(images)
        greys = [grey_unit(image, i) for i, image in enumerate(items)]
        maps = self.error_maps(items)
        return [
            render_heatmap(g, (m - low) / (high - low), max_side=max_side) for g, m in zip(greys, maps, strict=True)
        ]

    def _local_maps(self, grey: Tensor) -> Tensor:
        return local_error_maps(self._net, normalise_intensity(grey, self.config.intensity), self.config)

    def _autoencoder_scores(self, grey: Tensor) -> Floats:
        return np.asarray(max_scores(self._local_maps(grey)).numpy(), dtype=np.float64)

    # ---- files -----------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write `anomaly.safetensors` (weights, exemplars, reference scores) and `anomaly.json` into `folder`.

        Each file is replaced atomically; the JSON, written last, holds the SHA-256 of the tensor file, so a
        crash between the two is detected on load.
        """
        from safetensors.torch import save as safetensors_bytes

        from replay_store.files import write_atomically

        calibration = self.calibration
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"autoencoder.{k}": v.detach().cpu().contiguous() for k, v in self._net.state_dict().items()}
        tensors["reference_scores"] = torch.from_numpy(np.ascontiguousarray(self._reference))
        if self._novelty is not None:
            tensors["exemplars"] = torch.from_numpy(self._novelty.exemplars.copy())
        payload = safetensors_bytes(tensors)
        write_atomically(folder / TENSORS_FILE, payload)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "calibration": calibration.to_dict(),
            "fit": self._fit_info,
            "trained_on": sorted(self._trained_on),
            "tensors_sha256": hashlib.sha256(payload).hexdigest(),
            "torch_version": torch.__version__,
            "saved_at": datetime.now(UTC).isoformat(),
        }
        write_atomically(folder / META_FILE, (json.dumps(meta, indent=1, allow_nan=False) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> AnomalyModel:
        """The model `save` wrote; AnomalyModelError when a file is missing, corrupt or of another format."""
        from safetensors.torch import load as safetensors_load

        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            payload = (folder / TENSORS_FILE).read_bytes()
        except (OSError, ValueError) as exc:
            raise AnomalyModelError(f"no readable anomaly model in {folder}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise AnomalyModelError(f"{folder / META_FILE} is not a {FORMAT} v{FORMAT_VERSION} file")
        if hashlib.sha256(payload).hexdigest() != meta.get("tensors_sha256"):
            raise AnomalyModelError(f"{folder / TENSORS_FILE} does not match the checksum in {META_FILE}")
        try:
            model = cls(AnomalyConfig.from_dict(meta["config"]))
            tensors = safetensors_load(payload)
            state = {k.removeprefix("autoencoder."): v for k, v in tensors.items() if k.startswith("autoencoder.")}
            model._net.load_state_dict(state, strict=True)
            model._net.eval()
            model._calibration = Calibration.from_dict(meta["calibration"])
            model._reference = tensors["reference_scores"].numpy().astype(np.float64)
            if "exemplars" in tensors:
                model._novelty = FeatureNovelty(tensors["exemplars"].numpy(), model.config.neighbours)
            model._trained_on = frozenset(str(fp) for fp in meta["trained_on"])
            model._fit_info = dict(meta.get("fit", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise AnomalyModelError(f"the anomaly model in {folder} is invalid: {exc}") from exc
        return model


# ---- helpers ---------------------------------------------------------------------------------------------


def _novelty_for(
    exemplars: npt.ArrayLike | None, embeddings: npt.ArrayLike | None, count: int, config: AnomalyConfig
) -> FeatureNovelty | None:
    if (exemplars is None) != (embeddings is None):
        raise ValueError("give exemplar_embeddings and calibration_embeddings together (or neither)")
    if exemplars is None:
        return None
    novelty = FeatureNovelty(exemplars, config.neighbours)
    _check_embeddings_match(novelty, embeddings, count, "calibration")
    return novelty


def _check_embeddings_match(
    novelty: FeatureNovelty | None, embeddings: npt.ArrayLike | None, count: int, which: str
) -> None:
    if novelty is None:
        if embeddings is not None:
            raise ValueError("this anomaly model has no exemplar embeddings; pass no embeddings (or recalibrate)")
        return
    if embeddings is None:
        raise ValueError(f"this anomaly model uses a feature score: pass the embeddings of the {which} images")
    rows = unit_embeddings(embeddings, f"embeddings of the {which} images", novelty.dim).shape[0]
    if rows != count:
        raise ValueError(f"{rows} embeddings for {count} {which} images; give one embedding per image")


def _combine(ae: Floats, feature: Floats | None, how: str) -> Floats:
    if feature is None:
        return ae
    if how == "max":
        return np.maximum(ae, feature)
    if how == "sum":
        return np.asarray(ae + feature, dtype=np.float64)
    raise ValueError(f"unknown combination {how!r}")


def _fingerprints(grey: Tensor) -> list[str]:
    """Short content hashes of resized grey images: which calibration images the autoencoder trained on."""
    return [hashlib.sha256(image.numpy().tobytes()).hexdigest()[:32] for image in grey.contiguous()]


def _too_few(rule: ConformalThreshold) -> str:
    need = min_calibration_size(rule.target_rate)
    return (
        f"{rule.n} threshold images cannot guarantee a false-alarm rate of {rule.target_rate:g}: the threshold "
        f"is their largest score, which guarantees only {rule.false_alarm_bound:.3g}; at least {need} are needed "
        "(more calibration images, or a lower standardise_fraction)"
    )
