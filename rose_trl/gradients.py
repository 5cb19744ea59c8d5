"""Per-example gradients of the trainable (LoRA) parameters, from one batched forward/backward.

Every `nn.Linear` whose weight is trainable gets a forward hook that keeps its input and hooks the
gradient of its output. For a loss that is a *sum* of per-row losses, row b's weight gradient is
`grad_out[b]^T @ input[b]` summed over that row's positions: the usual per-sample trick (Opacus,
Goodfellow 2015). Rows never mix because a transformer with an attention mask keeps them apart, so
padding and other rows' lengths cannot change a row's gradient (tested against a batch-size-1 loop).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import deepspeed_adam_moments, full_numel, is_deepspeed_param, whole

IGNORE_INDEX = -100


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


class PerExampleGradientCapture:
    """Collects per-row gradients of every trainable parameter into a [rows, n_params] float32 buffer.

    Use as a context manager around a forward and a backward of `sum_b loss_b`; after the backward,
    `self.grads[b]` is the gradient of `loss_b` (parameters in `named_parameters()` order).
    """

    def __init__(self, model: nn.Module):
        self.params = trainable_parameters(model)
        if not self.params:
            raise UnsupportedParameterError("the model has no trainable parameters (is the LoRA adapter attached and active?)")
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
        self.grads: torch.Tensor | None = None
        # The hooked layers' outputs of the current pass: the backward is taken with respect to them.
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "PerExampleGradientCapture":
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = []  # a forward without backward (an error in between) must not keep them either

    def reset(self, rows: int, device: torch.device) -> None:
        self.grads = torch.zeros(rows, self.num_params, dtype=torch.float32, device=device)
        self.outputs = []

    def backward(self, loss: torch.Tensor) -> None:
        """Fill `self.grads` from `loss` (a sum of per-row losses). The gradient is taken with respect to
        the hooked layers' outputs, never the parameters: no `.grad` is written (a live training run's
        accumulators stay untouched) and no data-parallel gradient reduction is triggered."""
        outputs, self.outputs = self.outputs, []
        if not outputs:
            raise UnsupportedParameterError("no hooked layer ran in this forward (is the LoRA adapter active?)")
        # Our list must not outlive the pass: each output's gradient hook refers back to this object,
        # a tensor -> hook -> capture -> tensor cycle that Python's gc cannot break, so every pass's
        # activations would stay on the device (measured: a 7B extraction ran out of 80 GB).
        torch.autograd.grad(loss, outputs, allow_unused=True)

    def _forward_hook(self, module: nn.Linear, inputs, output) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        x = inputs[0].detach()
        output.register_hook(lambda grad_out, m=module, x=x: self._accumulate(m, x, grad_out))
        self.outputs.append(output)

    def _accumulate(self, module: nn.Linear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        rows = x.shape[0]
        g = grad_out.reshape(rows, -1, grad_out.shape[-1]).float()
        a = x.reshape(rows, -1, x.shape[-1]).float()
        weight, bias = self._module_slices[id(module)]
        # `+=`: a module called several times in one forward contributes the sum of its calls.
        if weight is not None:
            start, n = weight
            self.grads[:, start : start + n] += torch.einsum("bto,bti->boi", g, a).reshape(rows, n)
        if bias is not None:
            start, n = bias
            self.grads[:, start : start + n] += g.sum(dim=1)


def sft_per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's own token-mean next-token cross entropy over its labelled (response) tokens: [B]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = shift_labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"batch rows {bad} have no response tokens (all labels are -100): their loss is undefined")
    return (token_loss * mask).sum(dim=1) / counts


@dataclass
class AdamState:
    """Flattened Adam moments of the trainable parameters, and the optimizer's b1, b2, eps."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta1: float
    beta2: float
    eps: float

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, params: list[tuple[str, nn.Parameter]]) -> "AdamState":
        """Read m, v, betas and eps from a live (possibly accelerate-wrapped) torch Adam/AdamW, or from a
        DeepSpeed ZeRO optimizer; under ZeRO and FSDP2 every rank must call this (the moments are gathered)."""
        if any(is_deepspeed_param(p) for _, p in params):
            # ZeRO keeps flat partitions of m and v in its inner optimizer; DeepSpeed reassembles them per parameter.
            ms, vs = deepspeed_adam_moments(params)
            hyper = {adam_hyperparameters(g) for g in optimizer.param_groups}
            return cls._build(ms, vs, hyper)
        while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer and similar wrappers
            optimizer = optimizer.optimizer
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        ms, vs, hyper = [], [], set()
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
    ) -> "AdamState":
        """Read a saved optimizer state dict (e.g. a Trainer checkpoint's optimizer.pt).

        `param_index` maps each parameter name to its integer id in the state dict, which is the
        position in the optimizer's param_groups at creation (see `trainer_param_index`).
        """
        hyper_of = {}
        for g in state_dict["param_groups"]:
            for idx in g["params"]:
                hyper_of[idx] = adam_hyperparameters(g)
        ms, vs, hyper = [], [], set()
        for name, p in params:
            idx = param_index.get(name)
            state = state_dict["state"].get(idx, {})
            if "exp_avg" not in state or "exp_avg_sq" not in state:
                raise MissingAdamStateError(f"saved optimizer state has no exp_avg/exp_avg_sq for '{name}' (index {idx})")
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
    def from_named_moments(cls, exp_avg: dict, exp_avg_sq: dict, hyper: set,
                           params: list[tuple[str, nn.Parameter]], source: str = "checkpoint") -> "AdamState":
        """Build from m and v keyed by parameter name (e.g. read from a DeepSpeed checkpoint)."""
        ms, vs = [], []
        for name, p in params:
            if name not in exp_avg or name not in exp_avg_sq:
                raise MissingAdamStateError(f"{source} has no exp_avg/exp_avg_sq for '{name}'")
            if exp_avg[name].numel() != full_numel(p):
                raise MissingAdamStateError(
                    f"{source}: '{name}' has {exp_avg[name].numel()} Adam values, the parameter has {full_numel(p)}: "
                    "the checkpoint was written for a different model or adapter")
            ms.append(exp_avg[name].reshape(-1).float())
            vs.append(exp_avg_sq[name].reshape(-1).float())
        return cls._build(ms, vs, set(hyper))

    @classmethod
    def _build(cls, ms, vs, hyper) -> "AdamState":
        if len(hyper) != 1:
            raise ValueError(f"parameters use different Adam (beta1, beta2, eps): {sorted(hyper)}")
        b1, b2, eps = hyper.pop()
        return cls(torch.cat(ms), torch.cat(vs), b1, b2, eps)

    def to(self, device: torch.device) -> "AdamState":
        return AdamState(self.exp_avg.to(device), self.exp_avg_sq.to(device), self.beta1, self.beta2, self.eps)

    def precondition(self, grads: torch.Tensor) -> torch.Tensor:
        """LESS's Adam update direction, per row: (b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g^2 + eps)."""
        m = self.exp_avg.to(grads.device)
        v = self.exp_avg_sq.to(grads.device)
        numerator = self.beta1 * m + (1 - self.beta1) * grads
        denominator = torch.sqrt(self.beta2 * v + (1 - self.beta2) * grads.square() + self.eps)
        return numerator / denominator


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


