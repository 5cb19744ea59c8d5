"""Adam's m and v per parameter from a DeepSpeed ZeRO-1/2/3 checkpoint (`checkpoint-*/global_step*/`).

A ZeRO checkpoint holds, per rank, flat partitions of each parameter group: the fp32 master weights
and the inner optimizer's exp_avg/exp_avg_sq, laid out alike (the inner optimizer steps the flat fp32
partitions). DeepSpeed's own `zero_to_fp32` knows how to cut the fp32 partitions back into named
parameters (ZeRO-1/2: rank partitions concatenated per group; ZeRO-3: each parameter split across
ranks). We hand it the moment partitions in place of the weight partitions, so the layout logic is
DeepSpeed's, not a copy. Its helpers are private: deepspeed is pinned to 0.19.x and
tests/test_trl_api.py fails loudly if one moves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rose_trl.gradients.capture import adam_hyperparameters


class ZeroCheckpointError(ValueError):
    """A DeepSpeed checkpoint folder that cannot be read as ZeRO optimizer state."""


def zero_checkpoint_dir(checkpoint: Path) -> Path | None:
    """The `global_step*` folder of a Trainer checkpoint saved under DeepSpeed (the one `latest` names)."""
    latest = checkpoint / "latest"
    if latest.exists():
        path = checkpoint / latest.read_text().strip()
        return path if path.is_dir() else None
    found = sorted(checkpoint.glob("global_step*"))
    return found[-1] if found else None


def _load_deepspeed_file(path, what: str) -> dict:
    """torch.load with weights_only (a checkpoint must not run code when read), allowing the few
    DeepSpeed objects its files hold besides tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises an UnpicklingError for a disallowed object, others for a damaged file
        raise ZeroCheckpointError(
            f"{path} cannot be read as a ZeRO {what}; objects outside the allowed "
            f"DeepSpeed types are refused rather than run as code ({str(e).strip().splitlines()[-1][:200]})"
        ) from e


def _model_states(ds_dir: str) -> list:
    """What DeepSpeed's `zero_to_fp32.parse_model_states` returns, read with weights_only: its own reader
    unpickles the model-state files with weights_only=False, which would run whatever a planted file holds."""
    from deepspeed.utils import zero_to_fp32 as z

    states = []
    for path in z.get_model_state_files(ds_dir):
        sd = _load_deepspeed_file(path, "model-state file")
        if "buffer_names" not in sd or "param_shapes" not in sd:
            raise ZeroCheckpointError(f"{path} is not a ZeRO model-state file (no buffer_names/param_shapes)")
        buffers = {
            k: v.float() if v.is_floating_point() else v for k, v in sd["module"].items() if k in sd["buffer_names"]
        }
        states.append(
            z.zero_model_state(
                buffers=buffers,
                param_shapes=sd["param_shapes"],
                shared_params=[[k, v] for k, v in sd["shared_params"].items()],
                ds_version=sd.get("ds_version"),
                frozen_param_shapes=sd.get("frozen_param_shapes"),
                frozen_param_fragments=sd.get("frozen_param_fragments"),
            )
        )
    return states


def read_zero_adam_moments(ds_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set]:
    """(exp_avg by name, exp_avg_sq by name, {(beta1, beta2, eps), ...}) from one ZeRO checkpoint folder."""
    from deepspeed.utils import zero_to_fp32 as z

    ds_dir = str(ds_dir)
    model_states = _model_states(ds_dir)
    files = z.get_optim_files(ds_dir)
    states = [_load_deepspeed_file(f, "optimizer file")["optimizer_state_dict"] for f in files]
    stage = int(states[0]["zero_stage"])
    world = states[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(files):
        raise ZeroCheckpointError(f"{ds_dir}: written by {world} ranks but holds {len(files)} optimizer files")
    # ZeRO-1/2 keep the inner torch optimizer's state_dict under base_optimizer_state, ZeRO-3 under
    # optimizer_state_dict; either way one flat tensor per parameter group.
    inner = [s["base_optimizer_state"] if stage <= 2 else s["optimizer_state_dict"] for s in states]
    if not isinstance(inner[0], dict) or "state" not in inner[0]:
        raise ZeroCheckpointError(f"{ds_dir}: the optimizer state is not a torch state_dict (elastic checkpoint?)")
    groups = len(inner[0]["param_groups"])
    hyper = {adam_hyperparameters(g) for g in inner[0]["param_groups"]}
    trainable = {n for shapes in model_states[0].param_shapes for n in shapes}
    moments = []
    for key in ("exp_avg", "exp_avg_sq"):
        try:
            flat = [[sd["state"][g][key] for g in range(groups)] for sd in inner]
        except KeyError as e:
            raise ZeroCheckpointError(
                f"{ds_dir}: no {key} in the ZeRO optimizer state (not Adam/AdamW, or saved before the first step)"
            ) from e
        if stage <= 2:
            # The fp32 partitions are saved without the last rank's alignment padding; strip it from m and v alike.
            flat = [
                [t[: t.numel() - pad] for t, pad in zip(ranks, s["group_paddings"], strict=True)]
                for ranks, s in zip(flat, states, strict=True)
            ]
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat, model_states, True, states[0].get("param_alignment_paddings")
            )
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, True)
        moments.append({n: t for n, t in z.to_torch_tensor(merged).items() if n in trainable})
    return moments[0], moments[1], hyper
