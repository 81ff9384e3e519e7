"""Putting a model version behind an engine: build -> load -> warm up -> parity with torch on a golden batch from the
store (INT8: also accuracy on the version's validation split) -> record -> swap.

Every attempt, passed or failed, is recorded in the version's folder (`engines.json`: per engine, the parity figures,
what the engine is bound to, or the error). A failed build, load, warm-up or parity check raises and leaves the live
engine untouched.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from cl_service.engines.base import Batch, BuildInputs, Engine, EngineError, build_engine, open_engine
from cl_service.engines.export import Parity, parity, torch_logits
from cl_service.learning.data import split_validation
from cl_service.learning.model import InspectionModel, preprocess_encoded
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig, UpdateSettings
from cl_service.serving.slot import EngineSlot
from replay_store.exemplars import ReplayBuffer
from replay_store.files import write_atomically
from replay_store.store import Store

log = logging.getLogger(__name__)

ENGINES_FILE = "engines.json"
GOLDEN_FILE = "golden.npz"
GOLDEN_IMAGES = 32
CALIBRATION_IMAGES = 128
VALIDATION_IMAGES = 512
MAX_INT8_ACCURACY_DROP = 0.01  # INT8 may cost at most 1 point of validation accuracy against torch
WARMUP_BATCHES = (1, 8)


class ParityError(EngineError):
    """The engine's outputs do not follow torch's closely enough on the golden batch."""


@dataclass(frozen=True)
class Prepared:
    version: str
    engine: Engine
    parity: Parity
    seconds: float
    reference: Batch  # torch's logits of the golden batch


def golden_images(store: Store, config: ModelConfig, count: int = GOLDEN_IMAGES) -> Batch:
    """The newest `count` stored images, preprocessed exactly as requests will be."""
    rows = sorted(store.snapshot().rows, key=lambda row: row.sample_id)[-count:]
    if not rows:
        raise EngineError("the store holds no images for a golden batch")
    blobs = store.read_blobs([row.sha256 for row in rows])
    return preprocess_encoded([blobs[row.sha256] for row in rows], config).numpy()


def calibration_images(store: Store, config: ModelConfig, count: int = CALIBRATION_IMAGES) -> Batch:
    """The replay exemplars (representative of every class), topped up with the newest stored images."""
    by_id = {row.sample_id: row for row in store.snapshot().rows}
    chosen = [by_id[e.sample_id] for e in ReplayBuffer(store, count).load() if e.sample_id in by_id][:count]
    known = {row.sample_id for row in chosen}
    chosen += [row for row in sorted(by_id.values(), key=lambda r: -r.sample_id) if row.sample_id not in known][
        : count - len(chosen)
    ]
    if not chosen:
        raise EngineError("the store holds no images to calibrate with")
    blobs = store.read_blobs([row.sha256 for row in chosen])
    return preprocess_encoded([blobs[row.sha256] for row in chosen], config).numpy()


def validation_images(
    store: Store, repository: ModelRepository, version: str, model: InspectionModel
) -> tuple[Batch, list[str]] | None:
    """The version's validation split (the same rule and settings its update used), labels in its classes;
    None while there are no such images."""
    row = repository.get(version)
    try:
        chosen = UpdateSettings.model_validate((row.metrics.get("settings") if row else None) or {})
    except ValidationError:  # written by another release: today's defaults draw the same kind of split
        chosen = UpdateSettings()
    _, rows = split_validation(store.snapshot().human, chosen.val_fraction, chosen.val_max_per_class)
    rows = [row for row in rows if row.label in model.classes][:VALIDATION_IMAGES]
    if not rows:
        return None
    blobs = store.read_blobs([row.sha256 for row in rows])
    images = preprocess_encoded([blobs[row.sha256] for row in rows], model.config).numpy()
    return images, [row.label or "" for row in rows]


def prepare(
    repository: ModelRepository,
    version: str,
    engine_name: str,
    *,
    golden: Batch,
    reference: Batch | None = None,
    calibration: Batch | None = None,
    validation: tuple[Batch, Sequence[str]] | None = None,
    model: InspectionModel | None = None,
) -> Prepared:
    """A loaded, warmed-up engine of `version` whose parity with torch on `golden` passed (and, for INT8, whose
    accuracy on `validation` is within MAX_INT8_ACCURACY_DROP of torch's); recorded either way.
    `reference`: torch's logits of `golden` when known; `model`: the version's model when the caller has it."""
    folder = repository.folder(version)
    started = time.perf_counter()
    engine: Engine | None = None
    try:
        if reference is None or validation is not None:
            model = model or repository.load_model(version)
        if reference is None:
            assert model is not None
            reference = torch_logits(model, golden)
        build_engine(engine_name, folder, BuildInputs(calibration, golden, reference))
        engine = open_engine(engine_name, folder)
        engine.load()
        engine.warmup(WARMUP_BATCHES)
        precision = str(engine.describe().get("precision", "fp32"))
        check = parity(engine_name, reference, engine.infer(golden), precision=precision)
        if not check.passed:
            raise ParityError(f"{version}: {check.describe()}")
        accuracy = None
        if precision == "int8" and validation is not None and model is not None:
            accuracy = _accuracy_against_torch(model, engine, *validation)
            if accuracy["torch"] - accuracy["engine"] > MAX_INT8_ACCURACY_DROP:
                raise ParityError(
                    f"{version}: {engine_name} validation accuracy {accuracy['engine']:.1%} on {accuracy['images']} "
                    f"images, torch {accuracy['torch']:.1%}: more than {MAX_INT8_ACCURACY_DROP:.0%} lost"
                )
    except Exception as exc:
        if engine is not None:
            engine.close()
        _record(folder, engine_name, {"ok": False, "error": str(exc)})
        log.error("%s on %s cannot go live: %s", engine_name, version, exc)
        raise
    seconds = time.perf_counter() - started
    entry = {"ok": True, "parity": check.to_dict(), "engine": engine.describe(), "seconds": seconds}
    _record(folder, engine_name, entry if accuracy is None else {**entry, "validation": accuracy})
    return Prepared(version, engine, check, seconds, reference)


def _accuracy_against_torch(
    model: InspectionModel, engine: Engine, images: Batch, labels: Sequence[str]
) -> dict[str, float]:
    truth = np.array([model.classes.index(label) for label in labels])
    engine_logits = np.concatenate([engine.infer(images[i : i + 64]) for i in range(0, len(images), 64)])
    return {
        "images": len(labels),
        "torch": float((torch_logits(model, images).argmax(1) == truth).mean()),
        "engine": float((engine_logits.argmax(1) == truth).mean()),
    }


def prepare_version(
    store: Store, repository: ModelRepository, version: str, engine_name: str, *, model: InspectionModel | None = None
) -> Prepared:
    """`prepare` with the golden batch (and, for INT8, the calibration and validation images) from the store.

    The golden batch and torch's logits of it are kept in the version's folder (`golden.npz`) after the first
    successful check: later publications (another engine, a rollback, another server process) reuse them instead
    of running torch again beside live traffic."""
    cached = _read_golden(repository.folder(version))
    if cached is None:
        model = model or repository.load_model(version)  # read once: config, torch reference
        golden, reference = golden_images(store, model.config), None
    else:
        golden, reference = cached
    calibration = validation = None
    if engine_name.endswith("int8"):
        model = model or repository.load_model(version)
        calibration = calibration_images(store, model.config)
        validation = validation_images(store, repository, version, model)
    prepared = prepare(
        repository,
        version,
        engine_name,
        golden=golden,
        reference=reference,
        calibration=calibration,
        validation=validation,
        model=model,
    )
    if cached is None:
        _write_golden(repository.folder(version), golden, prepared.reference)
    return prepared


def prebuild(store: Store, repository: ModelRepository, version: str, engine_name: str) -> Prepared:
    """Build and check `version`'s engine ahead of time (what an update does for the version it accepted, in its own
    process), so that the server's swap only loads it. The engine is closed again; the files stay."""
    prepared = prepare_version(store, repository, version, engine_name)
    prepared.engine.close()
    return prepared


