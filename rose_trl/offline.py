"""Selection from the saved checkpoints of a finished warm-up run (LESS-style), through ROSESelector.

Each `checkpoint-<step>/` must hold the LoRA adapter (adapter_model.safetensors) and, for Adam
features, the Trainer's optimizer.pt; learning rates come from trainer_state.json's log history
(mean of the logged LRs since the previous checkpoint).
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


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    found = sorted((p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                   key=lambda p: int(p.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folders under {run_dir}")
    return found


def load_checkpoint_adam(checkpoint: Path, model) -> AdamState:
    path = checkpoint / "optimizer.pt"
    if not path.exists() and any(checkpoint.glob("global_step*")):
        # DeepSpeed writes flat per-rank partitions of m and v (global_step*/zero_pp_rank_*_optim_states.pt)
        # whose layout only a live engine or a universal-checkpoint conversion maps back to parameters.
        raise FileNotFoundError(
            f"{checkpoint} is a DeepSpeed checkpoint (optimizer state under global_step*/, no optimizer.pt): the "
            "offline mode reads torch optimizer.pt files only. Run ROSECallback during the DeepSpeed warm-up "
            "instead (it reads the live ZeRO state), or use gradient_type='sgd' (docs/distributed.md)")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: Adam features need the optimizer state (or use gradient_type='sgd')")
    # weights_only: an optimizer file is untrusted input and must not run code when read.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return AdamState.from_state_dict(state, trainable_parameters(model), trainer_param_index(model))


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
