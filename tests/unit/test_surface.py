"""The procedural surface camera: reproducible, labelled as configured, and carrying signal."""

from __future__ import annotations

import io
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cl_service.simulate.surface import (
    DEFECT_TYPES,
    GOOD,
    SurfaceConfig,
    SurfaceGenerator,
    SyntheticImage,
    encode_image,
)

ALL = (GOOD, *DEFECT_TYPES)


def _first_of_each(gen: SurfaceGenerator, per_class: int) -> dict[str, list[SyntheticImage]]:
    found: dict[str, list[SyntheticImage]] = {c: [] for c in gen.config.all_classes}
    index = 0
    while min(len(v) for v in found.values()) < per_class:
        label = gen.label(index)
        if len(found[label]) < per_class:
            found[label].append(gen.sample(index))
        index += 1
    return found


def test_same_index_same_image_in_any_order() -> None:
    gen = SurfaceGenerator(SurfaceConfig(seed=5))
    later = gen.sample(7)
    other = SurfaceGenerator(SurfaceConfig(seed=5))
    first = [other.sample(i) for i in (3, 7, 1)][1]
    assert np.array_equal(later.pixels, first.pixels)
    assert later.label == first.label and later.index == first.index == 7
    assert not np.array_equal(gen.sample(8).pixels, later.pixels)
    assert not np.array_equal(SurfaceGenerator(SurfaceConfig(seed=6)).sample(7).pixels, later.pixels)


def test_shape_dtype_and_layout() -> None:
    img = SurfaceGenerator(SurfaceConfig(width=160, height=96)).sample(0)
    assert img.pixels.shape == (96, 160)
    assert img.pixels.dtype == np.uint8
    assert img.pixels.flags["C_CONTIGUOUS"]
    assert 20 < img.pixels.mean() < 235  # neither black nor blown out


def test_stream_and_iter() -> None:
    gen = SurfaceGenerator(SurfaceConfig(width=64, height=64))
    got = list(gen.stream(start=10, count=3))
    assert [g.index for g in got] == [10, 11, 12]
    assert np.array_equal(got[1].pixels, gen.sample(11).pixels)
    it = iter(gen)
    assert [next(it).index for _ in range(2)] == [0, 1]
    with pytest.raises(ValueError):
        gen.sample(-1)


def test_every_class_can_be_produced_with_valid_names() -> None:
    gen = SurfaceGenerator(SurfaceConfig(width=64, height=64, classes=ALL))
    found = _first_of_each(gen, 1)
    assert set(found) == set(ALL)
    for name, images in found.items():
        assert re.match(r"^[a-z][a-z0-9_]{0,63}$", name)
        assert images[0].label == name


def test_default_weights_give_good_half() -> None:
    gen = SurfaceGenerator(SurfaceConfig())
    counts = Counter(gen.label(i) for i in range(600))
    assert set(counts) == {GOOD, "scratch", "pit", "patch"}
    assert 0.42 < counts[GOOD] / 600 < 0.58
    for defect in ("scratch", "pit", "patch"):
        assert 0.10 < counts[defect] / 600 < 0.24


def test_explicit_weights_are_followed() -> None:
    cfg = SurfaceConfig(classes=(GOOD, "crack", "pit"), class_weights=(1.0, 3.0, 0.0))
    gen = SurfaceGenerator(cfg)
    counts = Counter(gen.label(i) for i in range(500))
    assert counts["pit"] == 0
    assert 0.66 < counts["crack"] / 500 < 0.84


def test_new_defect_appears_only_after_its_start() -> None:
    cfg = SurfaceConfig(new_defect="crack", new_defect_after=300, new_defect_rate=0.25)
    gen = SurfaceGenerator(cfg)
    before = [gen.label(i) for i in range(300)]
    after = [gen.label(i) for i in range(300, 900)]
    assert "crack" not in before
    assert 0.19 < after.count("crack") / len(after) < 0.31
    assert cfg.all_classes == (GOOD, "scratch", "pit", "patch", "crack")


