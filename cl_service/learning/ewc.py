"""Online Elastic Weight Consolidation: one running diagonal Fisher and one anchor, whatever the number of updates.

EWC (Kirkpatrick et al., 2017) adds `lambda * sum_i F_i * (theta_i - theta*_i)^2` to the loss, so that weights that
mattered for what the model already knows stay near their consolidated values `theta*`. The online variant
(Schwarz et al., 2018, "Progress & Compress") keeps a single Fisher, decayed and summed after every update, so memory is
two copies of the trainable parameters (Fisher + anchor) and does not grow with the age of the deployment.

The numbers are those of Avalanche's `EWCPlugin(mode="online")` (avalanche-lib 0.6.0, `training/plugins/ewc.py`),
which a test checks on a shared toy case:

- the Fisher of one update is the mean over mini-batches of the squared gradient of the *batch-mean* loss (the model in
  eval mode): Avalanche's empirical approximation, not a per-sample Fisher, so `ewc_lambda` values carry over;
- `running = decay * running + fisher_new` (the first update just stores `fisher_new`);
- `penalty = ewc_lambda * sum_params sum(F * (theta - anchor)^2)`: no factor 1/2;
- a parameter that grew along one dimension (a classifier head with new classes) keeps its old entries: Avalanche
  zero-pads both the importance and the anchor (`ParamData.expand`), so the new rows are not penalised. Here the
  current parameter is sliced to the old shape instead, which is the same sum without the padding copies.
  Parameters that are new since the last consolidation are not penalised.

Importing this module does not import Avalanche (it takes seconds and stays off the serving path).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]
ForwardFn = Callable[[Tensor], Tensor]

STATE_VERSION = 1
_FISHER = "fisher."
_ANCHOR = "anchor."


def grow_to(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    """Zero-pad `tensor` along at most one dimension up to `shape` (Avalanche's `ParamData.expand`).

    A shape that shrinks, changes rank or grows in two dimensions is not a grown classifier head: ValueError.
    """
    old = tuple(tensor.shape)
    new = tuple(shape)
    _check_growth(old, new)
    if old == new:
        return tensor
    grown = tensor.new_zeros(new)
    grown[tuple(slice(0, size) for size in old)] = tensor
    return grown


def _check_growth(old: tuple[int, ...], new: tuple[int, ...]) -> None:
    if len(old) != len(new):
        raise ValueError(f"a parameter changed rank from {old} to {new}")
    grown = [dim for dim, (o, n) in enumerate(zip(old, new, strict=True)) if n != o]
    if any(new[dim] < old[dim] for dim in grown):
        raise ValueError(f"a parameter shrank from {old} to {new}")
    if len(grown) > 1:
        raise ValueError(f"a parameter grew in more than one dimension: {old} -> {new}")


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    loss_fn: LossFn = F.cross_entropy,
    *,
    forward: ForwardFn | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the trainable parameters: mean over batches of (d batch_loss / d theta)^2.

    `batches` yields `(inputs, targets, ...)` already on the model's device (extra items, e.g. task labels, are
    ignored); `forward(inputs)` gives the logits (default: `model(inputs)`). The model runs in eval mode (as in
    Avalanche) and gets its previous mode back; parameter `.grad` fields are left untouched. Unused parameters get a
    zero Fisher.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameters that require grad")
    params = [p for _, p in named]
    fisher = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    run = forward if forward is not None else model
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            inputs, targets = batch[0], batch[1]
            loss = loss_fn(run(inputs), targets)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, grad in zip(fisher, grads, strict=True):
                if grad is not None:
                    acc.add_(grad.detach().pow(2))
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no batches to compute the Fisher from")
    return {name: acc.div_(float(count)) for (name, _), acc in zip(named, fisher, strict=True)}


class OnlineEWC:
    """One running Fisher and one anchor; `consolidate` after each update, `penalty` during the next one.

    ```
    ewc = OnlineEWC(ewc_lambda=100.0, decay=0.5)
    ... train update 1 ...
    ewc.consolidate(model, loader)                       # Fisher of update 1, anchor = weights after it
    ... during update 2: loss = task_loss + ewc.penalty(model) ...
    ewc.consolidate(model, loader2)                      # running = 0.5 * running + Fisher of update 2
    ewc.save(checkpoint_dir / "ewc.safetensors")         # persists between updates, beside the model checkpoint
    ```
    """

    def __init__(self, ewc_lambda: float = 100.0, decay: float = 0.5) -> None:
        if ewc_lambda < 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        _check_decay(decay)
        self.ewc_lambda = float(ewc_lambda)
        self.decay = float(decay)
        self.updates = 0
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    @property
    def consolidated(self) -> bool:
        """Whether there is anything to hold the weights to (at least one `consolidate`)."""
        return self.updates > 0

    @property
    def nbytes(self) -> int:
        """Memory held (Fisher + anchor): bounded by twice the trainable parameters, whatever `updates` is."""
        tensors = [*self.fisher.values(), *self.anchor.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def consolidate(
        self,
        model: nn.Module,
        batches: Iterable[Sequence[Tensor]],
        loss_fn: LossFn = F.cross_entropy,
        *,
        decay: float | None = None,
        forward: ForwardFn | None = None,
    ) -> dict[str, Tensor]:
        """Fold the Fisher of `batches` into the running one and take the current weights as the new anchor.

        Call it at the end of an update, on (a sample of) that update's training data; returns the new Fisher alone.
        """
        fisher_new = empirical_fisher(model, batches, loss_fn, forward=forward)
        self.fold(model, fisher_new, decay=decay)
        return fisher_new

    @torch.no_grad()
    def fold(self, model: nn.Module, fisher_new: Mapping[str, Tensor], *, decay: float | None = None) -> None:
        """`running = decay * running + fisher_new` (old entries zero-padded to grown shapes); anchor = current weights.

        A parameter that is frozen now but had a Fisher keeps its decayed Fisher, as in Avalanche (where its new
        importance is zero); one that left the model is dropped.
        """
        factor = self.decay if decay is None else float(decay)
        _check_decay(factor)
        current = dict(model.named_parameters())
        running: dict[str, Tensor] = {}
        for name, new in fisher_new.items():
            if name not in current:
                raise ValueError(f"the Fisher names a parameter the model does not have: {name}")
            new = new.detach()
            old = self.fisher.get(name)
            running[name] = new.clone() if old is None else grow_to(old.to(new), new.shape).mul(factor).add_(new)
        for name, old in self.fisher.items():
            if name not in running and name in current:
                running[name] = grow_to(old, current[name].shape).mul(factor)
        self.fisher = running
        self.anchor = {name: current[name].detach().clone() for name in running}
        self.updates += 1

    def penalty(self, model: nn.Module) -> Tensor:
        """`ewc_lambda * sum F * (theta - anchor)^2` over the anchored parameters (old entries only where they grew).

        Differentiable in the model's parameters; a zero scalar before the first `consolidate`.
        """
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        total = torch.zeros((), device=device)
        if not self.consolidated:
            return total
        for name, param in model.named_parameters():
            anchor = self.anchor.get(name)
            if anchor is None:
                continue  # new since the last consolidation: not penalised
            old_shape = tuple(anchor.shape)
            _check_growth(old_shape, tuple(param.shape))
            current = param[tuple(slice(0, size) for size in old_shape)]
            fisher = self.fisher[name].to(device=param.device, dtype=param.dtype)
            anchor = anchor.to(device=param.device, dtype=param.dtype)
            total = total + (fisher * (current - anchor).pow(2)).sum()
        return self.ewc_lambda * total

    def to(self, device: torch.device | str) -> OnlineEWC:
        """Move Fisher and anchor to `device` (e.g. the training device, so `penalty` copies nothing)."""
        self.fisher = {k: v.to(device) for k, v in self.fisher.items()}
        self.anchor = {k: v.to(device) for k, v in self.anchor.items()}
        return self

    # -- persistence ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The JSON-friendly part of the state: hyper-parameters, update count, names and shapes."""
        return {
            "version": STATE_VERSION,
            "ewc_lambda": self.ewc_lambda,
            "decay": self.decay,
            "updates": self.updates,
            "shapes": {name: list(t.shape) for name, t in self.fisher.items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to carry on after a restart (tensors are detached CPU copies)."""
        return {
            **self.metadata(),
            "fisher": {k: v.detach().cpu().clone() for k, v in self.fisher.items()},
            "anchor": {k: v.detach().cpu().clone() for k, v in self.anchor.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (hyper-parameters included)."""
        version = int(state.get("version", -1))
        if version != STATE_VERSION:
            raise ValueError(f"unsupported OnlineEWC state version {version} (expected {STATE_VERSION})")
        fisher = {str(k): torch.as_tensor(v).clone() for k, v in state["fisher"].items()}
        anchor = {str(k): torch.as_tensor(v).clone() for k, v in state["anchor"].items()}
        if fisher.keys() != anchor.keys():
            raise ValueError("Fisher and anchor name different parameters")
        for name, value in fisher.items():
            if value.shape != anchor[name].shape:
                raise ValueError(f"Fisher and anchor of {name} differ in shape: {value.shape} vs {anchor[name].shape}")
        ewc_lambda, decay = float(state["ewc_lambda"]), float(state["decay"])
        _check_decay(decay)
        self.ewc_lambda, self.decay, self.updates = ewc_lambda, decay, int(state["updates"])
        self.fisher, self.anchor = fisher, anchor

    def save(self, path: str | Path) -> None:
        """Write the state as one safetensors file (tensors `fisher.<name>` / `anchor.<name>`, metadata as JSON)."""
        from safetensors.torch import save_file  # a light import, but only needed here

        tensors = {_FISHER + k: v.detach().cpu().contiguous() for k, v in self.fisher.items()}
        tensors.update({_ANCHOR + k: v.detach().cpu().contiguous() for k, v in self.anchor.items()})
        save_file(tensors, str(path), metadata={"online_ewc": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path) -> OnlineEWC:
        """Read what `save` wrote."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if "online_ewc" not in meta:
                raise ValueError(f"{path} holds no OnlineEWC state")
            state: dict[str, Any] = json.loads(meta["online_ewc"])
            state["fisher"], state["anchor"] = {}, {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                prefix, _, name = key.partition(".")
                if prefix not in ("fisher", "anchor"):
                    raise ValueError(f"{path}: unexpected tensor {key!r} in an OnlineEWC file")
                state[prefix][name] = handle.get_tensor(key)
        ewc = cls()
        ewc.load_state_dict(state)
        return ewc


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
