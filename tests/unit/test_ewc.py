"""Online EWC: the formula on hand-made cases, head growth, persistence, and Avalanche's EWCPlugin on a toy case."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from cl_service.learning.ewc import OnlineEWC, empirical_fisher, grow_to

FEATURES, HIDDEN, BATCH = 8, 16, 10


def _toy_data(seed: int, classes: tuple[int, ...], per_class: int = 20) -> tuple[Tensor, Tensor]:
    """Gaussian blobs, one mean per class, shuffled with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in classes:
        mean = torch.randn(FEATURES, generator=torch.Generator().manual_seed(100 + c)) * 2.0
        xs.append(mean + torch.randn(per_class, FEATURES, generator=g))
        ys.append(torch.full((per_class,), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(y), generator=g)
    return x[order].contiguous(), y[order].contiguous()


def _batches(x: Tensor, y: Tensor, size: int = BATCH) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _mlp(out: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, out))


def _grow_head(model: nn.Sequential, out: int) -> None:
    """Append output rows to the last Linear; old rows keep their values (what the real head does)."""
    old = model[2]
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, out)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    model[2] = new


def _perturb(model: nn.Module, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- the formula ----------------------------------------------------------------------------------------------------


def test_fisher_is_mean_over_batches_of_squared_batch_gradients() -> None:
    model = _mlp()
    x, y = _toy_data(0, (0, 1))
    batches = _batches(x, y)
    fisher = empirical_fisher(model, batches)
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for xb, yb in batches:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None
            expected[name] += p.grad.pow(2)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value / len(batches), rtol=1e-6, atol=1e-9)


def test_fisher_leaves_grads_and_mode_alone_and_skips_frozen() -> None:
    model = _mlp()
    model[0].bias.requires_grad_(False)
    model.train()
    x, y = _toy_data(0, (0, 1))
    fisher = empirical_fisher(model, _batches(x, y))
    assert "0.bias" not in fisher and set(fisher) == {"0.weight", "2.weight", "2.bias"}
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no batches"):
        empirical_fisher(model, [])


def test_penalty_is_zero_before_consolidation_and_at_the_anchor() -> None:
    model = _mlp()
    ewc = OnlineEWC(ewc_lambda=10.0, decay=0.5)
    assert ewc.penalty(model).item() == 0.0
    x, y = _toy_data(0, (0, 1))
    ewc.consolidate(model, _batches(x, y))
    assert ewc.penalty(model).item() == 0.0


def test_penalty_is_lambda_times_fisher_weighted_squared_distance_and_quadratic() -> None:
    model = _mlp()
    ewc = OnlineEWC(ewc_lambda=7.0, decay=0.5)
    x, y = _toy_data(0, (0, 1))
    ewc.consolidate(model, _batches(x, y))
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model, 0.1)
    manual = sum((ewc.fisher[k] * (p.detach() - anchor[k]).pow(2)).sum() for k, p in model.named_parameters())
    p1 = ewc.penalty(model)
    torch.testing.assert_close(p1, 7.0 * manual)
    assert p1.item() > 0
    # doubling the distance to the anchor quadruples the penalty
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(anchor[k] + 2.0 * (p - anchor[k]))
    torch.testing.assert_close(ewc.penalty(model), 4.0 * p1, rtol=1e-5, atol=0.0)


def test_penalty_has_gradients_towards_the_anchor() -> None:
    model = _mlp()
    ewc = OnlineEWC(ewc_lambda=1.0)
    x, y = _toy_data(0, (0, 1))
    ewc.consolidate(model, _batches(x, y))
    _perturb(model, 0.1)
    ewc.penalty(model).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None
        expected = 2.0 * ewc.fisher[name] * (p.detach() - ewc.anchor[name])
        torch.testing.assert_close(p.grad, expected)


def test_running_fisher_decays_and_sums() -> None:
    model = _mlp()
    x0, y0 = _toy_data(0, (0, 1))
    x1, y1 = _toy_data(1, (0, 1))
    ewc = OnlineEWC(decay=0.3)
    f0 = ewc.consolidate(model, _batches(x0, y0))
    _perturb(model, 0.05)
    f1 = ewc.consolidate(model, _batches(x1, y1))
    for k in f0:
        torch.testing.assert_close(ewc.fisher[k], 0.3 * f0[k] + f1[k])
        torch.testing.assert_close(ewc.anchor[k], dict(model.named_parameters())[k].detach())
    assert ewc.updates == 2


