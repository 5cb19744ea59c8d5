"""Selection from the saved checkpoints of a finished warm-up run (LESS-style), through ROSESelector.

Each `checkpoint-<step>/` must hold the LoRA adapter (adapter_model.safetensors) and, for Adam
features, the Trainer's optimizer.pt or, for a DeepSpeed ZeRO warm-up, its global_step*/ optimizer
files; learning rates come from trainer_state.json's log history (mean of the logged LRs since the
previous checkpoint).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

from .gradients import AdamState, trainable_parameters, trainer_param_index
from .selector import ROSESelector, mean_lr_since
from .zero_checkpoint import read_zero_adam_moments, zero_checkpoint_dir


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    found = sorted((p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folders under {run_dir}")
    return found


def load_checkpoint_adam(checkpoint: Path, model) -> AdamState:
    """The checkpoint's Adam state: the Trainer's optimizer.pt, or a DeepSpeed ZeRO checkpoint's
    per-rank optimizer files (global_step*/), reassembled per parameter."""
    path = checkpoint / "optimizer.pt"
    params = trainable_parameters(model)
    if not path.exists():
        ds_dir = zero_checkpoint_dir(checkpoint)
        if ds_dir is None:
            raise FileNotFoundError(f"{path} is missing: Adam features need the optimizer state (or use gradient_type='sgd')")
        exp_avg, exp_avg_sq, hyper = read_zero_adam_moments(ds_dir)
        return AdamState.from_named_moments(exp_avg, exp_avg_sq, hyper, params, source=str(ds_dir))
    # weights_only: an optimizer file is untrusted input and must not run code when read.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return AdamState.from_state_dict(state, params, trainer_param_index(model))


def select_from_checkpoints(run_dir: str | Path, base_model, selector: ROSESelector, folder: str = "selection") -> Path:
    """Run `selector` over every checkpoint of `run_dir` (a PEFT warm-up), then write `<output_dir>/<folder>/`."""
    checkpoints = find_checkpoints(run_dir)
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text()).get("log_history", [])
    model = PeftModel.from_pretrained(base_model, str(checkpoints[0]), is_trainable=True)
    previous = 0
    for ckpt in checkpoints:
        step = int(ckpt.name.split("-")[1])
        weights = ckpt / "adapter_model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"{weights} is missing: is {ckpt} a LoRA checkpoint?")
        set_peft_model_state_dict(model, load_file(str(weights)))
        lr = mean_lr_since(history, previous, step)
        if lr is None:
            raise ValueError(f"{ckpt.name}: trainer_state.json logs no learning rate for steps ({previous}, {step}]; "
                             "warm up with logging_steps smaller than an epoch")
        adam = load_checkpoint_adam(ckpt, model) if selector.config.gradient_type == "adam" else None
        selector.add_checkpoint(model, ckpt.name, lr, adam)
        previous = step
    return selector.finalize(folder)
