"""The anomaly model: scores that rank unusual images first, a calibrated false-alarm rate, files, heatmaps, errors.

Images are small synthetic surfaces (a brightness level, machining stripes, a gradient, noise); a defect is a
bright Gaussian blob. Embeddings are synthetic clusters. One tiny autoencoder is trained once for the module.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from cl_service.anomaly import (
    AnomalyConfig,
    AnomalyModel,
    AnomalyModelError,
    CalibrationWarning,
    FeatureNovelty,
    auroc,
    conformal_threshold,
    p_values,
    rate_above,
    split_for_calibration,
)
from cl_service.anomaly.calibration import min_calibration_size
from cl_service.anomaly.images import ImageBatch

SIZE = 48
DIM = 16
SMALL = AnomalyConfig(
    image_size=32,
    channels=(8, 16, 16),
    latent_channels=2,
    epochs=1,
    min_steps=150,
    patch=5,
    error_sigma=1.5,
    neighbours=3,
)

Images = list[npt.NDArray[np.float32]]


def surfaces(
    seed: int,
    n: int,
    *,
    defect: bool = False,
    shape: tuple[int, int] = (SIZE, SIZE),
    at: tuple[float, float] | None = None,
) -> Images:
    """Defect-free surfaces, or the same kind with a bright blob (at a random place, or at `at` = (y, x) in 0..1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    yy, xx = yy / shape[0], xx / shape[1]
    out = []
    for _ in range(n):
        level, frequency, phase = rng.uniform(0.3, 0.6), rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
        image = level + 0.08 * np.sin(2 * np.pi * frequency * xx + phase) + 0.1 * (yy - 0.5) * rng.uniform(-1, 1)
        image = image + rng.normal(0, 0.02, shape)
        if defect:
            cy, cx = at if at is not None else rng.uniform(0.25, 0.75, 2)
            radius = rng.uniform(0.06, 0.1)
            image = image + 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        out.append(np.clip(image, 0, 1).astype(np.float32))
    return out


def cluster_embeddings(seed: int, n: int, *, outlier: bool = False) -> npt.NDArray[np.float32]:
    """Known images: around 3 fixed centres; outliers: in directions far from all of them."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(3, DIM))
    if outlier:
        return rng.normal(size=(n, DIM)).astype(np.float32)
    return (centres[rng.integers(0, 3, n)] + 0.25 * rng.normal(size=(n, DIM))).astype(np.float32)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only wait on each other
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(one_thread: None) -> AnomalyModel:
    """Autoencoder and exemplars from known images, threshold for 5% false alarms on 200 held-out known images."""
    model = AnomalyModel(SMALL)
    model.fit(
        surfaces(1, 200),
        surfaces(2, 200),
        exemplar_embeddings=cluster_embeddings(3, 150),
        calibration_embeddings=cluster_embeddings(4, 200),
        target_false_alarm_rate=0.05,
        seed=0,
    )
    return model


# ---- scores --------------------------------------------------------------------------------------------


def test_the_autoencoder_score_ranks_defects_above_normal_images(fitted: AnomalyModel) -> None:
    normal = fitted.score(surfaces(10, 100), cluster_embeddings(11, 100))
    defective = fitted.score(surfaces(12, 50, defect=True), cluster_embeddings(13, 50))
    assert auroc(normal.autoencoder, defective.autoencoder) > 0.95
    assert auroc(normal.combined, defective.combined) > 0.95
    assert rate_above(defective.combined, fitted.threshold) > 0.8


def test_the_feature_score_ranks_out_of_distribution_embeddings_above_known_ones() -> None:
    novelty = FeatureNovelty(cluster_embeddings(0, 200), neighbours=5)
    known = novelty.score(cluster_embeddings(1, 100))
    unknown = novelty.score(cluster_embeddings(2, 50, outlier=True))
    assert auroc(known, unknown) > 0.99
    assert ((known >= 0) & (known <= 2)).all()


def test_a_query_that_is_an_exemplar_is_not_its_own_neighbour_when_leaving_one_out() -> None:
    exemplars = cluster_embeddings(0, 50)
    novelty = FeatureNovelty(exemplars, neighbours=3)
    assert (novelty.score(exemplars[:5]) < novelty.score(exemplars[:5], leave_one_out=True)).all()
    others = FeatureNovelty(exemplars[1:], neighbours=3)
    assert novelty.score(exemplars[:1], leave_one_out=True) == pytest.approx(others.score(exemplars[:1]), abs=1e-6)
    # Not an exemplar: leaving one out changes nothing.
    fresh = cluster_embeddings(9, 4)
    np.testing.assert_allclose(novelty.score(fresh), novelty.score(fresh, leave_one_out=True), atol=1e-7)


def test_scores_are_consistent_with_the_threshold_and_p_values(fitted: AnomalyModel) -> None:
    images = surfaces(20, 20) + surfaces(21, 10, defect=True)
    scores = fitted.score(
        images, np.concatenate([cluster_embeddings(22, 20), cluster_embeddings(23, 10, outlier=True)])
    )
    assert scores.feature is not None and scores.feature.shape == (30,)
    np.testing.assert_array_equal(scores.anomalous, scores.combined > fitted.threshold)
    assert ((scores.p_value > 0) & (scores.p_value <= 1)).all()
    order = np.argsort(scores.combined)
    assert (np.diff(scores.p_value[order]) <= 1e-12).all()  # higher score, smaller p-value
    c = fitted.calibration
    assert c.combine == "sum" and c.feature_location is not None and c.feature_scale is not None
    ae_z = (scores.autoencoder - c.autoencoder_location) / c.autoencoder_scale
    feature_z = (scores.feature - c.feature_location) / c.feature_scale
    np.testing.assert_allclose(scores.combined, ae_z + feature_z)


# ---- calibration ---------------------------------------------------------------------------------------


def test_the_conformal_threshold_holds_the_false_alarm_rate_on_fresh_known_scores() -> None:
    rng = np.random.default_rng(0)
    rule = conformal_threshold(rng.gamma(2.0, size=999), 0.05)
    assert rule.rank == 950 and rule.meets_target and rule.false_alarm_bound == pytest.approx(0.05)
    assert rate_above(rng.gamma(2.0, size=50_000), rule.threshold) == pytest.approx(0.05, abs=0.015)
    # The guarantee is on average over calibration sets, for any n: here n = 29, alpha = 0.1 -> exactly 3/30.
    rates = [
        rate_above(rng.normal(size=5000), conformal_threshold(rng.normal(size=29), 0.1).threshold) for _ in range(400)
    ]
    assert np.mean(rates) == pytest.approx(0.1, abs=0.01)


def test_the_fitted_threshold_gives_about_the_target_rate_on_fresh_known_images(fitted: AnomalyModel) -> None:
    scores = fitted.score(surfaces(30, 400), cluster_embeddings(31, 400))
    assert fitted.calibration.target_false_alarm_rate == 0.05
    assert fitted.calibration.threshold_images == 140 and fitted.calibration.standardise_images == 60
    assert 0.01 <= scores.anomalous.mean() <= 0.11


def test_too_few_calibration_images_warn_and_record_the_bound_reached(fitted: AnomalyModel) -> None:
    with pytest.warns(CalibrationWarning, match="cannot guarantee"):
        calibration = fitted.recalibrate(surfaces(40, 30), cluster_embeddings(41, 30), target_false_alarm_rate=0.01)
    assert not calibration.meets_target
    assert calibration.false_alarm_bound == pytest.approx(1 / (calibration.threshold_images + 1))
    assert min_calibration_size(0.01) == 99
    fitted.recalibrate(surfaces(2, 200), cluster_embeddings(4, 200), target_false_alarm_rate=0.05)  # as fitted


def test_recalibration_leaves_out_images_the_autoencoder_trained_on(fitted: AnomalyModel) -> None:
    calibration = fitted.recalibrate(surfaces(1, 20) + surfaces(50, 120), cluster_embeddings(51, 140))
    assert calibration.excluded_training_images == 20 and calibration.calibration_images == 140
    with pytest.raises(ValueError, match="did not train on"):
        fitted.recalibrate(surfaces(1, 10), cluster_embeddings(52, 10))
    fitted.recalibrate(surfaces(2, 200), cluster_embeddings(4, 200), target_false_alarm_rate=0.05)  # as fitted


def test_day_one_without_exemplars_then_features_turned_on(one_thread: None) -> None:
    model = AnomalyModel(SMALL.model_copy(update={"min_steps": 60}))
    model.fit(surfaces(60, 60), surfaces(61, 40), target_false_alarm_rate=0.1, seed=1)
    assert not model.uses_features and model.score(surfaces(62, 3)).feature is None
    with pytest.raises(ValueError, match="no exemplar embeddings"):
        model.score(surfaces(62, 3), cluster_embeddings(0, 3))
    model.recalibrate(surfaces(61, 40), cluster_embeddings(63, 40), exemplar_embeddings=cluster_embeddings(64, 50))
    assert model.uses_features and model.embedding_dim == DIM
    assert model.score(surfaces(62, 3), cluster_embeddings(65, 3)).feature is not None


# ---- files and heatmaps --------------------------------------------------------------------------------


def test_save_and_load_give_identical_scores(fitted: AnomalyModel, tmp_path: Path) -> None:
    images, embeddings = surfaces(70, 8) + surfaces(71, 4, defect=True), cluster_embeddings(72, 12)
    before = fitted.score(images, embeddings)
    fitted.save(tmp_path / "anomaly")
    loaded = AnomalyModel.load(tmp_path / "anomaly")
    after = loaded.score(images, embeddings)
    for name in ("autoencoder", "feature", "combined", "p_value", "anomalous"):
        np.testing.assert_array_equal(getattr(before, name), getattr(after, name))
    assert loaded.calibration == fitted.calibration and loaded.config == fitted.config
    meta = json.loads((tmp_path / "anomaly" / "anomaly.json").read_text())
    assert (
        meta["calibration"]["threshold"] == fitted.threshold and meta["calibration"]["target_false_alarm_rate"] == 0.05
    )


def test_a_damaged_or_missing_model_folder_is_refused(fitted: AnomalyModel, tmp_path: Path) -> None:
    with pytest.raises(AnomalyModelError, match="no readable"):
        AnomalyModel.load(tmp_path / "nothing")
    folder = fitted.save(tmp_path / "anomaly")
    tensors = folder / "anomaly.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(AnomalyModelError, match="checksum"):
        AnomalyModel.load(folder)
    with pytest.raises(AnomalyModelError, match="not fitted"):
        AnomalyModel(SMALL).save(tmp_path / "unfitted")


def test_a_heatmap_is_a_png_of_the_image_size_hottest_at_the_defect(fitted: AnomalyModel) -> None:
    shape = (48, 80)  # not square: the heatmap keeps the image's own size
    image = surfaces(80, 1, defect=True, shape=shape, at=(0.3, 0.7))[0]
    png = fitted.heatmaps([image])[0]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(float)
    assert decoded.shape == (*shape, 3)
    hot = (decoded[:, :, 0] - decoded[:, :, 2]) > 50  # turbo: red (hot) minus blue (cold), over the grey image
    assert 0 < hot.mean() < 0.3
    y, x = np.argwhere(hot).mean(axis=0)
    assert abs(y / shape[0] - 0.3) < 0.1 and abs(x / shape[1] - 0.7) < 0.1
    error = fitted.error_maps([image])[0]
    y, x = np.unravel_index(np.argmax(error), error.shape)
    assert abs(y / error.shape[0] - 0.3) < 0.15 and abs(x / error.shape[1] - 0.7) < 0.15
    small = Image.open(io.BytesIO(fitted.heatmaps([image], max_side=40)[0]))
    assert small.size == (40, 24)


def test_images_of_every_accepted_kind_score_the_same(fitted: AnomalyModel) -> None:
    image = surfaces(90, 1)[0]
    as_uint8 = np.rint(image * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(as_uint8).save(buffer, "PNG")
    rgb = np.repeat(as_uint8[:, :, None], 3, axis=2)
    kinds: list[ImageBatch] = [
        [as_uint8],
        [rgb],
        [Image.fromarray(as_uint8)],
        [buffer.getvalue()],
        [torch.from_numpy(as_uint8)],
        torch.from_numpy(as_uint8)[None, None].float() / 255,  # a batch N x C x H x W
        as_uint8[None],  # a batch N x H x W
    ]
    scores = [fitted.score(kind, cluster_embeddings(91, 1)).autoencoder[0] for kind in kinds]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "no images"),
        ([np.full((SIZE, SIZE), np.nan, dtype=np.float32)], "NaN"),
        ([np.full((SIZE, SIZE), 1.5, dtype=np.float32)], "0..1"),
        ([np.zeros((SIZE, SIZE, 2), dtype=np.uint8)], "HxW or HxWxC"),
        ([np.zeros((4, 4), dtype=np.uint8)], "at least 8x8"),
        ([np.zeros((SIZE, SIZE), dtype=np.int32)], "uint8, uint16 or floats"),
        ([b"not an image"], "cannot be decoded"),
        (["a path?"], "numpy array, a tensor"),
        (np.zeros((SIZE, SIZE), dtype=np.uint8), "NxHxW"),
    ],
)
def test_bad_images_raise_clear_errors(fitted: AnomalyModel, images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fitted.score(images, cluster_embeddings(0, 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [
        (None, "pass the embeddings"),
        (np.zeros((2, DIM), dtype=np.float32), "all-zero"),
        (np.full((2, DIM), np.nan, dtype=np.float32), "NaN"),
        (np.ones((2, DIM + 1), dtype=np.float32), "dimensions"),
        (np.ones((3, DIM), dtype=np.float32), "3 embeddings for 2"),
        (np.ones(DIM, dtype=np.float32), r"\(N, D\)"),
    ],
)
def test_bad_embeddings_raise_clear_errors(fitted: AnomalyModel, embeddings: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fitted.score(surfaces(0, 2), embeddings)  # type: ignore[arg-type]


def test_bad_fit_arguments_raise_clear_errors() -> None:
    model = AnomalyModel(SMALL)
    for call in (model.score, model.error_maps, model.heatmaps, model.recalibrate):
        with pytest.raises(AnomalyModelError, match="not fitted"):
            call(surfaces(0, 1))
    with pytest.raises(ValueError, match="together"):
        model.fit(surfaces(0, 4), surfaces(1, 4), exemplar_embeddings=cluster_embeddings(0, 5))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        model.fit(surfaces(0, 4), surfaces(1, 4), target_false_alarm_rate=1.0)
    with pytest.raises(ValueError, match="fewer than the 3 neighbours"):
        model.fit(
            surfaces(0, 4),
            surfaces(1, 4),
            exemplar_embeddings=cluster_embeddings(0, 2),
            calibration_embeddings=cluster_embeddings(1, 4),
        )
    with pytest.raises(ValueError, match="did not train on"):  # calibration images all among the training ones
        model.fit(surfaces(0, 6), surfaces(0, 6))
    with pytest.raises(ValueError, match="divisible"):
        AnomalyConfig(image_size=36, channels=(8, 16, 16))
    assert not model.is_fitted


# ---- helpers -------------------------------------------------------------------------------------------


def test_auroc_counts_ties_as_half_and_matches_pairwise_counting() -> None:
    rng = np.random.default_rng(0)
    known, unknown = rng.integers(0, 5, 40).astype(float), rng.integers(2, 7, 30).astype(float)
    pairwise = np.mean([(u > k) + 0.5 * (u == k) for u in unknown for k in known])
    assert auroc(known, unknown) == pytest.approx(pairwise)
    assert auroc([1.0, 2.0], [3.0]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def test_p_values_are_the_conformal_ranks() -> None:
    np.testing.assert_allclose(p_values([1.0, 2.0, 3.0], [0.0, 2.0, 5.0]), [1.0, 0.75, 0.25])


def test_split_for_calibration_keeps_groups_whole() -> None:
    groups = [i // 6 for i in range(60)]  # ten parts, six exposures each
    train, calibration = split_for_calibration(60, 0.3, seed=1, groups=groups)
    assert len(train) + len(calibration) == 60 and len(calibration) == 18
    assert not {groups[i] for i in train} & {groups[i] for i in calibration}
    assert split_for_calibration(60, 0.3, seed=1, groups=groups)[1].tolist() == calibration.tolist()
    with pytest.raises(ValueError, match="at least 2"):
        split_for_calibration(5, 0.3, groups=[0] * 5)


def test_importing_the_package_leaves_faiss_and_matplotlib_unloaded() -> None:
    code = "import sys, cl_service.anomaly; print(sorted({'faiss', 'matplotlib', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
