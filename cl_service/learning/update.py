"""One incremental update: from what the store holds, a candidate that learns the new without forgetting the old.

Stages, in order:
1. snapshot: every sample with its effective label, read in one transaction; human labels split into train
   and the fixed validation split (`data.split_validation`); what is new since the live version (its
   watermark: the newest sample and label it saw) is what this update learns from.
2. teacher: the live model with test-time augmentation labels the new unlabeled samples; adaptive per-class
   thresholds decide which labels are kept; kept ones are stored as pseudo-labels (below any human label).
   Samples the inspector flagged as anomalous (a possible unknown defect) are left for an operator. Samples
   next to a class the teacher does not know take that class when their nearest labelled images agree
   (label propagation in the teacher's embedding space); the teacher does not label them.
3. train: the student starts from the live model (its head grown for new classes) and minimises
   cross-entropy on the new human labels (class-balanced batches, weak augmentation), cross-entropy on the
   pseudo-labels under strong augmentation (FixMatch), replay of the exemplars with their stored logits
   (DER++: cross-entropy + logit matching), and the online-EWC penalty of every earlier update.
4. gate: candidate and live model are scored on the same validation images; a regression beyond the
   tolerance on any old class (or in macro-F1) rejects the candidate, with the reason recorded.
5. accepted: exemplars re-selected within the budget (new ones get the candidate's logits), embeddings
   written and the FAISS index built, the EWC Fisher folded in, the version recorded live.

Cold start (no live version): the first model is trained from the pretrained backbone once enough human
labels exist (`cold_start_min_per_class` for `cold_start_min_classes` classes).
Cost stays flat as history grows: an update touches the new samples, the exemplars (a fixed budget) and
the validation split, never the whole history.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor

from cl_service.learning.class_stats import ClassStatistics, load_features, save_features
from cl_service.learning.data import (
    ImageTensors,
    balanced_batches,
    split_validation,
    to_unit,
)
from cl_service.learning.ewc import OnlineEWC
from cl_service.learning.metrics import Metrics, compare, evaluate, paired_changes
from cl_service.learning.model import InspectionModel, save_checkpoint
from cl_service.learning.pseudo import (
    AdaptiveThresholds,
    PseudoLabeler,
    fixmatch_loss,
    strong_augment,
    tta_probs,
    weak_augment,
)
from cl_service.learning.repository import (
    CHECKPOINT,
    CLASS_STATS,
    EWC_STATE,
    REPORT,
    TEACHER_STATE,
    VALIDATION_FEATURES,
    ModelRepository,
    read_json,
    write_json,
)
from cl_service.learning.settings import ModelConfig, UpdateSettings
from replay_store.exemplars import Candidate, Exemplar, ReplayBuffer
from replay_store.operator import anomalous_sample_ids
from replay_store.replay_index import ReplayIndex, write_embeddings
from replay_store.store import PseudoLabel, SnapshotRow, Store

log = logging.getLogger(__name__)

REPLAY_INDEX = "replay.faiss"
Progress = Callable[[str, int, int, dict[str, float]], None]


class UpdateSkippedError(Exception):
    """Nothing was trained: not enough labels yet, or nothing new since the live version."""


@dataclass
class UpdateResult:
    """What one update produced."""

    version: str
    parent: str | None
    accepted: bool
    reasons: list[str]
    candidate: Metrics | None
    live: Metrics | None
    counts: dict[str, int]
    timings: dict[str, float]
    pseudo_accepted: dict[str, int] = field(default_factory=dict)


@dataclass
class _Set:
    """Training images of one kind, decoded, with their integer targets."""

    rows: list[SnapshotRow]
    images: Tensor
    targets: Tensor
    logits: list[Tensor | None] = field(default_factory=list)  # stored exemplar logits (replay only)
    looked_at: int = 0  # unlabeled images the teacher judged (pseudo only)


def run_update(
    store: Store,
    repository: ModelRepository,
    settings: UpdateSettings,
    *,
    progress: Progress | None = None,
    engine_check: Callable[[str], object] | None = None,
) -> UpdateResult:
    """Run one update to the end; raises UpdateSkippedError when there is nothing to train on.

    `engine_check(version)`, when given, builds and checks the accepted candidate's inference engine before it is
    recorded; a candidate whose engine fails is recorded as rejected (it could not serve)."""
    report = progress or (lambda stage, step, total, values: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    threads = contextlib.nullcontext() if not settings.threads else _torch_threads(settings.threads)
    with threads:
        return _run(store, repository, settings, report, generator, timings, lap, engine_check)


def _run(
    store: Store,
    repository: ModelRepository,
    settings: UpdateSettings,
    report: Progress,
    generator: torch.Generator,
    timings: dict[str, float],
    lap: Callable[[str], None],
    engine_check: Callable[[str], object] | None,
) -> UpdateResult:
    live_row = repository.live()
    snapshot = store.snapshot()
    human_train, validation = split_validation(snapshot.human, settings.val_fraction, settings.val_max_per_class)
    human_train = _in_content_order(human_train)
    watermark: dict[str, int] = dict(live_row.metrics.get("watermark", {})) if live_row else {}
    new_labeled = [r for r in human_train if r.label_id > watermark.get("label_id", 0)]
    new_unlabeled = [r for r in snapshot.unlabeled if r.sample_id > watermark.get("sample_id", 0)]
    new_unlabeled = _in_content_order(new_unlabeled[-settings.max_unlabeled :] if settings.max_unlabeled else [])
    by_id = {row.sample_id: row for row in snapshot.rows}

    teacher: InspectionModel | None = None
    fold_all = False  # the 'lda' head folds in every human label of the store, not only the new ones
    if live_row is None:
        per_class = Counter(row.label for row in human_train)
        ready = sorted(c for c, n in per_class.items() if c and n >= settings.cold_start_min_per_class)
        if len(ready) < settings.cold_start_min_classes:
            have = ", ".join(f"{name}: {n}" for name, n in sorted(per_class.items()) if name) or "none"
            raise UpdateSkippedError(
                f"cold start needs {settings.cold_start_min_per_class} human labels in "
                f"{settings.cold_start_min_classes} classes; training labels per class now: {have}"
            )
        model = _new_model(settings.model, settings, sorted(c for c in per_class if c), generator)
        stats = ClassStatistics(model.embedding_dim, model.classes) if settings.classifier == "lda" else None
        ewc = OnlineEWC(settings.ewc_lambda, settings.ewc_decay)
        thresholds = _new_thresholds(model.classes, settings)
        exemplars: list[Exemplar] = []
    else:
        if not new_labeled and not new_unlabeled:
            raise UpdateSkippedError(f"nothing new since {live_row.version}: no new labels and no new images")
        folder = repository.folder(live_row.version)
        teacher = repository.load_model(live_row.version).eval()
        model = copy.deepcopy(teacher)
        ewc = OnlineEWC.load(folder / EWC_STATE) if (folder / EWC_STATE).exists() else OnlineEWC()
        ewc.ewc_lambda, ewc.decay = settings.ewc_lambda, settings.ewc_decay
        state = folder / TEACHER_STATE
        if state.exists():
            thresholds = AdaptiveThresholds.from_state(read_json(state))
        else:
            thresholds = _new_thresholds(model.classes, settings)
        new_classes = sorted({r.label for r in human_train if r.label} - set(model.classes))
        stats = _live_statistics(folder, model, settings)
        if settings.classifier == "lda" and stats is None:
            # The live version was trained (classifier = "trained" before): the discriminant head starts over on
            # the live config's pretrained backbone from every human label in the store; the live model stays the
            # teacher.
            model = _new_model(model.config, settings, list(model.classes), generator)
            stats = ClassStatistics(model.embedding_dim, model.classes)
            fold_all = True
        model.grow(new_classes, generator)
        if stats is not None:
            stats.add_classes(new_classes)
        thresholds.add_classes(new_classes)
        exemplars = ReplayBuffer(store, settings.replay_budget).load()
    classes = list(model.classes)
    index_of = {name: i for i, name in enumerate(classes)}
    images = ImageTensors(store, model.config)
    lap("snapshot")

    pseudo_rows: list[SnapshotRow] = []
    pseudo_targets: list[int] = []
    pseudo_judged: dict[str, int] = {}  # the teacher's top class of every image it judged
    teacher_kept: dict[str, int] = {}  # the pseudo-labels its thresholds kept, per class
    # Images the inspector flagged as unlike anything known are not the teacher's to label: it would file a
    # new defect type under the nearest known class, and teach the student exactly that confusion.
    flagged = anomalous_sample_ids(store, [r.sample_id for r in new_unlabeled]) if teacher is not None else set()
    judged = [r for r in new_unlabeled if r.sample_id not in flagged]
    near_new: set[int] = set()
    propagated: list[tuple[SnapshotRow, Propagated]] = []
    if teacher is not None and judged and settings.pseudo_weight > 0:
        unknown_to_teacher = set(classes) - set(teacher.classes)
        newest = watermark.get("label_id", 0)
        references = [r for r in human_train if r.label in unknown_to_teacher or r.label_id > newest]
        references += [by_id[e.sample_id] for e in exemplars if e.sample_id in by_id]
        nearest = _near_new_classes(teacher, images, judged, references, unknown_to_teacher, settings.propagate_k)
        near_new = {row.sample_id for row, found in zip(judged, nearest, strict=True) if found is not None}
        propagated = [(row, found) for row, found in zip(judged, nearest, strict=True) if found and found.agreed]
    looked_at = len(judged)
    judged = [r for r in judged if r.sample_id not in near_new]
    kept = [(row, found.label, found.similarity) for row, found in propagated]
    if teacher is not None and judged and settings.pseudo_weight > 0:
        assert live_row is not None
        report("teacher", 0, len(judged), {})
        probs = _predict(teacher, images, judged, tta=True)
        probs = F.pad(probs, (0, len(classes) - probs.shape[1]))  # the teacher never predicts the new classes
        labels = PseudoLabeler(thresholds, teacher_version=live_row.version).label(probs)
        pseudo_judged = dict(Counter(classes[i] for i in probs.argmax(dim=1).tolist()))
        by_teacher = [
            (row, label.class_name, label.confidence) for row, label in zip(judged, labels, strict=True) if label
        ]
        teacher_kept = dict(Counter(name for _, name, _ in by_teacher))
        kept += by_teacher
        report("teacher", len(judged), len(judged), {"accepted": float(len(kept))})
    if kept:
        assert live_row is not None
        store.add_pseudo_labels(
            [PseudoLabel(row.sample_id, name, confidence, live_row.version) for row, name, confidence in kept]
        )
        pseudo_rows = [row for row, _, _ in kept]
        pseudo_targets = [index_of[name] for _, name, _ in kept]
    lap("teacher")

    labeled = _labeled_set(images, new_labeled if live_row else human_train, index_of)
    pseudo = _Set(
        pseudo_rows,
        images.load(pseudo_rows),
        torch.tensor(pseudo_targets, dtype=torch.long),
        looked_at=looked_at,
    )
    replay = _replay_set(images, exemplars, by_id, index_of)
    lap("decode")

    if stats is not None:
        folded = _labeled_set(images, human_train, index_of) if fold_all else labeled
        _fit_discriminant(model, stats, images, folded, settings.lda_shrinkage)
    else:
        _train(model, teacher, labeled, pseudo, replay, ewc, images, settings, generator, report)
    if stats is None and teacher is not None and settings.weight_aligning:
        _align_weights(model, teacher.num_classes)
    lap("train")

    report("validate", 0, len(validation), {})
    y_true = [index_of[row.label] for row in validation if row.label in index_of]
    rows_val = [row for row in validation if row.label in index_of]
    # An 'lda' candidate is the live model with another head (unless it starts over from a trained one): the frozen
    # backbone's features of the validation images serve both heads, and the live version's cache of them serves
    # every image it saw already, so that the gate's cost follows the new images, not the history.
    shared_backbone = stats is not None and teacher is not None and not fold_all
    features_val = torch.empty((0, model.embedding_dim))
    if stats is not None:
        cached = load_features(folder / VALIDATION_FEATURES, model.embedding_dim) if shared_backbone else {}
        features_val = _head_features(model, images, rows_val, cached)
        candidate_pred = _argmax(model, features_val)
    else:
        candidate_pred = _predicted(model, images, rows_val)
    if teacher is not None and shared_backbone:
        live_pred = _argmax(teacher, features_val)
    else:
        live_pred = _predicted(teacher, images, rows_val) if teacher is not None else []
    candidate_metrics = evaluate(y_true, candidate_pred, classes) if rows_val else None
    live_metrics = evaluate(y_true, live_pred, classes) if rows_val and teacher is not None else None
    if candidate_metrics is not None and live_metrics is not None and teacher is not None:
        decision = compare(
            candidate_metrics,
            live_metrics,
            old_classes=list(teacher.classes),
            tolerance=settings.gate_tolerance,
            min_support=settings.gate_min_support,
            changes=paired_changes(y_true, live_pred, candidate_pred, classes),
            significance=settings.gate_significance,
        )
        accepted, reasons = decision.accepted, list(decision.reasons) + list(decision.notes)
    elif candidate_metrics is None:
        accepted, reasons = True, ["no validation images yet: the first model is accepted unscored"]
    else:
        accepted = candidate_metrics.accuracy >= settings.cold_start_min_accuracy
        reasons = [
            f"first model: validation accuracy {candidate_metrics.accuracy:.1%} "
            f"({'at least' if accepted else 'below'} {settings.cold_start_min_accuracy:.0%})"
        ]
    lap("validate")

    parent = live_row.version if live_row else None
    version = repository.next_version()
    folder = repository.folder(version)
    folder.mkdir(parents=True, exist_ok=False)
    save_checkpoint(folder / CHECKPOINT, model, version=version, parent_version=parent)
    pseudo_counts: dict[str, int] = dict(Counter(classes[t] for t in pseudo_targets))
    counts = {
        "samples": len(snapshot.rows),
        "human_train": len(human_train),
        "validation": len(rows_val),
        "new_labeled": len(labeled.rows),
        "new_unlabeled": len(new_unlabeled),
        "unlabeled_flagged_unknown": len(flagged),
        "unlabeled_near_new_class": len(near_new),
        "pseudo_propagated": len(propagated),
        "pseudo_accepted": len(pseudo_rows),
        "replayed": len(replay.rows),
    }
    if accepted and engine_check is not None:
        report("build", 0, 1, {})
        try:
            engine_check(version)
        except Exception as exc:  # noqa: BLE001 - any failure: the candidate cannot serve
            accepted = False
            reasons.append(f"its inference engine failed: {exc}")
        lap("build")
    if accepted:
        report("consolidate", 0, 1, {})
        _after_acceptance(store, model, version, folder, images, labeled, replay, new_unlabeled, ewc, settings)
        if stats is not None:
            stats.save(folder / CLASS_STATS)
            save_features(folder / VALIDATION_FEATURES, [row.sha256 for row in rows_val], features_val)
        write_json(folder / TEACHER_STATE, thresholds.state_dict())
        lap("consolidate")
    metrics: dict[str, Any] = {
        "candidate": candidate_metrics.to_dict() if candidate_metrics else None,
        "live": live_metrics.to_dict() if live_metrics else None,
        "gate": {"accepted": accepted, "reasons": reasons, "tolerance": settings.gate_tolerance},
        # A first model learns from labels only: the unlabeled images it saw are still new to the next update's teacher.
        "watermark": {"sample_id": snapshot.max_sample_id if teacher else 0, "label_id": snapshot.max_label_id},
        "counts": counts,
        "pseudo_accepted": teacher_kept,
        "pseudo_propagated": dict(Counter(found.label for _, found in propagated)),
        "pseudo_judged": pseudo_judged,
        "timings": timings,
        "settings": settings.model_dump(mode="json"),
    }
    write_json(folder / REPORT, metrics)
    repository.record(
        version,
        parent=parent,
        accepted=accepted,
        model=model,
        metrics=metrics,
        reason="; ".join(reasons),
        make_live=accepted,
    )
    log.info("update %s -> %s: %s (%s)", parent, version, "accepted" if accepted else "rejected", "; ".join(reasons))
    return UpdateResult(
        version, parent, accepted, reasons, candidate_metrics, live_metrics, counts, timings, pseudo_counts
    )


def _new_model(
    config: ModelConfig, settings: UpdateSettings, classes: Sequence[str], generator: torch.Generator
) -> InspectionModel:
    """A model of `config` (its pretrained weights); in the 'lda' mode its head reads the square-rooted, normalised
    features."""
    if settings.classifier == "lda":
        config = config.model_copy(update={"head_input": "sqrt_l2"})
    return InspectionModel(config, classes, generator=generator)


def _live_statistics(folder: Path, model: InspectionModel, settings: UpdateSettings) -> ClassStatistics | None:
    """The live version's class statistics in the 'lda' mode; None in the 'trained' mode, or when the live version
    has none (it was trained)."""
    path = folder / CLASS_STATS
    if settings.classifier != "lda" or not path.exists():
        return None
    stats = ClassStatistics.load(path)
    if stats.classes != list(model.classes):
        raise ValueError(f"{path} holds the classes {stats.classes}, the live model {list(model.classes)}")
    return stats


@torch.no_grad()
def _fit_discriminant(
    model: InspectionModel, stats: ClassStatistics, images: ImageTensors, labeled: _Set, shrinkage: float
) -> None:
    """Fold the new human labels' features (the frozen backbone's, unaugmented) into the statistics and write the
    discriminant head they give into the model's head. Validation images are never folded in (they are not in
    `labeled`); pseudo-labels are not either: folded step by step on xsdd with 10% labels they made it worse."""
    if len(labeled.targets):
        stats.fold(_head_features(model, images, labeled.rows, {}), labeled.targets)
    weight, bias = stats.head(shrinkage)
    model.head.weight.copy_(weight)
    model.head.bias.copy_(bias)


def _new_thresholds(classes: Sequence[str], settings: UpdateSettings) -> AdaptiveThresholds:
    per_class = settings.pseudo_per_class
    if per_class not in ("confidence", "probability"):
        raise ValueError(f"pseudo_per_class must be 'confidence' or 'probability', got {per_class!r}")
    return AdaptiveThresholds(
        classes,
        floor=settings.pseudo_floor,
        ceiling=settings.pseudo_ceiling,
        per_class=per_class,  # type: ignore[arg-type]  # checked above
    )


@dataclass(frozen=True)
class Propagated:
    """An unlabeled image's nearest labelled image is of a class the teacher does not know (`label`)."""

    label: str
    similarity: float  # mean cosine similarity of the agreeing neighbours (0 when they do not agree)
    agreed: bool  # its k nearest labelled images all carry `label`: it may take that label


