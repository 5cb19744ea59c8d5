"""Selection from the saved checkpoints of a finished warm-up run (LESS-style), through ROSESelector.

Each `checkpoint-<step>/` must hold the LoRA adapter and, for Adam features, the optimizer state, in any
of the layouts the Trainer writes:
- plain or DDP: adapter_model.safetensors and optimizer.pt;
- DeepSpeed ZeRO-1/2/3: adapter_model.safetensors and global_step*/ (zero_checkpoint.py);
- FSDP2, FULL_STATE_DICT: adapter_model.safetensors and optimizer.bin (fsdp_checkpoint.py);
- FSDP2, SHARDED_STATE_DICT: pytorch_model_fsdp_0/ and optimizer_0/, with no adapter_config.json, so the
  warm-up's LoRA config is passed as `peft_config`.
Each checkpoint's learning rate (the mean LR of the optimizer steps since the previous checkpoint) is
resolved for every checkpoint before any gradient work, by the run ledger (ledger.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from rose_trl.checkpoints.fsdp import (
    FSDP_MODEL_DIR,
    FSDP_OPTIMIZER_DIR,
    FSDP_OPTIMIZER_FILE,
    read_fsdp_adam_moments,
    read_fsdp_adapter,
)
from rose_trl.checkpoints.zero import read_zero_adam_moments, zero_checkpoint_dir
from rose_trl.gradients.capture import AdamState, trainable_parameters, trainer_param_index
from rose_trl.run.ledger import checkpoint_identity
from rose_trl.run.selector import ROSESelector
from rose_trl.utils.files import checkpoint_dirs


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    found = checkpoint_dirs(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folders under {run_dir}")
    return found


def load_checkpoint_adam(checkpoint: Path, model) -> AdamState:
    """The checkpoint's Adam state, in whichever layout the Trainer wrote it (see the module docstring)."""
    checkpoint = Path(checkpoint)
    params = trainable_parameters(model)
    path = checkpoint / "optimizer.pt"
    if path.exists():
        # weights_only: an optimizer file is untrusted input and must not run code when read.
        state = torch.load(path, map_location="cpu", weights_only=True)
        return AdamState.from_state_dict(state, params, trainer_param_index(model))
    if (checkpoint / FSDP_OPTIMIZER_FILE).exists() or (checkpoint / FSDP_OPTIMIZER_DIR).is_dir():
        exp_avg, exp_avg_sq, hyper = read_fsdp_adam_moments(checkpoint)
        return AdamState.from_named_moments(exp_avg, exp_avg_sq, hyper, params, source=str(checkpoint))
    ds_dir = zero_checkpoint_dir(checkpoint)
    if ds_dir is None:
        raise FileNotFoundError(
            f"{path} is missing (nor is there a DeepSpeed global_step*/ or an FSDP {FSDP_OPTIMIZER_FILE} "
            f"or {FSDP_OPTIMIZER_DIR}/): Adam features need the optimizer state (or use gradient_type='sgd')"
        )
    exp_avg, exp_avg_sq, hyper = read_zero_adam_moments(ds_dir)
    return AdamState.from_named_moments(exp_avg, exp_avg_sq, hyper, params, source=str(ds_dir))


def load_checkpoint_adapter(checkpoint: Path, model) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA weights as a PEFT state dict: adapter_model.safetensors, or FSDP's sharded
    pytorch_model_fsdp_0/."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / "adapter_model.safetensors"
    if weights.exists():
        return load_file(str(weights))
    if (checkpoint / FSDP_MODEL_DIR).is_dir():
        return read_fsdp_adapter(checkpoint, get_peft_model_state_dict(model))
    raise FileNotFoundError(
        f"{weights} is missing (nor is there an FSDP {FSDP_MODEL_DIR}/): is {checkpoint} a LoRA checkpoint?"
    )


