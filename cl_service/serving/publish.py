"""Putting a model version behind an engine: build -> load -> warm up -> parity with torch on a golden batch from the
store -> record -> swap.

Every attempt, passed or failed, is recorded in the version's folder (`engines.json`: per engine, the parity figures,
what the engine is bound to, or the error). A failed build, load, warm-up or parity check raises and leaves the live
engine untouched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cl_service.engines.base import Batch, BuildInputs, Engine, EngineError, build_engine, open_engine
from cl_service.engines.export import Parity, parity, torch_logits
from cl_service.learning.model import InspectionModel, preprocess_encoded
from cl_service.learning.repository import ModelRepository
from cl_service.learning.settings import ModelConfig
from cl_service.serving.slot import EngineSlot
from replay_store.exemplars import ReplayBuffer
from replay_store.files import write_atomically
from replay_store.store import Store

log = logging.getLogger(__name__)

ENGINES_FILE = "engines.json"
GOLDEN_IMAGES = 32
CALIBRATION_IMAGES = 128
WARMUP_BATCHES = (1, 8)


class ParityError(EngineError):
    """The engine's outputs do not follow torch's closely enough on the golden batch."""


@dataclass(frozen=True)
class Prepared:
    version: str
    engine: Engine
    parity: Parity
    seconds: float


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


def prepare(
    repository: ModelRepository,
    version: str,
    engine_name: str,
    *,
    golden: Batch,
    calibration: Batch | None = None,
    model: InspectionModel | None = None,
) -> Prepared:
    """A loaded, warmed-up engine of `version` whose parity with torch on `golden` passed; recorded either way.
    `model`: the version's model when the caller has it loaded already."""
    folder = repository.folder(version)
    started = time.perf_counter()
    engine: Engine | None = None
    try:
        model = model or repository.load_model(version)
        reference = torch_logits(model, golden)
        build_engine(engine_name, folder, BuildInputs(calibration, golden, reference))
        engine = open_engine(engine_name, folder)
        engine.load()
        engine.warmup(WARMUP_BATCHES)
        precision = str(engine.describe().get("precision", "fp32"))
        check = parity(engine_name, reference, engine.infer(golden), precision=precision)
        if not check.passed:
            raise ParityError(f"{version}: {check.describe()}")
    except Exception as exc:
        if engine is not None:
            engine.close()
        _record(folder, engine_name, {"ok": False, "error": str(exc)})
        log.error("%s on %s cannot go live: %s", engine_name, version, exc)
        raise
    seconds = time.perf_counter() - started
    _record(
        folder, engine_name, {"ok": True, "parity": check.to_dict(), "engine": engine.describe(), "seconds": seconds}
    )
    return Prepared(version, engine, check, seconds)


def prepare_version(
    store: Store, repository: ModelRepository, version: str, engine_name: str, *, model: InspectionModel | None = None
) -> Prepared:
    """`prepare` with the golden batch (and, for INT8, the calibration images) taken from the store."""
    model = model or repository.load_model(version)  # read once: config, torch reference
    golden = golden_images(store, model.config)
    calibration = calibration_images(store, model.config) if engine_name.endswith("int8") else None
    return prepare(repository, version, engine_name, golden=golden, calibration=calibration, model=model)


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