def test_lighting_drift_moves_mean_brightness() -> None:
    still = SurfaceGenerator(SurfaceConfig(width=64, height=64, classes=(GOOD,), drift_period=400))
    drifting = SurfaceGenerator(
        SurfaceConfig(width=64, height=64, classes=(GOOD,), lighting_drift=0.15, drift_period=400)
    )
    # a quarter period in, the drift is at its brightest; three quarters in, at its darkest
    bright = np.mean([drifting.sample(i).pixels.mean() - still.sample(i).pixels.mean() for i in range(95, 105)])
    dark = np.mean([drifting.sample(i).pixels.mean() - still.sample(i).pixels.mean() for i in range(295, 305)])
    assert bright > 20 and dark < -20
    a, b = drifting.sample(200), drifting.sample(201)  # the drift is smooth: neighbours barely differ
    assert abs(float(a.pixels.mean()) - float(b.pixels.mean())) < 40


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff", "webp"])
def test_encode_image_round_trip(fmt: str) -> None:
    pixels = SurfaceGenerator(SurfaceConfig(width=64, height=48)).sample(3).pixels
    data = encode_image(pixels, fmt)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == {"jpeg": "JPEG"}.get(fmt, fmt.upper())
        back = np.asarray(decoded.convert("L"))
    assert back.shape == pixels.shape
    if fmt in ("png", "bmp", "tiff"):
        assert np.array_equal(back, pixels)
    else:
        assert np.abs(back.astype(int) - pixels.astype(int)).mean() < 8
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    with Image.open(io.BytesIO(encode_image(rgb, fmt))) as decoded_rgb:
        assert decoded_rgb.mode == "RGB" and decoded_rgb.size == (64, 48)


def test_encode_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_image(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        encode_image(np.zeros(8, dtype=np.uint8))
    with pytest.raises(ValueError, match="format"):
        encode_image(np.zeros((8, 8), dtype=np.uint8), "gif")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 16}, "width"),
        ({"height": 5000}, "height"),
        ({"classes": (GOOD, "dent")}, "unknown class"),
        ({"classes": ()}, "at least one"),
        ({"classes": (GOOD, GOOD)}, "repeat"),
        ({"class_weights": (1.0, 1.0)}, "one weight per class"),
        ({"class_weights": (1.0, -1.0, 1.0, 1.0)}, "non-negative"),
        ({"class_weights": (0.0, 0.0, 0.0, 0.0)}, "zero"),
        ({"noise": -0.1}, "noise"),
        ({"lighting_drift": 2.0}, "lighting_drift"),
        ({"new_defect": "scratch"}, "already in classes"),
        ({"new_defect": "dent"}, "not a defect type"),
        ({"new_defect": "good"}, "not a defect type"),
        ({"new_defect": "crack", "new_defect_after": -1}, "new_defect_after"),
        ({"new_defect_rate": 1.5}, "new_defect_rate"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_configs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SurfaceConfig(**kwargs)  # type: ignore[arg-type]


def _local_deviation(pixels: np.ndarray) -> float:
    """How far the most unusual spot strays from its neighbourhood: a band-pass (blur 1 minus
    blur 6, which drops the pixel noise and the illumination) and its largest magnitude."""
    image = Image.fromarray(pixels)
    fine = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    coarse = np.asarray(image.filter(ImageFilter.GaussianBlur(6)), dtype=np.float32)
    return float(np.abs(fine - coarse).max())


def test_defects_carry_signal() -> None:
    gen = SurfaceGenerator(SurfaceConfig(width=128, height=128, classes=ALL, seed=11))
    found = _first_of_each(gen, 12)
    good = np.mean([_local_deviation(s.pixels) for s in found[GOOD]])
    for defect in DEFECT_TYPES:
        score = np.mean([_local_deviation(s.pixels) for s in found[defect]])
        assert score > good * 1.25, (defect, score, good)


def test_fast_enough() -> None:
    gen = SurfaceGenerator(SurfaceConfig(classes=ALL))
    gen.sample(0)
    start = time.perf_counter()
    for i in range(1, 21):
        gen.sample(i)
    per_image = (time.perf_counter() - start) / 20
    assert per_image < 0.05  # generous, so a busy test machine does not fail it; typical is ~2-3 ms
