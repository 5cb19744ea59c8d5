"""Reading the LoRA parameters and their Adam state whole when DeepSpeed ZeRO or FSDP2 shards them.

Under ZeRO-1/2 every rank holds the full (LoRA) weights but only a flat slice of the fp32 master
weights and Adam moments; under ZeRO-3 the weights themselves are partitioned (`p.numel() == 0`
outside a forward, the real size in `p.ds_numel` / `p.ds_shape`). The forward/backward hooks that
ZeRO-3 installs on every module gather the weights a layer needs, so per-example gradients can be
computed on the partitioned model as long as every rank runs the same number of passes. What we
read directly (the adapter's values for its fingerprint, Adam's m and v) goes through DeepSpeed's
documented collectives, which every rank must call, in the same order.

Under FSDP2 (`fully_shard`) parameters and Adam moments are DTensors sharded on dim 0; their
`shape`/`numel()` are the whole tensor's. Each FSDP module all-gathers its weights around its forward
and backward (collectives again: every rank runs as many passes), and what we read directly is
gathered with `DTensor.full_tensor()` or, for the adapter's values, `FSDPModule.unshard()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def is_deepspeed_param(p: torch.Tensor) -> bool:
    """A parameter that a DeepSpeed ZeRO engine manages (ZeRO-3: `ds_id`; ZeRO-1/2: `_hp_mapping`)."""
    return hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None


def full_numel(p: torch.Tensor) -> int:
    """Number of values of the whole parameter, also when ZeRO-3 holds only a partition of it."""
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a sharded DTensor (a collective: every rank calls it), else `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Whole values of the model's trainable parameters on every rank, for reading (a collective); a
    no-op when nothing is partitioned. Under FSDP2 the modules hold unsharded parameters inside the
    context, so read `model.named_parameters()` again in it."""
    zero3 = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    fsdp = fsdp_modules(model) if any(is_dtensor(p) for p in model.parameters()) else []
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    for m in fsdp:
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()


def deepspeed_adam_moments(params: list[tuple[str, nn.Parameter]]) -> tuple[dict, dict]:
    """Whole exp_avg and exp_avg_sq of each parameter from a ZeRO optimizer, keyed by name; a parameter
    the optimizer holds no Adam state for is absent (collectives: every rank calls this)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    exp_avg, exp_avg_sq = {}, {}
    for name, p in params:
        m = safe_get_full_optimizer_state(p, "exp_avg")
        v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        if m is not None and v is not None:
            exp_avg[name] = m.detach().reshape(-1).float().cpu()
            exp_avg_sq[name] = v.detach().reshape(-1).float().cpu()
    return exp_avg, exp_avg_sq


def partitioned(model: nn.Module) -> bool:
    """Whether the model's forward is a collective (ZeRO-3 and FSDP gather each layer's weights across ranks)."""
    return any(hasattr(p, "ds_id") or is_dtensor(p) for p in model.parameters())


def max_over_ranks(value: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def release_gathered(model: nn.Module) -> None:
    """Re-partition every ZeRO-3 weight after a forward/backward run outside the engine.

    ZeRO-3 releases a layer's gathered weights in a hook that fires when the gradient reaches the
    layer's input; with frozen embeddings (LoRA) it never fires for some layers, and the engine's own
    step cleans up after it. Our passes bypass the engine, so we do the same clean-up (the engine's
    `empty_partition_cache`); otherwise later `GatheredParameters` and training steps see weights
    that are still marked in use, and memory holds the whole model."""
    for p in model.parameters():
        if hasattr(p, "_z3_optimizer"):
            p._z3_optimizer.empty_partition_cache()
            return


def check_supported(model: nn.Module) -> None:
    """Refuse FSDP1 (`FullyShardedDataParallel`): it flattens a layer's weights into one FlatParameter, so
    LoRA weights are not parameters of their `nn.Linear` layers any more. FSDP2 (`fully_shard`,
    accelerate's `fsdp_version: 2`, accelerate_configs/fsdp.yaml) keeps them and is supported."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise NotImplementedError(
            "ROSE gradient extraction does not support FSDP1-wrapped models (flattened parameters); use FSDP2 "
            "(fsdp_version: 2, accelerate_configs/fsdp.yaml), DeepSpeed ZeRO-2/3 or plain data parallelism, "
            "see docs/guides/multi_gpu.md"
        )


def all_true(flag: bool) -> bool:
    """AND of a flag over all processes."""
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0