def test_memory_does_not_grow_with_updates() -> None:
    model = _mlp()
    x, y = _toy_data(0, (0, 1))
    ewc = OnlineEWC()
    ewc.consolidate(model, _batches(x, y))
    size = ewc.nbytes
    assert size == 2 * sum(p.numel() * 4 for p in model.parameters())
    for _ in range(5):
        ewc.consolidate(model, _batches(x, y))
    assert ewc.nbytes == size


# -- growth ------------------------------------------------------------------------------------------------------------


def test_grow_to_pads_zeros_in_one_dimension_only() -> None:
    t = torch.ones(2, 3)
    grown = grow_to(t, (4, 3))
    assert grown.shape == (4, 3) and grown[:2].eq(1).all() and grown[2:].eq(0).all()
    assert grow_to(t, (2, 3)) is t
    for bad in [(1, 3), (4, 4), (2, 3, 1)]:
        with pytest.raises(ValueError):
            grow_to(t, bad)


def test_grown_head_penalises_old_rows_only() -> None:
    model = _mlp(out=2)
    x, y = _toy_data(0, (0, 1))
    ewc = OnlineEWC(ewc_lambda=5.0)
    ewc.consolidate(model, _batches(x, y))
    _grow_head(model, 4)
    assert ewc.penalty(model).item() == 0.0  # new rows may take any value
    with torch.no_grad():
        model[2].weight[2:] += 3.0
        model[2].bias[2:] -= 1.0
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        model[2].weight[:2] += 0.1
    expected = 5.0 * (ewc.fisher["2.weight"] * 0.01).sum()
    torch.testing.assert_close(ewc.penalty(model), expected)


def test_consolidating_a_grown_head_zero_pads_the_running_fisher() -> None:
    model = _mlp(out=2)
    x0, y0 = _toy_data(0, (0, 1))
    ewc = OnlineEWC(decay=0.5)
    f0 = ewc.consolidate(model, _batches(x0, y0))
    _grow_head(model, 4)
    x1, y1 = _toy_data(1, (2, 3))
    f1 = ewc.consolidate(model, _batches(x1, y1))
    assert ewc.fisher["2.weight"].shape == (4, HIDDEN)
    torch.testing.assert_close(ewc.fisher["2.weight"][:2], 0.5 * f0["2.weight"] + f1["2.weight"][:2])
    torch.testing.assert_close(ewc.fisher["2.weight"][2:], f1["2.weight"][2:])
    assert ewc.anchor["2.bias"].shape == (4,)


def test_new_parameters_are_not_penalised_and_shrinking_is_an_error() -> None:
    model = _mlp()
    x, y = _toy_data(0, (0, 1))
    ewc = OnlineEWC()
    ewc.consolidate(model, _batches(x, y))
    model.add_module("extra", nn.Linear(2, 2))
    assert ewc.penalty(model).item() == 0.0
    smaller = _mlp(out=1)
    with pytest.raises(ValueError, match="shrank"):
        ewc.penalty(smaller)


# -- persistence -------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_gives_the_same_penalty() -> None:
    model = _mlp()
    x, y = _toy_data(0, (0, 1))
    ewc = OnlineEWC(ewc_lambda=3.0, decay=0.25)
    ewc.consolidate(model, _batches(x, y))
    ewc.consolidate(model, _batches(*_toy_data(2, (0, 1))))
    _perturb(model, 0.1)
    restored = OnlineEWC()
    restored.load_state_dict(ewc.state_dict())
    assert (restored.ewc_lambda, restored.decay, restored.updates) == (3.0, 0.25, 2)
    assert restored.penalty(model).item() == ewc.penalty(model).item()
    assert restored.metadata()["shapes"]["2.weight"] == [2, HIDDEN]
    with pytest.raises(ValueError, match="version"):
        restored.load_state_dict({**ewc.state_dict(), "version": 99})


def test_save_and_load_safetensors_beside_a_checkpoint(tmp_path: Path) -> None:
    model = _mlp()
    x, y = _toy_data(0, (0, 1))
    ewc = OnlineEWC(ewc_lambda=3.0, decay=0.25)
    ewc.consolidate(model, _batches(x, y))
    path = tmp_path / "ewc.safetensors"
    ewc.save(path)
    loaded = OnlineEWC.load(path)
    assert loaded.metadata() == ewc.metadata()
    for k in ewc.fisher:
        assert torch.equal(loaded.fisher[k], ewc.fisher[k]) and torch.equal(loaded.anchor[k], ewc.anchor[k])
    _perturb(model, 0.1)
    assert loaded.penalty(model).item() == ewc.penalty(model).item()