def _near_new_classes(
    teacher: InspectionModel,
    images: ImageTensors,
    judged: Sequence[SnapshotRow],
    references: Sequence[SnapshotRow],
    unknown: set[str],
    k: int,
) -> list[Propagated | None]:
    """For each of the `judged` images, whether its nearest labelled reference in the teacher's embedding space is
    of a class the teacher cannot predict (one named since it was trained), and whether its `k` nearest agree.

    The teacher files every image under a class it knows: an unlabeled image of a new defect type comes back as the
    nearest old class, often with full confidence, and as a pseudo-label it would teach the student the very
    confusion the new labels are there to remove. Its embedding still sits next to the new type's labelled images:
    the teacher does not label such an image; when its k nearest labelled images agree, it takes their label
    (label propagation from the few new labels, right for 175 of 179 images of the new classes on xsdd).
    """
    references = [r for r in references if r.label]
    if not unknown or not any(r.label in unknown for r in references):
        return [None] * len(judged)
    reference_embeddings, _ = _embed(teacher, images, references)
    judged_embeddings, _ = _embed(teacher, images, judged)
    return near_new_labels(judged_embeddings, reference_embeddings, [r.label or "" for r in references], unknown, k)


def near_new_labels(
    queries: Tensor, references: Tensor, labels: Sequence[str], wanted: set[str], k: int
) -> list[Propagated | None]:
    """For each row of `queries` (L2-normalised): None when its most similar row of `references` (cosine) has a
    label outside `wanted`; else that label, agreed when the `k` most similar rows all carry it (k = 0: never)."""
    if len(labels) != references.shape[0]:
        raise ValueError(f"{references.shape[0]} references but {len(labels)} labels")
    if queries.shape[0] == 0 or references.shape[0] == 0:
        return [None] * queries.shape[0]
    similarity = queries @ references.T
    top = similarity.topk(min(max(k, 1), references.shape[0]), dim=1)
    found: list[Propagated | None] = []
    for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        label = labels[indices[0]]
        if label not in wanted:
            found.append(None)
            continue
        agreed = k > 0 and len(indices) == k and all(labels[i] == label for i in indices)
        found.append(Propagated(label, max(0.0, sum(values) / len(values)) if agreed else 0.0, agreed))
    return found


