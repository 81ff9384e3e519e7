"""Procedural greyscale camera images of brushed/ground metal, with drawn surface defects.

`cl-service simulate` needs an endless, labelled and reproducible camera stream without
shipping real images. Each image is a pure function of (seed, index): a directional streak
texture, a slow illumination field and grain noise, plus at most one defect (scratch, pit,
patch, crack or inclusion) at a random place, size, orientation and contrast. The stream can
also drift in lighting and start showing a defect type it never showed before, which is what
the continual-learning and unknown-defect paths of the service must cope with.

numpy and Pillow only; one 224x224 image takes about a millisecond on one CPU core.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

GOOD = "good"
DEFECT_TYPES: tuple[str, ...] = ("scratch", "pit", "patch", "crack", "inclusion")
KNOWN_CLASSES: tuple[str, ...] = (GOOD, *DEFECT_TYPES)

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]
_Rng = np.random.Generator

_KU, _KV, _KC = 4096, 256, 16  # streak base: columns across streaks, rows along them, control rows
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "tif": "TIFF", "webp": "WEBP"}


@dataclass(frozen=True)
class SurfaceConfig:
    """What the simulated camera shows. Sizes are pixels; noise and drift are on a 0..1 scale.

    `class_weights=None` gives `good` half the images and splits the rest evenly (or splits
    evenly over all classes when `good` is not among them). `lighting_drift=0.1` moves the mean
    brightness by up to about +-25 grey levels (and contrast by +-10%) over `drift_period` images.
    From image `new_defect_after` on, a `new_defect_rate` fraction shows `new_defect`.
    """

    width: int = 224
    height: int = 224
    classes: tuple[str, ...] = (GOOD, "scratch", "pit", "patch")
    class_weights: tuple[float, ...] | None = None
    noise: float = 0.03
    lighting_drift: float = 0.0
    drift_period: int = 1000
    new_defect: str | None = None
    new_defect_after: int = 0
    new_defect_rate: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 32 <= value <= 4096:
                raise ValueError(f"{name} must be an integer from 32 to 4096 pixels, got {value!r}")
        if not self.classes:
            raise ValueError("classes must name at least one class")
        for cls in self.classes:
            if cls not in KNOWN_CLASSES:
                raise ValueError(f"unknown class {cls!r}; known classes: {', '.join(KNOWN_CLASSES)}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must not repeat a name: {self.classes}")
        if self.class_weights is not None:
            if len(self.class_weights) != len(self.classes):
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} values but classes "
                    f"has {len(self.classes)}; give one weight per class"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.class_weights):
                raise ValueError(f"class_weights must be finite and non-negative: {self.class_weights}")
            if sum(self.class_weights) <= 0:
                raise ValueError("class_weights must not all be zero")
        for name in ("noise", "lighting_drift", "new_defect_rate"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be from 0 to 1, got {value!r}")
        if self.drift_period < 1:
            raise ValueError(f"drift_period must be at least 1 image, got {self.drift_period}")
        if self.new_defect is not None:
            if self.new_defect not in DEFECT_TYPES:
                raise ValueError(
                    f"new_defect {self.new_defect!r} is not a defect type; known: {', '.join(DEFECT_TYPES)}"
                )
            if self.new_defect in self.classes:
                raise ValueError(
                    f"new_defect {self.new_defect!r} is already in classes; "
                    "a new defect must be one the stream has not shown"
                )
        if self.new_defect_after < 0:
            raise ValueError(f"new_defect_after must be >= 0, got {self.new_defect_after}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def all_classes(self) -> tuple[str, ...]:
        """Every label the stream can produce: `classes`, then `new_defect` if set."""
        return self.classes + ((self.new_defect,) if self.new_defect else ())

    def probabilities(self) -> tuple[float, ...]:
        """The normalised probability of each of `classes` (before any new defect)."""
        if self.class_weights is not None:
            weights = list(self.class_weights)
        elif GOOD in self.classes and len(self.classes) > 1:
            rest = 0.5 / (len(self.classes) - 1)
            weights = [0.5 if c == GOOD else rest for c in self.classes]
        else:
            weights = [1.0] * len(self.classes)
        total = sum(weights)
        return tuple(w / total for w in weights)


@dataclass(frozen=True, eq=False)
class SyntheticImage:
    """One rendered camera image: `pixels` is uint8, HxW, C-contiguous."""

    pixels: U8
    label: str
    index: int


@dataclass
class _Texture:
    image: F32  # the surface so far, grey levels 0..255 (not yet clipped)
    streak: F32  # the directional streak layer inside `image`, so a patch can damp it
    theta: float  # streak direction, radians


class SurfaceGenerator:
    """Renders image `index` of the stream described by a `SurfaceConfig`, deterministically."""

    def __init__(self, config: SurfaceConfig) -> None:
        self.config = config
        self._h, self._w = config.height, config.width
        self._s = min(self._h, self._w) / 224.0
        self._xs = np.arange(self._w, dtype=np.float32)[None, :]
        self._ys = np.arange(self._h, dtype=np.float32)[:, None]
        self._probs = np.asarray(config.probabilities(), dtype=np.float64)
        base_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1,)))
        self._base = _streak_base(base_rng).ravel()
        self._draw: dict[str, Callable[[_Texture, _Rng], None]] = {
            "scratch": self._scratch,
            "pit": self._pit,
            "patch": self._patch,
            "crack": self._crack,
            "inclusion": self._inclusion,
        }

    # ---- the stream -------------------------------------------------------------------------

    def label(self, index: int) -> str:
        """The label of image `index`, without rendering it."""
        return self._label(self._rng(index), index)

    def sample(self, index: int) -> SyntheticImage:
        """Render image `index`; the same (seed, index) always gives the same pixels and label."""
        cfg = self.config
        rng = self._rng(index)
        label = self._label(rng, index)
        tex = self._texture(rng)
        if label != GOOD:
            self._draw[label](tex, rng)
        img = _blur3(tex.image)  # camera optics: also softens nearest-neighbour streak edges
        if cfg.lighting_drift > 0:
            phase = 2.0 * math.pi * index / cfg.drift_period
            gain = 1.0 + cfg.lighting_drift * math.sin(phase + 1.3)
            img = (img - 128.0) * gain + (128.0 + 255.0 * cfg.lighting_drift * math.sin(phase))
        if cfg.noise > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(255.0 * cfg.noise)
        pixels = np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        return SyntheticImage(pixels=pixels, label=label, index=index)

    def stream(self, start: int = 0, count: int | None = None) -> Iterator[SyntheticImage]:
        """Images `start`, `start+1`, ...; `count=None` goes on for ever."""
        if start < 0 or (count is not None and count < 0):
            raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
        index = start
        while count is None or index < start + count:
            yield self.sample(index)
            index += 1

    def __iter__(self) -> Iterator[SyntheticImage]:
        return self.stream()

    def _rng(self, index: int) -> _Rng:
        if index < 0:
            raise ValueError(f"image index must be >= 0, got {index}")
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.config.seed, index])))

    def _label(self, rng: _Rng, index: int) -> str:
        cfg = self.config
        u = rng.random()  # always drawn, so the rest of the draws do not depend on the config
        if cfg.new_defect is not None and index >= cfg.new_defect_after and u < cfg.new_defect_rate:
            return cfg.new_defect
        return cfg.classes[int(rng.choice(len(cfg.classes), p=self._probs))]

    # ---- texture ----------------------------------------------------------------------------

    def _streaks(self, theta: float, rng: _Rng) -> F32:
        """Sample the precomputed streak base along direction `theta` at a random offset/scale."""
        c, s = math.cos(theta), math.sin(theta)
        across = (self._ys * c - self._xs * s) * np.float32(rng.uniform(0.6, 1.6) / self._s)
        along = (self._xs * c + self._ys * s) * np.float32(rng.uniform(0.12, 0.3) / self._s)
        iu = (across + np.float32(rng.uniform(_KU, 2 * _KU))).astype(np.int32) & (_KU - 1)  # powers of 2
        iv = (along + np.float32(rng.uniform(_KV, 2 * _KV))).astype(np.int32) & (_KV - 1)
        return np.take(self._base, (iv << _KU.bit_length() - 1) | iu)

    def _texture(self, rng: _Rng) -> _Texture:
        h, w = self._h, self._w
        theta = 0.5 * math.pi * int(rng.integers(0, 2)) + float(rng.normal(0.0, 0.05))
        streak = self._streaks(theta, rng)
        if rng.random() < 0.4:  # ground metal: a second, fainter set of crossing streaks
            theta2 = theta + float(rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.6))
            streak += np.float32(rng.uniform(0.3, 0.7)) * self._streaks(theta2, rng)
        streak *= np.float32(rng.uniform(3.5, 12.0))
        gx, gy = rng.normal(0.0, 10.0, size=2)
        image = (
            _smooth_field(rng, 4, 4, h, w) * np.float32(rng.uniform(3.0, 14.0))
            + _smooth_field(rng, 12, 12, h, w) * np.float32(rng.uniform(1.0, 5.0))
            + (self._xs * np.float32(gx / w) + self._ys * np.float32(gy / h))
            + np.float32(rng.uniform(85.0, 170.0))
            + streak
        )
        return _Texture(image=image.astype(np.float32), streak=streak, theta=theta)

    # ---- defects ----------------------------------------------------------------------------

    def _canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        canvas = Image.new("L", (self._w, self._h), 0)
        return canvas, ImageDraw.Draw(canvas)

    def _scratch(self, tex: _Texture, rng: _Rng) -> None:
        """A long thin bright or dark line, slightly curved, fading at its ends."""
        d, s = min(self._h, self._w), self._s
        length = rng.uniform(0.35, 0.9) * d
        centre = np.array([rng.uniform(0.2, 0.8) * self._w, rng.uniform(0.2, 0.8) * self._h])
        ang = rng.uniform(0.0, math.pi)
        along, normal = np.array([math.cos(ang), math.sin(ang)]), np.array([-math.sin(ang), math.cos(ang)])
        p0, p2 = centre - along * length / 2, centre + along * length / 2
        p1 = centre + normal * rng.uniform(-0.18, 0.18) * length
        t = np.linspace(0.0, 1.0, 33)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        tm = 0.5 * (t[1:, 0] + t[:-1, 0])
        fills = 255.0 * np.sin(math.pi * tm) ** 0.4 * (0.7 + 0.3 * rng.random(1) * np.cos(tm * rng.uniform(3, 12)))
        canvas, draw = self._canvas()
        width = max(1, round(rng.uniform(1.5, 3.5) * s))
        _polyline(draw, pts, fills, width)
        if rng.random() < 0.3:  # a companion line, as scratches often come in pairs
            _polyline(draw, pts + normal * rng.uniform(2.5, 5.0) * s, fills * 0.5, max(1, width - 1))
        sign = 1.0 if rng.random() < 0.6 else -1.0
        _stamp(tex.image, canvas, 0.4 * s + 0.1, 3.0 * s, 0.45, sign * rng.uniform(35.0, 90.0))

    def _crack(self, tex: _Texture, rng: _Rng) -> None:
        """A dark, jagged, branching thin line."""
        d, s = min(self._h, self._w), self._s
        step = 2.2 * s
        n = max(8, int(rng.uniform(0.3, 0.6) * d / step))
        main = _walk(rng, np.zeros(2), rng.uniform(0.0, 2 * math.pi), n, step)
        paths = [(main, 255.0, max(1, round(rng.uniform(1.5, 3.0) * s)))]
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(n // 5, 4 * n // 5))
            heading = math.atan2(*(main[i + 1] - main[i])[::-1])
            branch = _walk(
                rng,
                main[i],
                heading + float(rng.choice([-1.0, 1.0])) * rng.uniform(0.4, 1.1),
                max(3, int(n * rng.uniform(0.15, 0.45))),
                step,
            )
            paths.append((branch, 210.0, max(1, round(s))))
        allpts = np.concatenate([p for p, _, _ in paths])
        mid = 0.5 * (allpts.min(axis=0) + allpts.max(axis=0))
        target = np.array([rng.uniform(0.25, 0.75) * self._w, rng.uniform(0.25, 0.75) * self._h])
        canvas, draw = self._canvas()
        for pts, fill, width in paths:
            fade = np.linspace(1.0, 0.55, len(pts) - 1) if fill < 255 else np.ones(len(pts) - 1)
            _polyline(draw, pts - mid + target, fill * fade, width)
        _stamp(tex.image, canvas, 0.45 * s, 2.5 * s, 0.4, -rng.uniform(35.0, 85.0))

    def _pit(self, tex: _Texture, rng: _Rng) -> None:
        """A few small dark round spots, shaded as shallow bowls lit from one side."""
        d = min(self._h, self._w)
        spread = rng.uniform(0.04, 0.18) * d
        cx0, cy0 = rng.uniform(0.15, 0.85) * self._w, rng.uniform(0.15, 0.85) * self._h
        light = rng.uniform(0.0, 2 * math.pi)
        lx, ly = np.float32(math.cos(light)), np.float32(math.sin(light))
        depth0 = rng.uniform(30.0, 80.0)
        for _ in range(int(rng.integers(2, 10))):
            r = rng.uniform(0.015, 0.045) * d
            px = float(np.clip(cx0 + rng.normal(0.0, spread), r, self._w - r))
            py = float(np.clip(cy0 + rng.normal(0.0, spread), r, self._h - r))
            ax = np.float32(rng.uniform(0.75, 1.3))
            ys, xs, dx, dy = self._window(px, py, 1.6 * r + 3)
            dn = np.sqrt((dx / ax) ** 2 + (dy * ax) ** 2) / np.float32(r)
            bowl = np.sqrt(np.clip(1.0 - dn**2, 0.0, 1.0))
            edge = np.clip((1.0 - dn) * np.float32(r) + 0.5, 0.0, 1.0)
            depth = depth0 * rng.uniform(0.7, 1.2)
            facing = (dx * lx + dy * ly) / (dn * np.float32(r) + np.float32(1e-3))
            rim = np.float32(0.4 * depth) * facing * np.exp(-(((dn - 1.0) * np.float32(r / 1.3)) ** 2))
            tex.image[ys, xs] += rim - np.float32(depth) * (0.35 * edge + 0.65 * bowl)

    def _inclusion(self, tex: _Texture, rng: _Rng) -> None:
        """A cluster of small elongated specks of foreign material, aligned with the rolling direction."""
        d, s = min(self._h, self._w), self._s
        c, sn = math.cos(tex.theta), math.sin(tex.theta)
        cx0, cy0 = rng.uniform(0.15, 0.85) * self._w, rng.uniform(0.15, 0.85) * self._h
        spread_along = rng.uniform(0.05, 0.2) * d
        spread_across = spread_along * rng.uniform(0.15, 0.4)
        p_dark = 0.85 if rng.random() < 0.7 else 0.2
        contrast = rng.uniform(30.0, 80.0)
        ys, xs, dx, dy = self._window(cx0, cy0, 2.5 * spread_along + 3)
        fc, fs = np.float32(c), np.float32(sn)
        along = (dx * fc + dy * fs) / np.float32(1.3 * spread_along)
        across = (dy * fc - dx * fs) / np.float32(2.0 * spread_across + 3 * s)
        halo = np.exp(-0.5 * (along**2 + across**2))
        tex.image[ys, xs] += np.float32((-1.0 if p_dark > 0.5 else 1.0) * 0.2 * contrast) * halo
        for _ in range(int(rng.integers(5, 21))):
            a, b = rng.normal(0.0, spread_along), rng.normal(0.0, spread_across)
            px = float(np.clip(cx0 + a * c - b * sn, 2, self._w - 3))
            py = float(np.clip(cy0 + a * sn + b * c, 2, self._h - 3))
            half_len, half_wid = rng.uniform(2.5, 9.0) * s, rng.uniform(0.8, 2.4) * s
            ang = tex.theta + rng.normal(0.0, 0.15)
            ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            ys, xs, dx, dy = self._window(px, py, half_len + 3)
            q = np.sqrt(
                ((dx * ca + dy * sa) / np.float32(half_len)) ** 2 + ((dy * ca - dx * sa) / np.float32(half_wid)) ** 2
            )
            m = np.clip((1.0 - q) * np.float32(1.5 * half_wid) + 0.5, 0.0, 1.0)
            sign = -1.0 if rng.random() < p_dark else 1.0
            tex.image[ys, xs] += np.float32(sign * contrast * rng.uniform(0.6, 1.2)) * m

    def _patch(self, tex: _Texture, rng: _Rng) -> None:
        """An irregular larger blotch: brighter or darker, rough instead of streaked."""
        d = min(self._h, self._w)
        r = rng.uniform(0.1, 0.24) * d
        px, py = rng.uniform(0.5 * r, self._w - 0.5 * r), rng.uniform(0.5 * r, self._h - 0.5 * r)
        ys, xs, dx, dy = self._window(px, py, 1.4 * r)
        hh, ww = dy.shape[0], dx.shape[1]
        rot = rng.uniform(0.0, math.pi)
        cr, sr = np.float32(math.cos(rot)), np.float32(math.sin(rot))
        ea, eb = np.float32(r * rng.uniform(0.6, 1.0)), np.float32(r * rng.uniform(0.35, 1.0))
        radial = np.sqrt(((dx * cr + dy * sr) / ea) ** 2 + ((dy * cr - dx * sr) / eb) ** 2)
        field = 1.0 - radial + 0.45 * _smooth_field(rng, 7, 7, hh, ww)
        m = np.clip(field / 0.25, 0.0, 1.0)
        m = m * m * (3.0 - 2.0 * m)  # smoothstep: a soft but definite edge
        rough = _blur3(rng.standard_normal((hh, ww), dtype=np.float32)) * np.float32(
            rng.uniform(4.0, 12.0)
        ) + _smooth_field(rng, max(2, hh // 6), max(2, ww // 6), hh, ww) * np.float32(rng.uniform(4.0, 12.0))
        shift = float(rng.choice([-1.0, 1.0])) * rng.uniform(15.0, 45.0)
        damp = np.float32(rng.uniform(0.5, 1.0))
        tex.image[ys, xs] += m * (np.float32(shift) + rough - damp * tex.streak[ys, xs])

    def _window(self, px: float, py: float, radius: float) -> tuple[slice, slice, F32, F32]:
        """Slices of the image around (px, py), and x/y offsets from it (row and column vectors)."""
        x0, x1 = max(0, int(px - radius)), min(self._w, int(px + radius) + 2)
        y0, y1 = max(0, int(py - radius)), min(self._h, int(py + radius) + 2)
        return (slice(y0, y1), slice(x0, x1), self._xs[:, x0:x1] - np.float32(px), self._ys[y0:y1, :] - np.float32(py))


# ---- helpers --------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _interp(n_small: int, n_big: int, periodic: bool = False) -> F32:
    """An (n_big, n_small) matrix that upsamples with smoothstep weights (C1, no visible creases)."""
    step = n_small / n_big if periodic else (n_small - 1) / n_big
    t = (np.arange(n_big) + (0.0 if periodic else 0.5)) * step
    i0 = np.floor(t).astype(np.int64)
    f = t - i0
    f = f * f * (3.0 - 2.0 * f)
    i1 = (i0 + 1) % n_small if periodic else np.minimum(i0 + 1, n_small - 1)
    m = np.zeros((n_big, n_small), dtype=np.float32)
    rows = np.arange(n_big)
    np.add.at(m, (rows, i0 % n_small), 1.0 - f)
    np.add.at(m, (rows, i1), f)
    m.setflags(write=False)
    return m


def _smooth_field(rng: _Rng, gh: int, gw: int, h: int, w: int) -> F32:
    """A smooth random field of shape (h, w) from a gh x gw grid of standard normal values."""
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return np.asarray(_interp(gh, h) @ grid @ _interp(gw, w).T, dtype=np.float32)


def _streak_base(rng: _Rng) -> F32:
    """The (_KV, _KU) streak pattern all images sample from: persistent fine and wide streaks
    across the columns, whose strength varies slowly down the rows (along the streaks)."""
    kernel = np.ones(5) / 5.0
    persistent = rng.standard_normal(_KU) + 0.8 * np.convolve(rng.standard_normal(_KU), kernel, "same") * 2.0
    ctrl = 0.6 * persistent[None, :] + 0.7 * rng.standard_normal((_KC, _KU))
    base = _interp(_KC, _KV, periodic=True) @ ctrl.astype(np.float32)
    base -= base.mean()
    base /= base.std()
    return np.ascontiguousarray(base, dtype=np.float32)


def _blur3(a: F32) -> F32:
    """Separable [1, 2, 1] / 4 blur with edge padding."""
    p = np.pad(a, 1, mode="edge")
    h = p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]
    return np.asarray((h[:-2] + 2.0 * h[1:-1] + h[2:]) * np.float32(1.0 / 16.0), dtype=np.float32)


def _walk(rng: _Rng, start: npt.NDArray[np.float64], heading: float, n: int, step: float) -> npt.NDArray[np.float64]:
    """A jagged path of n steps: the heading wanders slowly, each step jitters around it."""
    jitter = rng.normal(0.0, 0.5, n)
    wander = np.cumsum(rng.normal(0.0, 0.06, n))
    dev, angles = 0.0, np.empty(n)
    for k in range(n):
        dev = 0.6 * dev + float(jitter[k])
        angles[k] = heading + wander[k] + dev
    steps = step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.asarray(np.vstack([start[None, :], start[None, :] + np.cumsum(steps, axis=0)]), dtype=np.float64)


def _polyline(
    draw: ImageDraw.ImageDraw, pts: npt.NDArray[np.float64], fills: npt.NDArray[np.float64], width: int
) -> None:
    """Draw consecutive segments, each with its own grey level (so a line can fade)."""
    for (x0, y0), (x1, y1), fill in zip(pts[:-1].tolist(), pts[1:].tolist(), fills.tolist(), strict=True):
        draw.line([(x0, y0), (x1, y1)], fill=min(255, max(0, int(fill))), width=width)


def _stamp(image: F32, canvas: Image.Image, sharp: float, halo: float, halo_weight: float, gain: float) -> None:
    """Add `gain` times the drawn canvas, blurred by `sharp` plus a fainter `halo` blur, to the
    image. Only the part of the canvas that holds drawing (plus a margin) is blurred: speed."""
    box = canvas.getbbox()
    if box is None:
        return
    pad = int(3 * max(sharp, halo)) + 2
    x0, y0 = max(0, box[0] - pad), max(0, box[1] - pad)
    x1, y1 = min(canvas.width, box[2] + pad), min(canvas.height, box[3] + pad)
    crop = canvas.crop((x0, y0, x1, y1))
    mask = _soft(crop, sharp) + np.float32(halo_weight) * _soft(crop, halo)
    image[y0:y1, x0:x1] += np.float32(gain) * mask


def _soft(canvas: Image.Image, radius: float) -> F32:
    """The canvas blurred by `radius` pixels, as floats 0..1."""
    blurred = canvas.filter(ImageFilter.GaussianBlur(max(radius, 0.3)))
    return np.asarray(blurred, dtype=np.float32) * np.float32(1.0 / 255.0)


def encode_image(pixels: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """Encode an HxW (grey) or HxWx3 (RGB) uint8 array as png, jpeg, bmp, tiff or webp bytes."""
    key = fmt.lower().lstrip(".")
    if key not in _FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of png, jpeg, bmp, tiff, webp")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 numpy array, got {getattr(pixels, 'dtype', type(pixels))}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)) or 0 in pixels.shape:
        raise ValueError(f"pixels must be HxW or HxWx3, got shape {pixels.shape}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be from 1 to 100, got {quality}")
    image = Image.fromarray(np.ascontiguousarray(pixels))  # uint8 HxW -> L, HxWx3 -> RGB
    buf = io.BytesIO()
    pil_fmt = _FORMATS[key]
    if pil_fmt in ("JPEG", "WEBP"):
        image.save(buf, format=pil_fmt, quality=quality)
    else:
        image.save(buf, format=pil_fmt)
    return buf.getvalue()