def _model_inputs(batch: dict) -> dict:
    """Right-padded rows go in without their padding mask: under the causal mask a real token never
    attends to the padding after it, and padded positions carry no loss, so every row's gradient is the
    same (tested against unpadded rows). Without an explicit mask, attention runs its causal
    flash/memory-efficient kernels instead of building masked [rows, heads, T, T] scores, which for a
    7B model at 2048 tokens is the difference between fitting an 80 GB GPU and not."""
    mask = batch["attention_mask"]
    right_padded = bool((mask[:, :-1] >= mask[:, 1:]).all()) and bool(mask[:, 0].all())
    if right_padded:
        return {"input_ids": batch["input_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "use_cache": False}


def per_example_gradients(
    model: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer | None = None,
    adam_state: AdamState | None = None,
) -> torch.Tensor:
    """Gradient of each row's own SFT loss w.r.t. the trainable parameters: float32 [batch, n_params].

    `batch` holds `input_ids`, `attention_mask` and `labels` (-100 outside the response). One forward
    and one backward for the whole batch. With an Adam/AdamW `optimizer` that has state (or an
    explicit `adam_state`), rows are Adam-preconditioned as in LESS; otherwise they are plain (SGD)
    gradients. The model's train/eval mode is left as the caller set it.
    """
    if adam_state is None and optimizer is not None:
        adam_state = AdamState.from_optimizer(optimizer, trainable_parameters(model))
    capture = PerExampleGradientCapture(model)
    device = batch["input_ids"].device
    with activation_checkpointing_off(model), capture, torch.enable_grad():
        capture.reset(batch["input_ids"].shape[0], device)
        logits = model(**_model_inputs(batch)).logits
        capture.backward(sft_per_example_loss(logits, batch["labels"]).sum())
    grads = capture.grads
    if adam_state is not None:
        grads = adam_state.precondition(grads)
    return grads