def _content_key(row: SnapshotRow) -> tuple[str, int]:
    """Orders rows by their image's content hash. Sample ids follow the order in which ingest committed the
    images, which varies between two sends of the same stream (images are decoded in parallel); training in
    content order makes the seed reproduce a model from the same images and labels, whatever their order."""
    return row.sha256, row.sample_id


def _in_content_order(rows: Sequence[SnapshotRow]) -> list[SnapshotRow]:
    return sorted(rows, key=_content_key)


def _labeled_set(images: ImageTensors, rows: list[SnapshotRow], index_of: dict[str, int]) -> _Set:
    rows = [row for row in rows if row.label in index_of]
    targets = torch.tensor([index_of[row.label or ""] for row in rows], dtype=torch.long)
    return _Set(rows, images.load(rows), targets)


def _replay_set(
    images: ImageTensors, exemplars: Sequence[Exemplar], by_id: dict[int, SnapshotRow], index_of: dict[str, int]
) -> _Set:
    rows: list[SnapshotRow] = []
    targets: list[int] = []
    logits: list[Tensor | None] = []
    stored_rows = [(by_id[e.sample_id], e) for e in exemplars if e.sample_id in by_id]
    for row, exemplar in sorted(stored_rows, key=lambda pair: _content_key(pair[0])):
        label = row.label or exemplar.class_name
        if label not in index_of:
            continue
        rows.append(row)
        targets.append(index_of[label])
        stored = exemplar.logits
        known = exemplar.logits_classes
        usable = stored is not None and known is not None and list(known) == list(index_of)[: len(known)]
        logits.append(torch.as_tensor(np.asarray(stored), dtype=torch.float32) if usable else None)
    return _Set(rows, images.load(rows), torch.tensor(targets, dtype=torch.long), logits)