# -- Avalanche, on the same toy case --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:No loggers specified")  # the run logs nothing on purpose
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # inside Avalanche's ParamData.expand
@pytest.mark.filterwarnings("ignore:JAXopt is no longer maintained")  # imported by Avalanche
def test_matches_avalanche_online_ewc_plugin() -> None:
    """Avalanche's Naive strategy with EWCPlugin(mode="online") on two class-incremental experiences.

    An MLP with an IncrementalClassifier (the head grows 2 -> 4 outputs); every consolidation is mirrored with OnlineEWC
    on the same weights and mini-batches. Compared: importances and anchors, the penalty Avalanche adds to each training
    loss of experience 1, and the plugin's penalty after experience 1 for a perturbed model whose head grew again
    (4 -> 6) as it would during experience 2.
    """
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.models import IncrementalClassifier
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, SupervisedPlugin
    from avalanche.training.supervised import Naive

    lam, decay = 10.0, 0.5
    data = [_toy_data(10, (0, 1)), _toy_data(11, (2, 3))]
    benchmark = tensors_benchmark(train_tensors=data, test_tensors=data, task_labels=[0, 0])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), IncrementalClassifier(HIDDEN, initial_out_features=2))
    ours = OnlineEWC(ewc_lambda=lam, decay=decay)
    penalties: list[tuple[float, float]] = []
    loss_before: list[Tensor] = []

    class Mirror(SupervisedPlugin):  # type: ignore[misc]
        """Before EWCPlugin in the list: consolidates OnlineEWC on the weights Avalanche is about to use."""

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            x, y = data[strategy.clock.train_exp_counter]
            ours.consolidate(strategy.model, _batches(x, y, strategy.train_mb_size))

        def before_backward(self, strategy: Any, **kwargs: Any) -> None:
            loss_before.append(strategy.loss.detach().clone())

    class After(SupervisedPlugin):  # type: ignore[misc]
        """After EWCPlugin: what it added to the loss vs our penalty on the same model."""

        def before_backward(self, strategy: Any, **kwargs: Any) -> None:
            added = float(strategy.loss.detach() - loss_before[-1])
            if strategy.clock.train_exp_counter > 0:
                with torch.no_grad():
                    penalties.append((added, float(ours.penalty(strategy.model))))

    plugin = EWCPlugin(ewc_lambda=lam, mode="online", decay_factor=decay, keep_importance_data=True)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=BATCH,
        train_epochs=2,
        eval_mb_size=BATCH,
        plugins=[Mirror(), plugin, After()],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    for experience in benchmark.train_stream:
        strategy.train(experience)

    # importances and anchors after both experiences (running Fisher = 0.5 * padded F0 + F1)
    assert ours.updates == 2
    for name, p in model.named_parameters():
        imp, saved = plugin.importances[1][name].data, plugin.saved_params[1][name].data
        torch.testing.assert_close(ours.fisher[name], imp, rtol=1e-6, atol=1e-10)
        assert torch.equal(ours.anchor[name], saved)
        assert torch.equal(saved, p.detach())
    assert ours.fisher["2.classifier.weight"].shape == (4, HIDDEN)

    # the penalty added to every loss while training experience 1 (head grown 2 -> 4 since the anchor)
    assert len(penalties) == 2 * 4  # two epochs of four mini-batches
    assert penalties[-1][0] > 1e-6
    for theirs, mine in penalties:
        assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7)  # `added` is a difference of two float32 losses

    # the penalty after experience 1, head grown again and weights moved: computed by the plugin itself
    model[2].adaptation(SimpleNamespace(classes_in_this_experience=[4, 5]))
    assert model[2].classifier.weight.shape == (6, HIDDEN)
    _perturb(model, 0.2, seed=3)
    fake = SimpleNamespace(clock=SimpleNamespace(train_exp_counter=2), model=model, device="cpu", loss=0.0)
    plugin.before_backward(fake)
    theirs = float(fake.loss.detach())
    with torch.no_grad():
        mine = float(ours.penalty(model))
    print(f"in-training penalties (avalanche, ours): {penalties}; after growth: {theirs!r} vs {mine!r}")
    assert theirs > 0.01
    assert mine == pytest.approx(theirs, rel=1e-6)