def warmup_model(checkpoint: Path, base_model, peft_config: PeftConfig | None = None) -> PeftModel:
    """`base_model` with the warm-up's adapter attached, configured from the checkpoint's adapter_config.json,
    else from `peft_config` (FSDP SHARDED_STATE_DICT checkpoints save no adapter config)."""
    if (Path(checkpoint) / "adapter_config.json").exists():
        return PeftModel.from_pretrained(base_model, str(checkpoint), is_trainable=True)
    if peft_config is None:
        raise FileNotFoundError(
            f"{checkpoint} holds no adapter_config.json (an FSDP SHARDED_STATE_DICT checkpoint "
            "saves none): pass the warm-up's LoRA config as peft_config"
        )
    return get_peft_model(base_model, peft_config)


def resolve_learning_rates(checkpoints: list[Path], model, selector: ROSESelector) -> list[float | None]:
    """Each checkpoint's learning rate, from the first of the run ledger's sources that has it
    (`RunLedger.resolve`). `model` is the warm-up model; its adapter weights are replaced."""

    def identity(checkpoint: Path) -> str:
        set_peft_model_state_dict(model, load_checkpoint_adapter(checkpoint, model))
        return checkpoint_identity(checkpoint.name, model)

    return selector.ledger.resolve(checkpoints, identity, selector.config.checkpoint_learning_rates)


def select_from_checkpoints(
    run_dir: str | Path,
    base_model: PreTrainedModel,
    selector: ROSESelector,
    folder: str = "selection",
    peft_config: PeftConfig | None = None,
) -> Path:
    """Select from the saved checkpoints of a finished LoRA warm-up (LESS-style, offline).

    For every `checkpoint-<step>/` of `run_dir`, in step order, the adapter and the Adam state are loaded (plain,
    DDP, DeepSpeed ZeRO-1/2/3 or FSDP2 layouts) and `selector` extracts the pool's and the preference pairs'
    gradients; then the pool is scored and the selection written. Every checkpoint's learning rate is resolved
    first (the Trainer's log history, or its schedule rebuilt from the checkpoint folders): an unknown one, or
    too little disk for the stores, stops the run before any gradient work. Stores already on disk for the same
    inputs are reused, so a killed run resumes.

    Args:
        run_dir (`str` or `pathlib.Path`):
            The warm-up's output folder, holding its `checkpoint-<step>/` folders with their optimizer state and
            `trainer_state.json`.
        base_model (`transformers.PreTrainedModel`):
            The warm-up's base model (without the adapter), loaded as for training.
        selector (`ROSESelector`):
            The selection to run: pool, preference set, tokenizer, `ROSEConfig` and output folder.
        folder (`str`, *optional*, defaults to `"selection"`):
            The selection folder's name under the selector's `output_dir`.
        peft_config (`peft.PeftConfig`, *optional*):
            The warm-up's LoRA config; needed only for checkpoints saved without `adapter_config.json` (FSDP2's
            SHARDED_STATE_DICT).

    Returns:
        `pathlib.Path`: the selection folder, `<output_dir>/<folder>/`.

    Example:

    ```python
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rose_trl import ROSEConfig, ROSESelector, load_pool, load_preferences, select_from_checkpoints

    tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")
    selector = ROSESelector(
        load_pool("pool.jsonl"), load_preferences("preferences.jsonl"), tokenizer, ROSEConfig(), "outputs/run"
    )
    base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-hf")
    select_from_checkpoints("outputs/warmup", base, selector)  # -> outputs/run/selection/
    ```
    """
    checkpoints = find_checkpoints(run_dir)
    for ckpt in checkpoints:  # the Trainer's last write: without it a checkpoint is a save killed part-way
        if not (ckpt / "trainer_state.json").exists():
            raise FileNotFoundError(f"{ckpt / 'trainer_state.json'} is missing: an incomplete checkpoint (remove it)")
    selector.check_disk_space([c.name for c in checkpoints])  # before any gradient work
    model = warmup_model(checkpoints[0], base_model, peft_config)
    learning_rates = resolve_learning_rates(checkpoints, model, selector)
    for ckpt, lr in zip(checkpoints, learning_rates, strict=True):
        set_peft_model_state_dict(model, load_checkpoint_adapter(ckpt, model))
        adam = load_checkpoint_adam(ckpt, model) if selector.config.gradient_type == "adam" else None
        selector.add_checkpoint(model, ckpt.name, lr, adam)
    return selector.finalize(folder)