def _train(
    model: InspectionModel,
    teacher: InspectionModel | None,
    labeled: _Set,
    pseudo: _Set,
    replay: _Set,
    ewc: OnlineEWC,
    images: ImageTensors,
    settings: UpdateSettings,
    generator: torch.Generator,
    report: Progress,
) -> None:
    size = settings.batch_size
    labeled_size = _batch_share(labeled, [labeled, pseudo, replay], size)
    pseudo_size = _batch_share(pseudo, [labeled, pseudo, replay], size)
    per_epoch = max(1, math.ceil(len(labeled.rows) / labeled_size), math.ceil(len(pseudo.rows) / pseudo_size))
    steps = max(settings.epochs * per_epoch, settings.min_steps)
    warmup = per_epoch if settings.backbone_warmup else 0
    optimiser = torch.optim.Adam(
        [
            {"params": list(model.backbone.parameters()), "lr": settings.lr},
            {"params": list(model.head.parameters()), "lr": settings.lr * settings.head_lr_factor},
        ]
    )
    # The backbone's learning rate ramps up over the first epoch while the head learns at full rate: early
    # gradients through a fresh (or grown) head are noise that would otherwise wreck pretrained features.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, [lambda step: min(1.0, (step + 1) / (warmup + 1)), lambda step: 1.0]
    )
    model.train()
    if settings.freeze_bn_statistics:
        _freeze_batch_norm_statistics(model)
    labeled_batches = balanced_batches(labeled.targets.tolist(), labeled_size, steps, generator)
    # Pseudo-labels are drawn as they come: balancing would repeat the teacher's few labels of a class (often
    # wrong: an image of a new type filed under an old class) as often as a class's hundreds of right ones.
    pseudo_batches = balanced_batches(pseudo.targets.tolist(), pseudo_size, steps, generator, balanced=False)
    # FixMatch averages over every unlabeled image, rejected ones counting zero: weigh the accepted by their share.
    pseudo_share = len(pseudo.rows) / max(1, pseudo.looked_at)
    replay_batches = balanced_batches(replay.targets.tolist(), size, steps, generator)
    for step in range(1, steps + 1):
        parts: list[tuple[str, _Set, Tensor, Tensor]] = []
        for name, data, batches, augment in (
            ("labeled", labeled, labeled_batches, weak_augment),
            ("pseudo", pseudo, pseudo_batches, strong_augment),
            ("replay", replay, replay_batches, weak_augment),
        ):
            chosen = next(batches, None)
            if chosen is not None:
                with _torch_threads(1):  # per-image ops: one thread is several times faster than two
                    view = augment(to_unit(data.images[chosen]), generator)
                parts.append((name, data, view, chosen))
        if not parts:
            break
        batch = images.normalise(torch.cat([view for _, _, view, _ in parts]))
        features, logits = model.forward_features_and_logits(batch)
        losses: dict[str, Tensor] = {}
        if teacher is not None and (settings.lwf_weight > 0 or settings.feature_distill_weight > 0):
            losses.update(_distillation(teacher, batch, features, logits, settings))
        start = 0
        for name, data, view, chosen in parts:
            part = logits[start : start + len(view)]
            start += len(view)
            if name == "pseudo":
                share = torch.full((len(chosen),), pseudo_share)
                loss = settings.pseudo_weight * fixmatch_loss(part, data.targets[chosen], share)
            else:
                loss = F.cross_entropy(part, data.targets[chosen])
            if name == "replay":
                loss = settings.der_beta * loss
                matched = _logit_matching(part, [data.logits[i] for i in chosen.tolist()])
                if matched is not None:
                    losses["distill"] = settings.der_alpha * matched
            losses[name] = loss
        if ewc.consolidated and settings.ewc_lambda > 0:
            losses["ewc"] = ewc.penalty(model)
        total = torch.stack(list(losses.values())).sum()
        optimiser.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        report(
            "train", step, steps, {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}
        )
    model.eval()


