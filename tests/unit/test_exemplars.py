"""Exemplar selection under a budget (reservoir, herding, k-center) and the replay buffer in the database."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, insert

from replay_store.exemplars import (
    STRATEGIES,
    Candidate,
    ReplayBuffer,
    candidates_from_store,
    class_quotas,
    herding_order,
    kcenter_order,
    reservoir_keys,
    select_exemplars,
)
from replay_store.models import LABELS, SAMPLES, LabelSource, utcnow
from replay_store.replay_index import write_embeddings
from replay_store.store import NewSample, Store
from tests.conftest import store_url


def _candidates(sizes: dict[str, int], dim: int = 8, seed: int = 0) -> list[Candidate]:
    """Classes of the given sizes, each a blob of embeddings around its own direction."""
    rng = np.random.default_rng(seed)
    candidates, next_id = [], 1
    for position, (name, size) in enumerate(sorted(sizes.items())):
        center = np.zeros(dim, dtype=np.float32)
        center[position % dim] = 3.0
        for _ in range(size):
            candidates.append(
                Candidate(next_id, name, _content(next_id), center + rng.normal(size=dim).astype(np.float32))
            )
            next_id += 1
    return candidates


def _content(sample_id: int) -> str:
    return hashlib.sha256(f"image {sample_id}".encode()).hexdigest()


def _ids(selection: list[Candidate]) -> list[int]:
    return [candidate.sample_id for candidate in selection]


# ------------------------------------------------------------------------------------------ quotas


def test_class_quotas_share_the_budget_and_pass_on_what_a_class_cannot_use() -> None:
    assert class_quotas({"a": 50, "b": 50, "c": 50}, 30) == {"a": 10, "b": 10, "c": 10}
    assert class_quotas({"c": 50, "a": 50, "b": 50}, 31) == {"a": 11, "b": 10, "c": 10}, "remainder by name"
    assert class_quotas({"a": 2, "b": 50, "c": 50}, 30) == {"a": 2, "b": 14, "c": 14}
    assert class_quotas({"a": 2, "b": 5, "c": 50, "d": 0}, 30) == {"a": 2, "b": 5, "c": 23, "d": 0}
    assert class_quotas({"a": 3, "b": 4}, 100) == {"a": 3, "b": 4}
    assert class_quotas({"a": 3, "b": 4}, 0) == {"a": 0, "b": 0}
    assert class_quotas({}, 10) == {}
    with pytest.raises(ValueError):
        class_quotas({"a": 1}, -1)


# ------------------------------------------------------------------------------------------ strategies


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", [0, 1, 7, 30, 1000])
def test_every_strategy_respects_the_budget_and_balances_classes(strategy: str, budget: int) -> None:
    sizes = {"crack": 40, "good": 120, "scratch": 5}
    candidates = _candidates(sizes)
    selection = select_exemplars(candidates, budget, strategy, seed=3)
    assert len(selection) == min(budget, sum(sizes.values()))
    assert len(set(_ids(selection))) == len(selection)
    counts = Counter(candidate.class_name for candidate in selection)
    assert counts == Counter({k: v for k, v in class_quotas(sizes, budget).items() if v})
    if budget == 30:
        assert counts == {"crack": 13, "good": 12, "scratch": 5}, "the small class's rest goes to the others"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_deterministic_and_ignores_input_order(strategy: str) -> None:
    candidates = _candidates({"a": 30, "b": 30})
    shuffled = [candidates[i] for i in np.random.default_rng(9).permutation(len(candidates))]
    first = select_exemplars(candidates, 10, strategy, seed=5)
    assert _ids(select_exemplars(candidates, 10, strategy, seed=5)) == _ids(first)
    assert _ids(select_exemplars(shuffled, 10, strategy, seed=5)) == _ids(first)


def test_the_reservoir_depends_on_the_seed_and_is_uniform() -> None:
    candidates = _candidates({"a": 20})
    assert set(_ids(select_exemplars(candidates, 5, seed=1))) != set(_ids(select_exemplars(candidates, 5, seed=2)))
    # Every sample is kept with probability k/n = 0.25 over seeds.
    ids = np.arange(1, 21)
    kept = np.zeros(20)
    for seed in range(4000):
        kept[np.argsort(reservoir_keys(ids, seed), kind="stable")[:5]] += 1
    assert np.allclose(kept / 4000, 0.25, atol=0.03), kept / 4000


def test_the_reservoir_keeps_the_same_images_whatever_sample_ids_they_arrived_under() -> None:
    contents = [_content(i) for i in range(40)]
    arrival = [Candidate(i + 1, "a", content) for i, content in enumerate(contents)]
    reversed_ids = [Candidate(40 - i, "a", content) for i, content in enumerate(contents)]
    kept = {c.content for c in select_exemplars(arrival, 8, seed=3)}
    assert kept == {c.content for c in select_exemplars(reversed_ids, 8, seed=3)}
    assert kept != {c.content for c in select_exemplars(arrival, 8, seed=4)}
    with pytest.raises(ValueError, match="sha256"):
        Candidate(1, "a", "not a hash")


def test_the_reservoir_streams_selecting_from_the_buffer_and_new_samples_equals_the_whole_history() -> None:
    history = _candidates({"a": 300, "b": 200, "c": 8})
    buffer = select_exemplars(history[:400], 30, seed=11)
    for step in range(3):
        arrived = history[400 + 36 * step : 400 + 36 * (step + 1)]
        seen = history[: 400 + 36 * (step + 1)]
        streamed = select_exemplars(buffer + arrived, 30, seed=11)
        assert sorted(_ids(streamed)) == sorted(_ids(select_exemplars(seen, 30, seed=11)))
        if step < 2:  # no new "a" and an unchanged quota: its exemplars (and their stored logits) all stay
            assert [c for c in streamed if c.class_name == "a"] == [c for c in buffer if c.class_name == "a"]
        buffer = streamed
    assert Counter(c.class_name for c in buffer) == {"a": 11, "b": 11, "c": 8}


def test_herding_follows_the_class_mean() -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 8)) + np.array([2.0, 1, 0, 0, 0, 0, 0, 0])
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    mean = unit.mean(axis=0)
    order = herding_order(points, 10)
    assert len(set(order)) == 10
    herding_error = np.linalg.norm(unit[order].mean(axis=0) - mean)
    random_errors = [np.linalg.norm(unit[rng.choice(200, 10, replace=False)].mean(axis=0) - mean) for _ in range(50)]
    assert herding_error < 0.25 * np.median(random_errors)
    assert herding_order(points, 4) == order[:4], "a smaller budget keeps a prefix (iCaRL's reduction)"
    assert sorted(herding_order(points[:3], 10)) == [0, 1, 2]


def test_kcenter_covers_every_cluster_and_spreads_out() -> None:
    rng = np.random.default_rng(1)
    centers = np.eye(8)[:4] * 5
    sizes = [100, 10, 3, 1]  # a big cluster and small far ones: random picks would miss the small ones
    points = np.vstack([c + rng.normal(scale=0.2, size=(n, 8)) for c, n in zip(centers, sizes, strict=True)])
    cluster = np.repeat(np.arange(4), sizes)
    order = kcenter_order(points, 4)
    assert sorted(cluster[order]) == [0, 1, 2, 3]
    assert order[0] < 100, "the first pick is the one nearest the class mean, in the big cluster"

    angles = np.linspace(0, np.pi / 2, 91)  # a quarter circle in 2-D
    arc = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert sorted(kcenter_order(arc, 3)) == [0, 45, 90], "the middle, then both ends"
    assert kcenter_order(arc, 0) == []
    duplicates = np.ones((5, 2))
    assert sorted(kcenter_order(duplicates, 5)) == [0, 1, 2, 3, 4], "never picks the same row twice"


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown exemplar strategy"):
        select_exemplars(_candidates({"a": 3}), 2, "random")
    with pytest.raises(ValueError, match="embedding"):
        select_exemplars([Candidate(1, "a", _content(1)), Candidate(2, "a", _content(2))], 1, "herding")
    with pytest.raises(ValueError, match="twice"):
        select_exemplars([Candidate(1, "a", _content(1)), Candidate(1, "b", _content(1))], 1)
    assert _ids(select_exemplars([Candidate(1, "a", _content(1)), Candidate(2, "a", _content(2))], 1)) in ([1], [2]), (
        "no embedding needed"
    )


# ------------------------------------------------------------------------------------------ the buffer


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store.open(store_url(tmp_path), tmp_path / "blobs")
    yield store
    store.close()


def _labeled_samples(store: Store, sizes: dict[str, int]) -> dict[str, list[int]]:
    batch, labels = [], []
    for name, size in sorted(sizes.items()):
        for i in range(size):
            data = f"{name} {i}".encode()
            batch.append(
                NewSample("cam", f"{name}-{i}", hashlib.sha256(data).hexdigest(), "png", 4, 4, data, label=name)
            )
            labels.append(name)
    by_class: dict[str, list[int]] = {}
    for stored, name in zip(store.add_samples(batch), labels, strict=True):
        by_class.setdefault(name, []).append(stored.sample_id)
    return by_class


def test_the_buffer_round_trips_with_logits(store: Store) -> None:
    samples = _labeled_samples(store, {"crack": 12, "good": 20, "pit": 2})
    buffer = ReplayBuffer(store, budget=9)
    change = buffer.refresh(candidates_from_store(store), model_version="v1")
    assert len(change.added) == 9 and not change.removed and len(buffer) == 9
    assert buffer.class_counts() == {"crack": 4, "good": 3, "pit": 2}
    assert sorted(buffer.missing_logits()) == sorted(change.added)

    classes = ["crack", "good", "pit"]
    logits = {sample_id: np.arange(3, dtype=np.float32) + sample_id for sample_id in change.added}
    buffer.set_logits(logits, classes, model_version="v1")
    loaded = buffer.load()
    assert [e.class_name for e in loaded] == sorted(e.class_name for e in loaded)
    for exemplar in loaded:
        assert exemplar.logits is not None and exemplar.logits.dtype == np.float32
        assert np.array_equal(exemplar.logits, logits[exemplar.sample_id])
        assert exemplar.logits_classes == tuple(classes) and exemplar.logits_model_version == "v1"
        assert (exemplar.strategy, exemplar.model_version) == ("class_balanced_reservoir", "v1")
        assert exemplar.selected_at.tzinfo is not None
    assert buffer.missing_logits() == []

    # A new class arrives: the others shrink, the survivors keep their logits, the newcomers have none.
    samples.update(_labeled_samples(store, {"dent": 10}))
    change = buffer.refresh(candidates_from_store(store), model_version="v2")
    assert len(buffer) == 9 and buffer.class_counts() == {"crack": 3, "dent": 2, "good": 2, "pit": 2}
    assert len(change.removed) == 2 and len(change.added) == 2 and len(change.kept) == 7
    after = {e.sample_id: e for e in buffer.load()}
    for sample_id in change.kept:
        assert np.array_equal(after[sample_id].logits, logits[sample_id])  # type: ignore[arg-type]
        assert after[sample_id].model_version == "v2"
    assert sorted(buffer.missing_logits()) == sorted(change.added)


def test_updates_are_capped_checked_and_transactional(store: Store) -> None:
    samples = _labeled_samples(store, {"crack": 4, "good": 4})
    buffer = ReplayBuffer(store.engine, budget=3)
    first = [Candidate(samples["crack"][0], "crack", _content(1)), Candidate(samples["good"][0], "good", _content(2))]
    buffer.update(first, strategy="herding")
    with pytest.raises(ValueError, match="budget"):
        buffer.update([Candidate(i, "crack", _content(100 + i)) for i in samples["crack"]], strategy="herding")
    with pytest.raises(ValueError, match="twice"):
        buffer.update([first[0], first[0]], strategy="herding")
    with pytest.raises(KeyError, match="not in the replay buffer"):
        buffer.set_logits({first[0].sample_id: [1.0, 2.0], samples["good"][3]: [0.0, 1.0]}, ["crack", "good"])
    with pytest.raises(ValueError, match="2 finite values"):
        buffer.set_logits({first[0].sample_id: [1.0]}, ["crack", "good"])
    assert all(e.logits is None for e in buffer.load()), "a refused set_logits writes nothing"

    buffer.set_logits({first[0].sample_id: [1.0, 2.0]}, ["crack", "good"])
    # An operator corrected the crack exemplar to "good": it stays, under its new class, with its logits.
    change = buffer.update([Candidate(first[0].sample_id, "good", first[0].content)], strategy="kcenter")
    assert change.relabeled == (first[0].sample_id,) and change.removed == (first[1].sample_id,)
    (kept,) = buffer.load()
    assert (kept.class_name, kept.strategy) == ("good", "kcenter")
    assert kept.logits is not None and kept.logits.tolist() == [1.0, 2.0]

    with store.engine.begin() as connection:  # a deleted sample leaves the buffer with it
        connection.execute(delete(SAMPLES).where(SAMPLES.c.id == first[0].sample_id))
    assert len(buffer) == 0 and buffer.sample_ids() == set()


def test_candidates_come_from_human_labels_and_embeddings(store: Store) -> None:
    samples = _labeled_samples(store, {"crack": 3, "good": 3})
    unlabeled_data = b"no label"
    (unlabeled,) = store.add_samples(
        [NewSample("cam", "u", hashlib.sha256(unlabeled_data).hexdigest(), "png", 4, 4, unlabeled_data)]
    )
    pseudo_only = unlabeled.sample_id
    with store.engine.begin() as connection:
        connection.execute(
            insert(LABELS),
            [
                {"sample_id": pseudo_only, "class_name": "crack", "source": LabelSource.PSEUDO.value,
                 "confidence": 0.9, "model_version": "v1", "author": None, "created_at": utcnow()},
                {"sample_id": samples["good"][0], "class_name": "crack", "source": LabelSource.OPERATOR.value,
                 "confidence": 1.0, "model_version": None, "author": "ana", "created_at": utcnow()},
            ],
        )  # fmt: skip
    candidates = candidates_from_store(store, exclude={samples["crack"][1]})
    by_id = {c.sample_id: c.class_name for c in candidates}
    assert pseudo_only not in by_id and samples["crack"][1] not in by_id
    assert by_id[samples["good"][0]] == "crack", "the operator's correction counts"
    assert len(by_id) == 5 and all(c.embedding is None for c in candidates)
    assert pseudo_only in {c.sample_id for c in candidates_from_store(store, sources=["pseudo"])}

    embedded = samples["crack"] + samples["good"][:1]
    vectors = np.random.default_rng(0).normal(size=(len(embedded), 4)).astype(np.float32)
    write_embeddings(store, embedded, vectors, "v1")
    with_vectors = candidates_from_store(store, model_version="v1")
    assert [c.sample_id for c in with_vectors] == sorted(embedded)
    for candidate in with_vectors:
        assert candidate.embedding is not None
        assert np.array_equal(candidate.embedding, vectors[embedded.index(candidate.sample_id)])
    assert len(select_exemplars(with_vectors, 2, "herding")) == 2