def _read_golden(folder: Path) -> tuple[Batch, Batch] | None:
    try:
        with np.load(folder / GOLDEN_FILE) as data:
            return data["images"], data["reference"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None  # missing or unreadable: made again from the store


def _write_golden(folder: Path, images: Batch, reference: Batch) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, images=images, reference=reference)
    write_atomically(folder / GOLDEN_FILE, buffer.getvalue())


def activate(
    slot: EngineSlot,
    store: Store,
    repository: ModelRepository,
    version: str,
    engine_name: str,
    *,
    model: InspectionModel | None = None,
) -> Prepared:
    """Prepare `version` on `engine_name` and swap it in; on any failure the live engine stays as it was."""
    prepared = prepare_version(store, repository, version, engine_name, model=model)
    replaced = slot.swap(version, prepared.engine)
    log.info("%s live on %s (was %s): %s", version, engine_name, replaced or "nothing", prepared.parity.describe())
    return prepared


def engine_records(folder: Path) -> dict[str, Any]:
    """What `engines.json` says about each engine tried for a version ({} when none was)."""
    path = folder / ENGINES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _record(folder: Path, engine_name: str, entry: dict[str, Any]) -> None:
    data = engine_records(folder)
    data[engine_name] = {**entry, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    write_atomically(folder / ENGINES_FILE, (json.dumps(_strict_json(data), indent=2, allow_nan=False) + "\n").encode())


def _strict_json(value: Any) -> Any:
    """Plain JSON: numpy scalars as numbers, infinite/NaN floats (INT8's unbounded max |diff|) as strings."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value
