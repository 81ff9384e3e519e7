"""Unknown-defect detection: how unusual an image is, and a false-alarm rate chosen from known images alone.

`AnomalyModel` combines an autoencoder's reconstruction error with the distance of the image's embedding to
its nearest exemplar embeddings, and calibrates its alarm threshold conformally on held-out known images.
Guide: docs/anomaly.md. Importing this package loads torch, numpy, PIL and pydantic; faiss, matplotlib and
safetensors are imported when first needed.
"""

from cl_service.anomaly.calibration import ConformalThreshold, Standardiser, conformal_threshold, p_values
from cl_service.anomaly.config import AnomalyConfig
from cl_service.anomaly.metrics import auroc, rate_above
from cl_service.anomaly.model import (
    AnomalyModel,
    AnomalyModelError,
    Calibration,
    CalibrationWarning,
    FitReport,
    Scores,
)
from cl_service.anomaly.novelty import FeatureNovelty
from cl_service.anomaly.split import split_for_calibration

__all__ = [
    "AnomalyConfig",
    "AnomalyModel",
    "AnomalyModelError",
    "Calibration",
    "CalibrationWarning",
    "ConformalThreshold",
    "FeatureNovelty",
    "FitReport",
    "Scores",
    "Standardiser",
    "auroc",
    "conformal_threshold",
    "p_values",
    "rate_above",
    "split_for_calibration",
]