def _batch_share(part: _Set, parts: Sequence[_Set], size: int) -> int:
    """Images per batch of `part` (new labels, pseudo-labels): `size` times the share of all the batch's classes
    that it covers.

    The new labels of an update often cover one class (a new defect type named by an operator) while replay covers
    every old one; a full batch of them beside a full batch of exemplars would give that one class as many
    images per step as all old classes together, and the candidate learns to call old images by the new name.
    The same holds for pseudo-labels, which are mostly of the new classes (label propagation).
    """
    covered = set(part.targets.tolist())
    every = set().union(*(set(p.targets.tolist()) for p in parts))
    return max(1, round(size * len(covered) / max(1, len(every))))


def _distillation(
    teacher: InspectionModel, batch: Tensor, features: Tensor, logits: Tensor, settings: UpdateSettings
) -> dict[str, Tensor]:
    """Keep what the live model knew on every image of the batch, new ones included (replay alone sees only the
    few exemplars): its old-class outputs (LwF, softened with a temperature) and the direction of its pooled
    features (LUCIR's less-forget constraint)."""
    with torch.no_grad():
        teacher_features, teacher_logits = teacher.forward_features_and_logits(batch)
    out: dict[str, Tensor] = {}
    if settings.lwf_weight > 0:
        t = settings.lwf_temperature
        old = teacher_logits.shape[1]
        target = F.softmax(teacher_logits / t, dim=1)
        kl = F.kl_div(F.log_softmax(logits[:, :old] / t, dim=1), target, reduction="batchmean")
        out["lwf"] = settings.lwf_weight * kl * t * t
    if settings.feature_distill_weight > 0:
        cosine = F.cosine_similarity(features, teacher_features, dim=1, eps=1e-8)
        out["feature"] = settings.feature_distill_weight * (1.0 - cosine).mean()
    return out


