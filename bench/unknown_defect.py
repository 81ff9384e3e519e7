"""Unknown-defect detection on magnetic_tile: defects the models never saw vs known images, side by side.

The anomaly model (`cl_service.anomaly`) is fitted on known classes only and must flag images of classes held
out as unknown. Measured on ../shared/datasets/magnetic_tile (grey JPEG tiles; classes blowhole, break, crack,
fray, uneven and free = defect-free):

1. Main split: known = free, blowhole, break, uneven; unknown = crack, fray. The known images are split by tile
   (the dataset photographs each tile under about six exposures, `expN_num_M.jpg` with close M: all of a tile's
   images go to one side) and per class into train 50% / calibration 25% / test 25% (seed 0). The autoencoder
   trains on the train images; the feature score's exemplars are the train images' embeddings from the
   service's `InspectionModel` at 96x96 with the pretrained ImageNet EfficientNet-Lite0 backbone (the headline
   figures), and, beside it, from the same model fine-tuned briefly (100 class-balanced steps) on the known
   classes, as the live classifier would be. The threshold comes from the calibration images alone, for a 1%
   false-alarm target. Reported on known test images vs all unknown images: AUROC of the autoencoder, feature
   and combined scores (sum, and max, of the standardised scores), the false-alarm rate on known test images
   and the recall on unknown images at the threshold.
2. Rotation: each of five splits with two defect classes unknown (each class unknown twice), pretrained
   embeddings; the mean AUROCs.
3. The classic setting: autoencoder and exemplars from `free` only, every defect image unknown.
4. What a random split (tiles on both sides) would have reported for the feature score: the leak, measured.

Prints markdown tables and writes bench/results/unknown_defect.json (flat figures).
Run: `python bench/unknown_defect.py` (no arguments; about 5 minutes on 2 cores). Torch uses its default
threads (OMP_NUM_THREADS if set).
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, Figure, machine, markdown_table, write_results

from cl_service.anomaly import AnomalyConfig, AnomalyModel, auroc, rate_above
from cl_service.learning.model import InspectionModel, preprocess
from cl_service.learning.settings import ModelConfig

DATASET = REPO_ROOT.parent / "shared" / "datasets" / "magnetic_tile"
CLASSES = ("blowhole", "break", "crack", "fray", "free", "uneven")
MAIN_UNKNOWN = ("crack", "fray")
ROTATION = (("blowhole", "break"), ("break", "crack"), ("crack", "fray"), ("fray", "uneven"), ("uneven", "blowhole"))
FRACTIONS = (0.50, 0.25, 0.25)  # train / calibration / test, by tile, per known class
TILE_GAP = 300  # frame numbers further apart than this start a new tile (within one class)
TARGET_RATE = 0.01
SEED = 0
FINETUNE_STEPS = 100
FINETUNE_PER_CLASS = 8  # images per class in each fine-tuning batch (class-balanced: `free` is 71% of the images)
EMBED_BATCH = 128

Indices = npt.NDArray[np.int64]


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Dataset:
    images: list[npt.NDArray[np.uint8]]  # grey, original sizes
    labels: npt.NDArray[np.int64]  # index into CLASSES
    tiles: npt.NDArray[np.int64]  # one id per photographed tile


def load_dataset(root: Path = DATASET) -> Dataset:
    """Every image of the six classes, grey, with its class and tile id."""
    images: list[npt.NDArray[np.uint8]] = []
    labels: list[int] = []
    tiles: list[int] = []
    next_tile = 0
    for label, name in enumerate(CLASSES):
        files = sorted((root / name).glob("*.jpg"))
        if not files:
            raise FileNotFoundError(f"{root / name} holds no .jpg images")
        ids, next_tile = tile_ids([f.name for f in files], next_tile)
        for file, tile in zip(files, ids, strict=True):
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("L")))
            labels.append(label)
            tiles.append(tile)
    return Dataset(images, np.array(labels, dtype=np.int64), np.array(tiles, dtype=np.int64))


def tile_ids(names: Sequence[str], first: int) -> tuple[list[int], int]:
    """Tile ids for one class's files `expE_num_M.jpg`: sorted by M, a gap above TILE_GAP starts a new tile.

    The exposures of one tile carry close frame numbers (e.g. 3191, 3211, 3223, 3234, 3247, 3279); tiles are
    hundreds to thousands apart. A name without a frame number is its own tile.
    """
    numbers = [int(m[1]) if (m := re.search(r"num_(\d+)", name)) else None for name in names]
    ids = [0] * len(names)
    tile = first
    previous: int | None = None
    for i in sorted((i for i, n in enumerate(numbers) if n is not None), key=lambda i: numbers[i] or 0):
        number = numbers[i] or 0
        if previous is not None and number - previous > TILE_GAP:
            tile += 1
        ids[i], previous = tile, number
    tile += 1
    for i, maybe in enumerate(numbers):
        if maybe is None:
            ids[i], tile = tile, tile + 1
    return ids, tile


@dataclass
class Split:
    name: str
    known: tuple[str, ...]
    unknown: tuple[str, ...]
    train: Indices
    calibration: Indices
    test: Indices
    unknown_images: Indices


def split_by_tile(data: Dataset, unknown: Sequence[str], seed: int = SEED, *, by_tile: bool = True) -> Split:
    """Known classes split per class into train / calibration / test by tile (or by image); unknown: all of theirs."""
    unknown_ids = [CLASSES.index(name) for name in unknown]
    known_ids = [i for i in range(len(CLASSES)) if i not in unknown_ids]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for label in known_ids:
        members = np.flatnonzero(data.labels == label)
        keys = data.tiles[members] if by_tile else members
        distinct = rng.permutation(np.unique(keys))
        cut1 = round(FRACTIONS[0] * len(distinct))
        cut2 = round((FRACTIONS[0] + FRACTIONS[1]) * len(distinct))
        for part, chosen in zip(parts, (distinct[:cut1], distinct[cut1:cut2], distinct[cut2:]), strict=True):
            part.extend(members[np.isin(keys, chosen)].tolist())
    name = "unknown=" + "+".join(unknown) if len(unknown) < 5 else "free vs all defects"
    return Split(
        name=name,
        known=tuple(CLASSES[i] for i in known_ids),
        unknown=tuple(unknown),
        train=np.array(sorted(parts[0]), dtype=np.int64),
        calibration=np.array(sorted(parts[1]), dtype=np.int64),
        test=np.array(sorted(parts[2]), dtype=np.int64),
        unknown_images=np.flatnonzero(np.isin(data.labels, unknown_ids)).astype(np.int64),
    )


# ---- the classifier that makes the embeddings ----------------------------------------------------------


def classifier_inputs(data: Dataset, config: ModelConfig) -> torch.Tensor:
    return preprocess(data.images, config)


def finetuned_classifier(inputs: torch.Tensor, data: Dataset, split: Split, config: ModelConfig) -> InspectionModel:
    """The service's model fine-tuned briefly on the known classes' train images (class-balanced batches, flips).

    Same optimiser shape as the learning loop (Adam, head at 10x the backbone's rate); a plain loop, no store.
    """
    classes = [c for c in split.known]
    torch.manual_seed(SEED)
    model = InspectionModel(config, classes)
    optimiser = torch.optim.Adam(
        [{"params": model.backbone.parameters(), "lr": 1e-3}, {"params": model.head.parameters(), "lr": 1e-2}]
    )
    by_class = {c: split.train[data.labels[split.train] == CLASSES.index(c)] for c in classes}
    rng = np.random.default_rng(SEED)
    model.train()
    for _ in range(FINETUNE_STEPS):
        chosen = np.concatenate([rng.choice(by_class[c], FINETUNE_PER_CLASS) for c in classes])
        batch = inputs[chosen]
        if rng.random() < 0.5:
            batch = batch.flip(3)
        targets = torch.tensor([classes.index(CLASSES[label]) for label in data.labels[chosen]])
        loss = F.cross_entropy(model(batch), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return model.eval()


def embed_all(model: InspectionModel, inputs: torch.Tensor) -> npt.NDArray[np.float32]:
    model.eval()
    return np.concatenate(
        [model.embed(inputs[i : i + EMBED_BATCH]).numpy() for i in range(0, len(inputs), EMBED_BATCH)]
    )


def known_test_accuracy(model: InspectionModel, inputs: torch.Tensor, data: Dataset, split: Split) -> float:
    with torch.no_grad():
        predicted = model(inputs[split.test]).argmax(1).numpy()
    truth = [model.classes.index(CLASSES[label]) for label in data.labels[split.test]]
    return float(np.mean(predicted == np.array(truth)))


# ---- one evaluation ------------------------------------------------------------------------------------


def evaluate(
    data: Dataset,
    split: Split,
    embeddings: npt.NDArray[np.float32] | None,
    config: AnomalyConfig,
    model: AnomalyModel | None = None,
) -> tuple[dict[str, float], AnomalyModel]:
    """Fit (unless `model` is given: then only recalibrate with these embeddings) and score one split."""

    def pick(indices: Indices) -> list[npt.NDArray[np.uint8]]:
        return [data.images[i] for i in indices]

    exemplars = None if embeddings is None else embeddings[split.train]
    calibration_embeddings = None if embeddings is None else embeddings[split.calibration]
    started = time.perf_counter()
    if model is None:
        model = AnomalyModel(config)
        model.fit(
            pick(split.train),
            pick(split.calibration),
            exemplar_embeddings=exemplars,
            calibration_embeddings=calibration_embeddings,
            target_false_alarm_rate=TARGET_RATE,
            seed=SEED,
        )
    else:
        model.recalibrate(pick(split.calibration), calibration_embeddings, exemplar_embeddings=exemplars, seed=SEED)
    fit_seconds = time.perf_counter() - started
    known = model.score(pick(split.test), None if embeddings is None else embeddings[split.test])
    unknown = model.score(pick(split.unknown_images), None if embeddings is None else embeddings[split.unknown_images])
    calibration = model.calibration
    figures = {
        "auroc_autoencoder": auroc(known.autoencoder, unknown.autoencoder),
        "auroc_combined": auroc(known.combined, unknown.combined),
        "false_alarm_rate": rate_above(known.combined, calibration.threshold),
        "recall_at_threshold": rate_above(unknown.combined, calibration.threshold),
        "false_alarm_bound": calibration.false_alarm_bound,
        "threshold_images": float(calibration.threshold_images),
        "fit_seconds": fit_seconds,
    }
    if known.feature is not None and unknown.feature is not None:
        figures["auroc_feature"] = auroc(known.feature, unknown.feature)
        other = "sum" if calibration.combine == "max" else "max"
        figures[f"auroc_combined_{calibration.combine}"] = figures["auroc_combined"]
        figures[f"auroc_combined_{other}"] = auroc(
            _recombined(known, calibration, other), _recombined(unknown, calibration, other)
        )
    return figures, model


def _recombined(scores: Any, calibration: Any, how: str) -> npt.NDArray[np.float64]:
    ae = (scores.autoencoder - calibration.autoencoder_location) / calibration.autoencoder_scale
    feature = (scores.feature - calibration.feature_location) / calibration.feature_scale
    return np.asarray(np.maximum(ae, feature) if how == "max" else ae + feature, dtype=np.float64)


def feature_only_auroc(embeddings: npt.NDArray[np.float32], split: Split, k: int) -> float:
    from cl_service.anomaly import FeatureNovelty

    novelty = FeatureNovelty(embeddings[split.train], k)
    return auroc(novelty.score(embeddings[split.test]), novelty.score(embeddings[split.unknown_images]))


# ---- the run -------------------------------------------------------------------------------------------


def main() -> int:
    if not DATASET.is_dir():
        print(
            f"unknown_defect: the dataset folder {DATASET} does not exist; this benchmark needs the magnetic_tile "
            "images (class sub-folders blowhole, break, crack, fray, free, uneven)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    config = AnomalyConfig()
    model_config = ModelConfig()
    data = load_dataset()
    say(f"{len(data.images)} images, {len(np.unique(data.tiles))} tiles; torch threads {torch.get_num_threads()}")
    inputs = classifier_inputs(data, model_config)
    pretrained = embed_all(InspectionModel(model_config, ["any"]), inputs)
    figures: dict[str, Figure] = {}

    # 1. Main split, pretrained embeddings; then the same autoencoder recalibrated with a fine-tuned classifier's.
    main_split = split_by_tile(data, MAIN_UNKNOWN)
    pretrained_figures, anomaly_model = evaluate(data, main_split, pretrained, config)
    t = time.perf_counter()
    classifier = finetuned_classifier(inputs, data, main_split, model_config)
    finetune_seconds = time.perf_counter() - t
    accuracy = known_test_accuracy(classifier, inputs, data, main_split)
    finetuned = embed_all(classifier, inputs)
    say(f"fine-tuned {FINETUNE_STEPS} steps in {finetune_seconds:.0f} s; known test accuracy {accuracy:.1%}")
    finetuned_figures, _ = evaluate(data, main_split, finetuned, config, model=anomaly_model)
    figures.update(pretrained_figures)
    figures.update({f"finetuned_{k}": v for k, v in finetuned_figures.items()})
    figures["finetune_seconds"] = finetune_seconds
    figures["finetune_known_test_accuracy"] = accuracy
    rows: list[list[object]] = [
        _row(f"{main_split.name}, pretrained backbone", pretrained_figures),
        _row(f"{main_split.name}, fine-tuned classifier", finetuned_figures),
    ]

    # 2. Rotation over held-out pairs, pretrained embeddings (one autoencoder per split).
    rotation: list[dict[str, float]] = []
    for unknown in ROTATION:
        split = split_by_tile(data, unknown)
        if tuple(unknown) == MAIN_UNKNOWN:  # the main split with pretrained embeddings: measured above
            result = pretrained_figures
        else:
            result, _ = evaluate(data, split, pretrained, config)
        rotation.append(result)
        rows.append(_row(f"{split.name}, pretrained backbone", result))
        key = "rotation_" + "_".join(unknown)
        figures.update({f"{key}_{k}": v for k, v in result.items() if k.startswith(("auroc", "false", "recall"))})
        say(f"{split.name}: combined AUROC {result['auroc_combined']:.3f}")
    for metric in ("auroc_autoencoder", "auroc_feature", "auroc_combined", "false_alarm_rate", "recall_at_threshold"):
        figures[f"rotation_mean_{metric}"] = float(np.mean([r[metric] for r in rotation]))
    mean = {m: float(figures[f"rotation_mean_{m}"]) for m in _METRICS}
    rows.append([*_row("mean of the 5 rotation splits", mean)[:-2], "", ""])

    # 3. The classic setting: free only is known.
    free_split = split_by_tile(data, [c for c in CLASSES if c != "free"])
    free_ae, free_model = evaluate(data, free_split, None, config)  # day one: no classifier, no exemplars
    free_figures, _ = evaluate(data, free_split, pretrained, config, model=free_model)
    figures["auroc_free_vs_all_defects"] = free_figures["auroc_combined"]
    figures.update({f"free_vs_all_{k}": v for k, v in free_figures.items()})
    figures["free_vs_all_autoencoder_only_auroc"] = free_ae["auroc_autoencoder"]
    figures["free_vs_all_autoencoder_only_false_alarm_rate"] = free_ae["false_alarm_rate"]
    figures["free_vs_all_autoencoder_only_recall_at_threshold"] = free_ae["recall_at_threshold"]
    rows.append(_row("free vs all defects, pretrained backbone", free_figures))
    rows.append(_row("free vs all defects, autoencoder alone", free_ae))

    # 4. The leak a random split would hide: the same feature score, images (not tiles) split at random.
    leak_rows = []
    for by_tile in (True, False):
        split = split_by_tile(data, MAIN_UNKNOWN, by_tile=by_tile)
        value = feature_only_auroc(pretrained, split, 1)
        figures[f"feature_auroc_k1_{'tile' if by_tile else 'random'}_split"] = value
        leak_rows.append(["by tile" if by_tile else "random images", f"{value:.3f}"])

    figures.update(
        {
            "known_classes": ",".join(main_split.known),
            "unknown_classes": ",".join(main_split.unknown),
            "train_images": len(main_split.train),
            "calibration_images": len(main_split.calibration),
            "known_test_images": len(main_split.test),
            "unknown_images": len(main_split.unknown_images),
            "target_false_alarm_rate": TARGET_RATE,
            "combine": config.combine,
            "anomaly_config": str(config.to_dict()),
            "embeddings": f"{model_config.backbone} {model_config.image_size}px, ImageNet-pretrained",
            "seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
            **machine(),
        }
    )
    header = ["split, embeddings", *_METRIC_NAMES, "FA bound", "fit or recalibrate s"]
    say("")
    say(markdown_table(header, rows))
    say("")
    say(markdown_table(["split (main, pretrained, k=1)", "feature AUROC"], leak_rows))
    say(f"\ntarget false-alarm rate {TARGET_RATE:.0%}; whole run {figures['seconds']:.0f} s")
    path = write_results("unknown_defect", figures)
    say(f"wrote {path}")
    return 0


_METRICS = ("auroc_autoencoder", "auroc_feature", "auroc_combined", "false_alarm_rate", "recall_at_threshold")
_METRIC_NAMES = ("AUROC AE", "AUROC feature", "AUROC combined", "false alarms", "recall")


def _row(name: str, result: dict[str, float]) -> list[object]:
    cells: list[object] = [name]
    for metric in _METRICS:
        value = result.get(metric)
        if value is None:
            cells.append("")
        elif metric in ("false_alarm_rate", "recall_at_threshold"):
            cells.append(f"{value:.1%}")
        else:
            cells.append(f"{value:.3f}")
    cells += [f"{result.get('false_alarm_bound', 0):.2%}", f"{result.get('fit_seconds', 0):.0f}"]
    return cells


if __name__ == "__main__":
    sys.exit(main())
