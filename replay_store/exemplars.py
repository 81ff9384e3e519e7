"""Exemplar selection under a fixed budget, and the replay buffer that keeps the selection in the database.

Every strategy first splits the budget between classes (`class_quotas`: equal shares, what a small
class cannot use goes to the others), then picks within each class:

- "class_balanced_reservoir" (default): a uniform random sample of each class. Each sample gets a
  random key from a seeded counter-based generator (SplitMix64 of the seed and the image's content
  hash; of its sample id when the candidate carries no hash) and a class keeps the samples with the
  smallest keys: reservoir sampling with random priorities. Being a function of (seed, content) only,
  the choice does not depend on the order of arrival (sample ids do), and selecting from
  (current exemplars + new samples) gives what selecting from the whole history would, as long as no
  quota grows. The buffer therefore stays stable across updates and keeps its stored logits.
- "herding": iCaRL herding: greedily pick the sample that keeps the picked set's mean closest to the
  class mean (normalised embeddings); any prefix of the order is itself a good summary.
- "kcenter": greedy k-center (cosine geometry): start at the sample nearest the class mean, then add
  the sample farthest from everything picked so far; covers the class, outliers included.

Ties are broken by sample id, and candidates are sorted by id first: the result does not depend on
the order of the input.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, RowMapping, bindparam, delete, func, insert, select, update

from replay_store.models import EMBEDDINGS, EXEMPLARS, SAMPLES, as_utc, utcnow
from replay_store.replay_index import EngineSource, engine_of, normalized
from replay_store.store import Store

StrategyName = Literal["class_balanced_reservoir", "herding", "kcenter"]
STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)
DEFAULT_STRATEGY: StrategyName = "class_balanced_reservoir"
HUMAN_SOURCES = ("operator", "camera")
_IN_CHUNK = 500
_SHA256 = re.compile(r"[0-9a-f]{64}")

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Candidate:
    """A sample that may become an exemplar: its id, its (effective) class, its image's content hash (sha256 hex:
    the reservoir keys on it, so the same image is kept whatever sample id it arrived under) and, for herding
    and k-center, its embedding."""

    sample_id: int
    class_name: str
    content: str
    embedding: npt.NDArray[Any] | None = None

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.content):
            raise ValueError(f"sample {self.sample_id}: content must be the image's sha256 (64 hex digits)")


# ------------------------------------------------------------------------------------------ selection


def class_quotas(counts: Mapping[str, int], budget: int) -> dict[str, int]:
    """How many exemplars each class gets: at most `budget` in all, equal shares by water-filling.

    Each round gives every class that still has samples an equal share of what is left; a class
    with fewer samples than its share keeps them all and frees the rest for the next round. The last
    few slots (fewer than the classes still hungry) go one each to those classes in name order.
    """
    if budget < 0:
        raise ValueError(f"the budget must not be negative, got {budget}")
    quotas = {name: 0 for name in counts}
    hungry = sorted(name for name, count in counts.items() if count > 0)
    remaining = budget
    while remaining > 0 and hungry:
        share = remaining // len(hungry)
        if share == 0:
            for name in hungry[:remaining]:
                quotas[name] += 1
            break
        for name in hungry:
            given = min(share, counts[name] - quotas[name])
            quotas[name] += given
            remaining -= given
        hungry = [name for name in hungry if quotas[name] < counts[name]]
    return quotas


def reservoir_keys(counters: npt.ArrayLike, seed: int) -> npt.NDArray[np.uint64]:
    """A uniform random 64-bit key per counter (non-negative int64), a pure function of (seed, counter): SplitMix64."""
    with np.errstate(over="ignore"):
        x = np.asarray(counters, dtype=np.int64).astype(np.uint64)
        x = x + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def herding_order(embeddings: npt.ArrayLike, k: int) -> list[int]:
    """iCaRL herding: k row indices whose running mean tracks the mean of the (normalised) rows.

    Step t picks argmin_i ||mu - (s + x_i) / t||, which for unit rows is argmax_i x_i . (t mu - s):
    one matrix-vector product per step, no (n, d) temporaries."""
    x = normalized(embeddings)
    k = min(k, len(x))
    target = x.mean(axis=0, dtype=np.float64)
    chosen: list[int] = []
    running = np.zeros_like(target)
    for step in range(1, k + 1):
        score = x @ (step * target - running).astype(np.float32)
        score[chosen] = -np.inf
        pick = int(np.argmax(score))
        chosen.append(pick)
        running += x[pick]
    return chosen


def kcenter_order(embeddings: npt.ArrayLike, k: int) -> list[int]:
    """Greedy k-center: k row indices, each the farthest (by cosine) from those picked before it.

    Starts at the row nearest the mean. For unit rows the farthest row is the one whose highest
    cosine with the picked rows is lowest: one matrix-vector product per step."""
    x = normalized(embeddings)
    k = min(k, len(x))
    if k == 0:
        return []
    first = int(np.argmax(x @ x.mean(axis=0)))
    chosen = [first]
    closest = x @ x[first]
    while len(chosen) < k:
        closest[chosen] = np.inf
        pick = int(np.argmin(closest))
        chosen.append(pick)
        closest = np.maximum(closest, x @ x[pick])
    return chosen


def _reservoir(members: Sequence[Candidate], quota: int, seed: int) -> list[int]:
    ids = np.array([member.sample_id for member in members], dtype=np.int64)
    # The first 63 bits of the content hash: the same image draws the same key whenever it arrived.
    counters = np.array([int(m.content[:16], 16) >> 1 for m in members], dtype=np.int64)
    return [int(i) for i in np.lexsort((ids, reservoir_keys(counters, seed)))[:quota]]


def _by_embedding(
    order: Callable[[npt.ArrayLike, int], list[int]],
) -> Callable[[Sequence[Candidate], int, int], list[int]]:
    def pick(members: Sequence[Candidate], quota: int, _seed: int) -> list[int]:
        if any(member.embedding is None for member in members):
            raise ValueError("herding and k-center need an embedding for every candidate")
        return order(np.stack([np.asarray(member.embedding, dtype=np.float32) for member in members]), quota)

    return pick


_PICKERS: dict[str, Callable[[Sequence[Candidate], int, int], list[int]]] = {
    "class_balanced_reservoir": _reservoir,
    "herding": _by_embedding(herding_order),
    "kcenter": _by_embedding(kcenter_order),
}


def select_exemplars(
    candidates: Sequence[Candidate],
    budget: int,
    strategy: StrategyName | str = DEFAULT_STRATEGY,
    *,
    seed: int = 0,
) -> list[Candidate]:
    """At most `budget` candidates, class-balanced, chosen by `strategy`.

    Returned by class name, and within a class in the strategy's order (herding and k-center: the
    order of picking; reservoir: by key). Deterministic for given candidates, budget and seed.
    """
    if strategy not in _PICKERS:
        raise ValueError(f"unknown exemplar strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    by_class: dict[str, list[Candidate]] = defaultdict(list)
    seen: set[int] = set()
    for candidate in candidates:
        if candidate.sample_id in seen:
            raise ValueError(f"sample {candidate.sample_id} is a candidate twice")
        seen.add(candidate.sample_id)
        by_class[candidate.class_name].append(candidate)
    quotas = class_quotas({name: len(members) for name, members in by_class.items()}, budget)
    picker = _PICKERS[strategy]
    selected: list[Candidate] = []
    for name in sorted(by_class):
        members = sorted(by_class[name], key=lambda candidate: candidate.sample_id)
        if quotas[name] > 0:
            selected.extend(members[i] for i in picker(members, quotas[name], seed))
    return selected


def candidates_from_store(
    store: Store,
    *,
    model_version: str | None = None,
    sources: Collection[str] = HUMAN_SOURCES,
    exclude: Collection[int] = (),
) -> list[Candidate]:
    """Candidates from the store: samples whose effective label comes from `sources`.

    With `model_version`, only samples that have an embedding of it, which the candidates carry.
    `exclude` holds sample ids never to replay (the validation split).
    """
    labels = Store.effective_label_query().subquery()
    query = (
        select(labels.c.sample_id, labels.c.class_name, SAMPLES.c.sha256)
        .join(SAMPLES, SAMPLES.c.id == labels.c.sample_id)
        .where(labels.c.source.in_(list(sources)))
    )
    if model_version is not None:
        table = EMBEDDINGS
        query = query.add_columns(table.c.vector).join(
            table, (table.c.sample_id == labels.c.sample_id) & (table.c.model_version == model_version)
        )
    skip = set(exclude)
    with store.engine.connect() as connection:
        rows = connection.execute(query.order_by(labels.c.sample_id)).all()
    return [
        Candidate(
            int(row[0]),
            str(row[1]),
            str(row[2]),
            None if model_version is None else np.frombuffer(bytes(row[3]), dtype="<f4").astype(np.float32),
        )
        for row in rows
        if int(row[0]) not in skip
    ]


# ------------------------------------------------------------------------------------------ the buffer


@dataclass(frozen=True)
class Exemplar:
    """One stored exemplar; `logits` (float32, in the order of `logits_classes`) may not be set yet."""

    sample_id: int
    class_name: str
    strategy: str
    model_version: str | None
    selected_at: datetime
    logits: FloatArray | None
    logits_classes: tuple[str, ...] | None
    logits_model_version: str | None


@dataclass(frozen=True)
class BufferChange:
    """What an update did: sample ids added, removed, kept, and kept under a new class."""

    added: tuple[int, ...]
    removed: tuple[int, ...]
    kept: tuple[int, ...]
    relabeled: tuple[int, ...]


class ReplayBuffer:
    """The exemplar set, in the `exemplars` table, never larger than `budget`."""

    def __init__(self, source: EngineSource, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"the budget must not be negative, got {budget}")
        self.engine = engine_of(source)
        self.budget = budget

    def refresh(
        self,
        candidates: Sequence[Candidate],
        *,
        strategy: StrategyName | str = DEFAULT_STRATEGY,
        seed: int = 0,
        model_version: str | None = None,
    ) -> BufferChange:
        """Select from `candidates` within the budget and store that selection.

        With the reservoir, `candidates` may be the current exemplars plus the samples new since the
        last refresh (their embeddings are not needed): the result is the one the whole history gives
        while no class's quota grows, so update time does not grow with the history."""
        selection = select_exemplars(candidates, self.budget, strategy, seed=seed)
        return self.update(selection, strategy=strategy, model_version=model_version)

    def update(
        self, selection: Sequence[Candidate], *, strategy: str, model_version: str | None = None
    ) -> BufferChange:
        """Make the buffer hold exactly `selection`, in one transaction.

        Samples that stay keep their stored logits and first selection time; their class follows
        the selection (a corrected label), their strategy and model version the latest selection.
        """
        if len(selection) > self.budget:
            raise ValueError(f"{len(selection)} exemplars exceed the budget of {self.budget}")
        wanted = {candidate.sample_id: candidate.class_name for candidate in selection}
        if len(wanted) != len(selection):
            raise ValueError("a sample appears twice in the selection")
        table, now = EXEMPLARS, utcnow()
        with self.engine.begin() as connection:
            current = {row[0]: row[1] for row in connection.execute(select(table.c.sample_id, table.c.class_name))}
            removed = sorted(set(current) - set(wanted))
            added = sorted(set(wanted) - set(current))
            kept = sorted(set(wanted) & set(current))
            relabeled = [sample_id for sample_id in kept if current[sample_id] != wanted[sample_id]]
            for chunk in _chunks(removed):
                connection.execute(delete(table).where(table.c.sample_id.in_(chunk)))
            if kept:
                statement = (
                    update(table)
                    .where(table.c.sample_id == bindparam("b_sample_id"))
                    .values(class_name=bindparam("b_class"), strategy=strategy, model_version=model_version)
                )
                connection.execute(statement, [{"b_sample_id": i, "b_class": wanted[i]} for i in kept])
            if added:
                rows = [
                    {
                        "sample_id": sample_id,
                        "class_name": wanted[sample_id],
                        "strategy": strategy,
                        "model_version": model_version,
                        "selected_at": now,
                    }
                    for sample_id in added
                ]
                connection.execute(insert(table), rows)
        return BufferChange(tuple(added), tuple(removed), tuple(kept), tuple(relabeled))

    def set_logits(
        self,
        logits: Mapping[int, npt.ArrayLike],
        classes: Sequence[str],
        *,
        model_version: str | None = None,
    ) -> None:
        """Store the logits of exemplars (DER++), over `classes` in this order, in one transaction.

        KeyError, and nothing written, when one of the samples is not in the buffer."""
        width = len(classes)
        rows: list[dict[str, Any]] = []
        for sample_id, values in logits.items():
            vector = np.asarray(values, dtype="<f4").reshape(-1)
            if vector.shape != (width,) or not np.isfinite(vector).all():
                raise ValueError(f"logits of sample {sample_id}: need {width} finite values, got {vector.shape}")
            rows.append({"b_sample_id": int(sample_id), "b_logits": vector.tobytes()})
        if not rows:
            return
        table = EXEMPLARS
        with self.engine.begin() as connection:
            missing = {int(i) for i in logits} - self._present(connection, [int(i) for i in logits])
            if missing:
                raise KeyError(f"not in the replay buffer: {sorted(missing)[:10]}")
            statement = (
                update(table)
                .where(table.c.sample_id == bindparam("b_sample_id"))
                .values(logits=bindparam("b_logits"), logits_classes=list(classes), logits_model_version=model_version)
            )
            connection.execute(statement, rows)

    def load(self) -> list[Exemplar]:
        """Every exemplar, by class name and sample id."""
        table = EXEMPLARS
        query = select(table).order_by(table.c.class_name, table.c.sample_id)
        with self.engine.connect() as connection:
            return [_exemplar(row._mapping) for row in connection.execute(query)]

    def sample_ids(self) -> set[int]:
        with self.engine.connect() as connection:
            return set(connection.execute(select(EXEMPLARS.c.sample_id)).scalars())

    def missing_logits(self) -> list[int]:
        """Exemplars without stored logits (added since logits were last set)."""
        table = EXEMPLARS
        query = select(table.c.sample_id).where(table.c.logits.is_(None)).order_by(table.c.sample_id)
        with self.engine.connect() as connection:
            return list(connection.execute(query).scalars())

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        with self.engine.connect() as connection:
            for name in connection.execute(select(EXEMPLARS.c.class_name)).scalars():
                counts[name] += 1
        return dict(sorted(counts.items()))

    def __len__(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(EXEMPLARS)).scalar_one())

    @staticmethod
    def _present(connection: Connection, ids: Sequence[int]) -> set[int]:
        table, found = EXEMPLARS, set[int]()
        for chunk in _chunks(sorted(set(ids))):
            found.update(connection.execute(select(table.c.sample_id).where(table.c.sample_id.in_(chunk))).scalars())
        return found


def _exemplar(row: RowMapping) -> Exemplar:
    logits = None if row["logits"] is None else np.frombuffer(bytes(row["logits"]), dtype="<f4").astype(np.float32)
    classes = None if row["logits_classes"] is None else tuple(row["logits_classes"])
    return Exemplar(
        sample_id=int(row["sample_id"]),
        class_name=row["class_name"],
        strategy=row["strategy"],
        model_version=row["model_version"],
        selected_at=as_utc(row["selected_at"]),
        logits=logits,
        logits_classes=classes,
        logits_model_version=row["logits_model_version"],
    )


def _chunks(ids: Sequence[int]) -> list[list[int]]:
    return [list(ids[start : start + _IN_CHUNK]) for start in range(0, len(ids), _IN_CHUNK)]