@torch.no_grad()
def _align_weights(model: InspectionModel, old_classes: int) -> None:
    """Weight Aligning (Zhao et al., CVPR 2020): scale the new classes' head rows to the old rows' mean norm.

    Trained on many new images and few exemplars, new rows grow longer and pull predictions towards the new
    classes; equal norms remove most of that bias without touching the backbone.
    """
    weight = model.head.weight
    if not 0 < old_classes < weight.shape[0]:
        return
    norms = weight.norm(dim=1)
    gamma = norms[:old_classes].mean() / norms[old_classes:].mean().clamp_min(1e-12)
    weight[old_classes:] *= gamma


def _freeze_batch_norm_statistics(model: torch.nn.Module) -> None:
    """Keep BatchNorm on its running statistics while training (its scale and shift still learn).

    Updates see small batches of few classes; statistics re-estimated from them drift with every update
    and swing the features of old classes (a known source of forgetting), and they never settle in a
    few hundred steps. The pretrained statistics are a steadier reference.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def _logit_matching(logits: Tensor, stored: list[Tensor | None]) -> Tensor | None:
    """DER++'s term: mean squared error between current and stored logits, over the stored classes."""
    pairs = [(i, s) for i, s in enumerate(stored) if s is not None]
    if not pairs:
        return None
    errors = [F.mse_loss(logits[i, : len(s)], s) for i, s in pairs]
    return torch.stack(errors).mean()


