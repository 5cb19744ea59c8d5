"""Per-example gradients of the trainable (LoRA) parameters, from one batched forward/backward.

Every `nn.Linear` whose weight is trainable gets a forward hook that keeps its input and hooks the
gradient of its output. For a loss that is a *sum* of per-row losses, row b's weight gradient is
`grad_out[b]^T @ input[b]` summed over that row's positions: the usual per-sample trick (Opacus,
Goodfellow 2015). Rows never mix because a transformer with an attention mask keeps them apart, so
padding and other rows' lengths cannot change a row's gradient (tested against a batch-size-1 loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rose_trl.gradients.sft_loss import pass_loss
from rose_trl.utils.distributed import deepspeed_adam_moments, full_numel, is_deepspeed_param, whole


class UnsupportedParameterError(ValueError):
    """A trainable parameter is not owned by an `nn.Linear`, so the batched hooks cannot see it."""


class MissingAdamStateError(ValueError):
    """Adam preconditioning was asked for but the optimizer holds no exp_avg/exp_avg_sq for a parameter."""


def adam_hyperparameters(group: dict) -> tuple[float, float, float]:
    """(beta1, beta2, eps) of an Adam/AdamW param group (live or saved)."""
    return float(group["betas"][0]), float(group["betas"][1]), float(group["eps"])


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters in `model.named_parameters()` order: the layout of every gradient row."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def num_trainable_parameters(model: nn.Module) -> int:
    return sum(full_numel(p) for _, p in trainable_parameters(model))


@contextlib.contextmanager
def activation_checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Checkpointing re-runs forwards inside backward, which would fire the capture hooks twice."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


class DenseRows:
    """Sink of a capture pass: every parameter's per-row gradient in one [rows, n_params] float32 buffer
    (parameters in `named_parameters()` order), `rows`. What `per_example_gradients` returns."""

    def __init__(self, rows: int, num_params: int, device: torch.device):
        self.rows = torch.zeros(rows, num_params, dtype=torch.float32, device=device)

    def add(self, start: int, block: torch.Tensor) -> None:
        self.rows[:, start : start + block.shape[1]] = block

    def missing(self, start: int, n: int) -> None:
        """Parameters [start, start + n) got no gradient in this pass: they stay zero."""


class ProjectedRows:
    """Fused sink: each layer's per-row gradient block is Adam-preconditioned with that layer's slice of m
    and v and projected with that layer's slice of the projection, then added into a [rows, dim]
    accumulator, `rows`, as soon as the backward reaches the layer. The [rows, n_params] buffer never exists: the
    memory of a pass's gradient path per row is O(dim + largest layer), whatever the adapter's depth.

    Equal to preconditioning then projecting the whole row (the Adam transform is elementwise and the
    projection is linear in the parameter coordinates), up to float summation order (tests/test_fused.py).
    """

    def __init__(self, rows: int, projector, adam_state: AdamState | None, device: torch.device):
        self.projector = projector
        self.adam = adam_state
        self.rows = torch.zeros(rows, projector.dim, dtype=torch.float32, device=device)

    def add(self, start: int, block: torch.Tensor) -> None:
        if self.adam is not None:
            block = self.adam.precondition_(block, start)
        self.projector.add_projection(self.rows, block, start)

    def missing(self, start: int, n: int) -> None:
        # A zero gradient is not a zero Adam feature: b1*m / sqrt(b2*v + eps), the same for every row.
        if self.adam is None:
            return
        row = self.adam.precondition_(torch.zeros(1, n, dtype=torch.float32, device=self.rows.device), start)
        shared = torch.zeros(1, self.rows.shape[1], dtype=torch.float32, device=self.rows.device)
        self.projector.add_projection(shared, row, start)
        self.rows += shared


class PerExampleGradientCapture:
    """Per-row gradients of every trainable parameter from one batched forward and backward of
    `sum_b loss_b`, handed layer by layer to a sink (`DenseRows` or `ProjectedRows`).

        with capture:
            sink = capture.reset(rows, device)      # DenseRows unless a sink is given
            loss = ...forward...
            capture.backward(loss)                  # sink now holds every row's gradient

    Each hooked layer's forward is recorded; its output gets a gradient hook and a zero "tap" (a scalar
    leaf added to the output). The backward is taken with respect to the taps only: no parameter's
    `.grad` is written (a live training run's accumulators stay untouched), no data-parallel gradient
    reduction fires, and autograd returns scalars instead of a full gradient per layer output.
    """

    def __init__(self, model: nn.Module):
        self.params = trainable_parameters(model)
        if not self.params:
            raise UnsupportedParameterError(
                "the model has no trainable parameters (is the LoRA adapter attached and active?)"
            )
        slices: dict[int, tuple[int, int]] = {}
        offset = 0
        for _, p in self.params:
            # full_numel: under ZeRO-3 a partitioned parameter's numel() is 0 outside its layer's forward.
            slices[id(p)] = (offset, full_numel(p))
            offset += full_numel(p)
        self.num_params = offset
        # Slices are looked up by module, not by weight: FSDP2 swaps a module's sharded weights for
        # unsharded ones around each forward/backward, so the weight seen then is another tensor.
        self._module_slices: dict[int, tuple[tuple[int, int] | None, tuple[int, int] | None]] = {}
        self._modules: list[nn.Linear] = []
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            weight = slices.get(id(module.weight))
            bias = slices.get(id(module.bias)) if module.bias is not None else None
            if weight is not None or bias is not None:
                self._modules.append(module)
                self._module_slices[id(module)] = (weight, bias)
        covered = {id(m.weight) for m in self._modules} | {id(m.bias) for m in self._modules if m.bias is not None}
        uncovered = [name for name, p in self.params if id(p) not in covered]
        if uncovered:
            raise UnsupportedParameterError(
                f"per-example hooks cover nn.Linear layers only; these trainable parameters are not: {uncovered[:5]}"
                + (" ..." if len(uncovered) > 5 else "")
            )
        self.sink: DenseRows | ProjectedRows | None = None
        self._taps: list[torch.Tensor] = []
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> PerExampleGradientCapture:
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        # A forward without backward (an error in between) must not keep them.
        self._taps = []
        self._calls = {}

    def reset(self, rows: int, device: torch.device, sink: DenseRows | ProjectedRows | None = None):
        """Start a pass of `rows` rows; returns its sink (a `DenseRows` unless one is given)."""
        self.sink = sink if sink is not None else DenseRows(rows, self.num_params, device)
        self._taps = []
        self._calls = {}
        return self.sink

    def backward(self, loss: torch.Tensor) -> None:
        """Run the backward of `loss` (a sum of per-row losses) and fill the sink."""
        taps, self._taps = self._taps, []
        if not taps:
            raise UnsupportedParameterError("no hooked layer ran in this forward (is the LoRA adapter active?)")
        self._remaining = dict(self._calls)
        self._pending = {}
        self._emitted = set()
        try:
            torch.autograd.grad(loss, taps, allow_unused=True)
            # Layers some of whose calls got no gradient (an output that does not reach the loss) are
            # complete now; layers that got none at all have a zero gradient.
            for module, rows_grads in self._pending.values():
                self._emit(module, rows_grads)
            for module in self._modules:
                if id(module) not in self._emitted:
                    for rng in self._module_slices[id(module)]:
                        if rng is not None:
                            self.sink.missing(*rng)
        finally:
            self._pending = {}
            self._calls = {}

    def _forward_hook(self, module: nn.Linear, inputs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None
        x = inputs[0].detach()  # shares the storage autograd saves for the layer's own weight gradient
        tap = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
        tapped = output + tap  # equal to output; d(loss)/d(tap) is a scalar, so autograd keeps no per-layer gradient
        # The hook is kept by the autograd graph, not by us: nothing of this pass outlives its backward.
        tapped.register_hook(lambda grad_out, m=module, x=x: self._on_gradient(m, x, grad_out))
        self._taps.append(tap)
        self._calls[id(module)] = self._calls.get(id(module), 0) + 1
        return tapped

    def _on_gradient(self, module: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        rows = x.shape[0]
        g = grad_out.reshape(rows, -1, grad_out.shape[-1]).float()
        a = x.reshape(rows, -1, x.shape[-1]).float()
        weight, bias = self._module_slices[id(module)]
        # Per-row weight gradient: sum over positions of grad_out[b, t]^T x[b, t].
        blocks = (
            torch.bmm(g.transpose(1, 2), a).reshape(rows, -1) if weight is not None else None,
            g.sum(dim=1) if bias is not None else None,
        )
        key = id(module)
        if key in self._pending:  # a layer called several times: the Adam transform needs the sum of its calls
            blocks = tuple(b if p is None else p + b for p, b in zip(self._pending.pop(key)[1], blocks, strict=True))
        self._remaining[key] -= 1
        if self._remaining[key] > 0:
            self._pending[key] = (module, blocks)
        else:
            self._emit(module, blocks)

    def _emit(self, module: nn.Linear, blocks) -> None:
        for rng, block in zip(self._module_slices[id(module)], blocks, strict=True):
            if rng is not None:
                self.sink.add(rng[0], block)
        self._emitted.add(id(module))


@dataclass
class AdamState:
    """Flattened Adam moments of the trainable parameters, and the optimizer's b1, b2, eps."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]]) -> AdamState:
        """Read m, v, betas and eps from a live (possibly accelerate-wrapped) torch Adam/AdamW, or from a
        DeepSpeed ZeRO optimizer; under ZeRO and FSDP2 every rank must call this (the moments are gathered)."""
        if any(is_deepspeed_param(p) for _, p in params):
            # ZeRO keeps flat partitions of m and v in its inner optimizer; DeepSpeed reassembles them per parameter.
            exp_avg, exp_avg_sq = deepspeed_adam_moments(params)
            hyper = {adam_hyperparameters(g) for g in optimizer.param_groups}
            return cls.from_named_moments(exp_avg, exp_avg_sq, hyper, params, source="the DeepSpeed optimizer")
        while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer and similar wrappers
            optimizer = optimizer.optimizer
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        ms, vs = [], []
        hyper = set()
        for name, p in params:
            state = optimizer.state.get(p, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state or id(p) not in group_of:
                raise MissingAdamStateError(
                    f"optimizer {type(optimizer).__name__} has no Adam state (exp_avg/exp_avg_sq) for '{name}': "
                    "Adam preconditioning needs at least one AdamW step; use gradient_type='sgd' otherwise"
                )
            g = group_of[id(p)]
            hyper.add(adam_hyperparameters(g))
            # whole(): FSDP2 keeps m and v as DTensors sharded like their parameter (a collective).
            ms.append(whole(state["exp_avg"].detach()).reshape(-1).float())
            vs.append(whole(state["exp_avg_sq"].detach()).reshape(-1).float())
        return cls._build(ms, vs, hyper)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict, params: list[tuple[str, nn.Parameter]], param_index: dict[str, int]
    ) -> AdamState:
        """Read a saved optimizer state dict (e.g. a Trainer checkpoint's optimizer.pt).

        `param_index` maps each parameter name to its integer id in the state dict, which is the
        position in the optimizer's param_groups at creation (see `trainer_param_index`).
        """
        hyper_of = {}
        for g in state_dict["param_groups"]:
            for idx in g["params"]:
                hyper_of[idx] = adam_hyperparameters(g)
        ms, vs = [], []
        hyper = set()
        for name, p in params:
            idx = param_index.get(name)
            state = state_dict["state"].get(idx, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                raise MissingAdamStateError(
                    f"saved optimizer state has no exp_avg/exp_avg_sq for '{name}' (index {idx})"
                )
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if m.numel() != p.numel():
                raise MissingAdamStateError(
                    f"saved optimizer state for '{name}' (index {idx}) has {m.numel()} values, the parameter has "
                    f"{p.numel()}: the checkpoint was written for a different model or adapter"
                )
            hyper.add(hyper_of[idx])
            ms.append(m.reshape(-1).float())
            vs.append(v.reshape(-1).float())
        return cls._build(ms, vs, hyper)

    @classmethod
    def from_named_moments(
        cls,
        exp_avg: dict,
        exp_avg_sq: dict,
        hyper: set,
        params: list[tuple[str, nn.Parameter]],
        source: str = "checkpoint",
    ) -> AdamState:
        """Build from m and v keyed by parameter name (e.g. read from a DeepSpeed checkpoint)."""
        ms, vs = [], []
        for name, p in params:
            if name not in exp_avg or name not in exp_avg_sq:
                raise MissingAdamStateError(
                    f"{source} has no Adam state (exp_avg/exp_avg_sq) for '{name}': Adam preconditioning needs an "
                    "Adam/AdamW optimizer and at least one step; use gradient_type='sgd' otherwise"
                )
            if exp_avg[name].numel() != full_numel(p):
                raise MissingAdamStateError(
                    f"{source}: '{name}' has {exp_avg[name].numel()} Adam values, the parameter has {full_numel(p)}: "
                    "the checkpoint was written for a different model or adapter"
                )
            ms.append(exp_avg[name].reshape(-1).float())
            vs.append(exp_avg_sq[name].reshape(-1).float())
        return cls._build(ms, vs, set(hyper))

    @classmethod
    def _build(cls, ms, vs, hyper) -> AdamState:
        if len(hyper) != 1:
            raise ValueError(f"parameters use different Adam (beta1, beta2, eps): {sorted(hyper)}")
        b1, b2, eps = hyper.pop()
        return cls(torch.cat(ms), torch.cat(vs), b1, b2, eps)

    def to(self, device: torch.device) -> AdamState:
        return AdamState(self.exp_avg.to(device), self.exp_avg_sq.to(device), self.beta1, self.beta2, self.eps)

    def precondition_(self, grads: torch.Tensor, start: int = 0) -> torch.Tensor:
        """LESS's Adam update direction, per row, in place: (b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g^2 + eps),
        for the parameters [start, start + grads.shape[1]) (a layer's block of a fused pass). Two row-sized
        temporaries (tests/test_fused.py checks it against the formula written out)."""
        n = grads.shape[-1]
        m = self.exp_avg[start : start + n].to(grads.device)
        v = self.exp_avg_sq[start : start + n].to(grads.device)
        denominator = grads.square().mul_(1 - self.beta2).add_(self.beta2 * v).add_(self.eps).sqrt_()
        return grads.mul_(1 - self.beta1).add_(self.beta1 * m).div_(denominator)


def trainer_param_index(model: nn.Module) -> dict[str, int]:
    """Name -> index in a `transformers.Trainer` optimizer's state dict.

    Trainer.create_optimizer puts the trainable weight-decay parameters first, then the others, each in
    `named_parameters()` order; a saved state dict numbers parameters in that order.
    """
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ordered = [n for n in names if n in decay] + [n for n in names if n not in decay]
    return {n: i for i, n in enumerate(ordered)}


def _capture_pass(
    model: nn.Module, batch: dict, sink: DenseRows | ProjectedRows | None = None
) -> DenseRows | ProjectedRows:
    capture = PerExampleGradientCapture(model)
    with activation_checkpointing_off(model), capture, torch.enable_grad():
        sink = capture.reset(batch["input_ids"].shape[0], batch["input_ids"].device, sink)
        capture.backward(pass_loss(model, batch))
    return sink


def per_example_gradients(
    model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer | None = None, adam_state: AdamState | None = None
) -> torch.Tensor:
    """The gradient of each row's own SFT loss with respect to the trainable (LoRA) parameters.

    One forward and one backward for the whole batch: hooks on the LoRA linear layers take each row's gradient,
    equal to a batch-size-1 loop's. The loss of a row is its token-mean cross entropy over its labelled (response)
    tokens. With an Adam/AdamW `optimizer` that has state, or an explicit `adam_state`, the rows are
    Adam-preconditioned as in LESS, `(b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g^2 + eps)` with b1, b2, eps from the
    optimizer; otherwise they are plain (SGD) gradients. The model's train/eval mode is left as the caller set it.

    Args:
        model (`torch.nn.Module`):
            A causal LM whose trainable parameters are LoRA linear weights (a `peft` model).
        batch (`dict`):
            `input_ids`, `attention_mask` and `labels` (-100 outside the response), each `[rows, length]`.
        optimizer (`torch.optim.Optimizer`, *optional*):
            The live Adam/AdamW optimizer of `model` (accelerate-wrapped or not); its `exp_avg`/`exp_avg_sq` give
            the preconditioning. An `AdamState` passed here positionally is taken as `adam_state`.
        adam_state (`AdamState`, *optional*):
            Adam moments and hyperparameters given directly, e.g. a checkpoint's (`AdamState.from_state_dict`).
            Not together with `optimizer`.

    Returns:
        `torch.Tensor`: float32 `[rows, n_trainable_parameters]`, parameters in `model.named_parameters()` order.

    Example:

    ```python
    from rose_trl import per_example_gradients

    loss = model(**batch).loss  # a LoRA model training with AdamW
    loss.backward()
    optimizer.step()
    rows = per_example_gradients(model, batch, optimizer=optimizer)  # [len(batch["input_ids"]), n_lora_params]
    ```
    """
    if isinstance(optimizer, AdamState):  # per_example_gradients(model, batch, adam_state) positionally
        if adam_state is None:
            adam_state = optimizer
        optimizer = None
    if optimizer is not None:
        if adam_state is not None:
            raise TypeError("per_example_gradients: pass optimizer or adam_state, not both")
        adam_state = AdamState.from_optimizer(optimizer, trainable_parameters(model))
    grads = _capture_pass(model, batch).rows
    if adam_state is not None:
        grads = adam_state.precondition_(grads)
    return grads


def per_example_projected_gradients(
    model: nn.Module, batch: dict, projector, adam_state: AdamState | None = None
) -> torch.Tensor:
    """`projector.project(per_example_gradients(model, batch, adam_state=adam_state))`, fused: float32
    [batch, projector.dim] computed layer by layer inside the backward (`ProjectedRows`), without the
    [batch, n_params] buffer. The projector must support row slices (`projector.supports_slices`)."""
    if not projector.supports_slices:
        raise ValueError(
            f"{projector.implementation} cannot project a slice of the parameters: use "
            "per_example_gradients and project the whole rows"
        )
    sink = ProjectedRows(batch["input_ids"].shape[0], projector, adam_state, batch["input_ids"].device)
    return _capture_pass(model, batch, sink).rows