@torch.no_grad()
def _predict(model: InspectionModel, images: ImageTensors, rows: Sequence[SnapshotRow], *, tta: bool) -> Tensor:
    model.eval()
    out: list[Tensor] = []
    for start in range(0, len(rows), 64):
        batch = images.normalise(to_unit(images.load(rows[start : start + 64])))
        out.append(tta_probs(model, batch) if tta else torch.softmax(model(batch), dim=1))
    return torch.cat(out) if out else torch.empty((0, model.num_classes))


def _predicted(model: InspectionModel, images: ImageTensors, rows: Sequence[SnapshotRow]) -> list[int]:
    return _predict(model, images, rows, tta=False).argmax(dim=1).tolist() if rows else []


@torch.no_grad()
def _head_features(
    model: InspectionModel, images: ImageTensors, rows: Sequence[SnapshotRow], cached: dict[str, Tensor]
) -> Tensor:
    """What the head reads for each row (N, dim), taken from `cached` (by content hash) where it is there."""
    model.eval()
    missing = [row for row in rows if row.sha256 not in cached]
    found = dict(cached)
    for start in range(0, len(missing), 64):
        chunk = missing[start : start + 64]
        features = model.head_features(model.backbone(images.normalise(to_unit(images.load(chunk)))))
        found.update(zip((row.sha256 for row in chunk), features, strict=True))
    if not rows:
        return torch.empty((0, model.embedding_dim))
    return torch.stack([found[row.sha256] for row in rows])


@torch.no_grad()
def _argmax(model: InspectionModel, features: Tensor) -> list[int]:
    predicted: list[int] = model.head(features).argmax(dim=1).tolist()
    return predicted


def _after_acceptance(
    store: Store,
    model: InspectionModel,
    version: str,
    folder: Path,
    images: ImageTensors,
    labeled: _Set,
    replay: _Set,
    new_unlabeled: list[SnapshotRow],
    ewc: OnlineEWC,
    settings: UpdateSettings,
) -> None:
    """Exemplars, embeddings and the FAISS index, the EWC Fisher: what the next update builds on."""
    rows = {row.sample_id: row for row in [*labeled.rows, *replay.rows, *new_unlabeled]}
    ordered = list(rows.values())
    embeddings, logits = _embed(model, images, ordered)
    ids = np.array([row.sample_id for row in ordered], dtype=np.int64)
    # A pooled feature can be all zeros (every channel inactive): it has no direction to index or compare.
    directed = (embeddings.norm(dim=1) > 0).numpy()
    if not directed.all():
        log.warning(
            "%d images have an all-zero embedding under %s and stay out of the index", (~directed).sum(), version
        )
    if directed.any():
        write_embeddings(store, ids[directed], embeddings.numpy()[directed], version)
    ReplayIndex.rebuild(store, version, model.embedding_dim).save(folder / REPLAY_INDEX)  # first build

    position = {row.sample_id: i for i, row in enumerate(ordered)}
    candidates = [
        Candidate(row.sample_id, row.label or "", row.sha256, embeddings[position[row.sample_id]].numpy())
        for row in [*replay.rows, *labeled.rows]
        if row.label
    ]
    buffer = ReplayBuffer(store, settings.replay_budget)
    buffer.refresh(candidates, strategy=settings.replay_strategy, seed=settings.seed, model_version=version)
    missing = [i for i in buffer.missing_logits() if i in position]
    if missing:
        buffer.set_logits({i: logits[position[i]].numpy() for i in missing}, list(model.classes), model_version=version)

    fisher_rows = [*labeled.rows, *replay.rows][: settings.ewc_max_images]
    targets = torch.cat([labeled.targets, replay.targets])[: settings.ewc_max_images]
    if fisher_rows and settings.ewc_lambda > 0 and settings.classifier == "trained":
        data = images.normalise(to_unit(images.load(fisher_rows)))
        batches = [
            (data[i : i + settings.batch_size], targets[i : i + settings.batch_size])
            for i in range(0, len(fisher_rows), settings.batch_size)
        ]
        ewc.consolidate(model, batches)
    ewc.save(folder / EWC_STATE)


@torch.no_grad()
def _embed(model: InspectionModel, images: ImageTensors, rows: Sequence[SnapshotRow]) -> tuple[Tensor, Tensor]:
    model.eval()
    embeddings: list[Tensor] = []
    logits: list[Tensor] = []
    for start in range(0, len(rows), 64):
        batch = images.normalise(to_unit(images.load(rows[start : start + 64])))
        embedding, logit = model.forward_features_and_logits(batch)
        embeddings.append(F.normalize(embedding.float(), dim=1))
        logits.append(logit.float())
    if not embeddings:
        return torch.empty((0, model.embedding_dim)), torch.empty((0, model.num_classes))
    return torch.cat(embeddings), torch.cat(logits)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
