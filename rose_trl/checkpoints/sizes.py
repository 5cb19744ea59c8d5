"""What the Trainer writes, in bytes, before it writes it: a checkpoint's files and a saved model's, from the model's
shape (a model on the meta device: no weights), the training arguments and the tokenizer.

Exact where the bytes follow from what is known beforehand: the adapter's safetensors file (its tensors and its
header), the optimizer's moments (torch.save's archive of them, counted by serializing one value per tensor and
adding the rest), the scheduler, the RNG states and the training arguments (serialized as the Trainer serializes
them, into a byte counter), the tokenizer's files (saved into a temporary folder). Estimated: the trainer state's
log history (`LOG_ENTRY_BYTES` per logged step) and TRL's model card (`MODEL_CARD_BYTES`), measured on TRL 1.16.
`sizes.files` lists every file with its size; nothing is written under the run's output folder.
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


# A folder's own entry, as `du --apparent-size` counts it.
FOLDER_BYTES = 4096
# TRL 1.16's SFT model card (README.md) in a checkpoint or a saved model folder (5,202-5,208 bytes measured), and the
# short one the Trainer leaves at the top of its output folder (1,313 bytes).
MODEL_CARD_BYTES = 5_210
TOP_MODEL_CARD_BYTES = 1_320
# trainer_state.json: its fields (about 700 bytes with the callbacks' state), and one log entry of an SFT step
# (loss, grad_norm, learning_rate, entropy, mean_token_accuracy, num_tokens, epoch, step: 262-270 bytes measured).
TRAINER_STATE_BYTES = 700
LOG_ENTRY_BYTES = 268
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class _Counter(io.RawIOBase):
    """A write-only stream that keeps the count of the bytes written to it, and nothing else."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        self.count += n
        return n


def saved_bytes(obj) -> int:
    """Bytes of `torch.save(obj)`, counted without writing."""
    counter = _Counter()
    torch.save(obj, counter)
    return counter.count


@dataclass
class Folder:
    """The files of one folder the Trainer writes: name -> bytes."""

    files: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return FOLDER_BYTES + sum(self.files.values())


def trained_tensors(model, lora_targets, lora_r: int | None) -> dict[str, tuple[int, ...]]:
    """name -> shape of what training saves of `model` (a meta-device skeleton): the LoRA matrices of the modules
    named by `lora_targets` (names, or "all-linear") as PEFT names them in adapter_model.safetensors, or, without
    `lora_r`, every parameter (full fine-tuning)."""
    if lora_r is None:
        return {name: tuple(p.shape) for name, p in model.named_parameters()}
    targets = [lora_targets] if isinstance(lora_targets, str) else list(lora_targets or ["q_proj", "v_proj"])
    everything = targets == ["all-linear"]
    head = model.get_output_embeddings()
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if everything or any(name == t or name.endswith("." + t) for t in targets):
            out[f"base_model.model.{name}.lora_A.weight"] = (lora_r, module.in_features)
            out[f"base_model.model.{name}.lora_B.weight"] = (module.out_features, lora_r)
    return out


def safetensors_bytes(tensors: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a safetensors file of `tensors` (name -> shape) in `dtype`: its 8-byte length, its JSON header
    (padded to 8 bytes) and the data."""
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(tensors.items()):
        n = math.prod(shape) * size
        header[name] = {
            "dtype": SAFETENSORS_DTYPES.get(dtype, "F32"),
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + math.ceil(text / 8) * 8 + offset


def optimizer_bytes(tensors: dict[str, tuple[int, ...]], moment_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of optimizer.pt for AdamW over `tensors` (two moments each, and its step), as the Trainer saves
    `optimizer.state_dict()` (its two parameter groups: with and without weight decay). The archive of one value a
    tensor is serialized; each tensor's other values are added, with torch.save's 64-byte alignment on average."""
    size = torch.empty((), dtype=moment_dtype).element_size()
    shapes = list(tensors.values())
    state = {
        i: {
            "step": torch.tensor(1.0),
            "exp_avg": torch.zeros(1, dtype=moment_dtype),
            "exp_avg_sq": torch.zeros(1, dtype=moment_dtype),
        }
        for i in range(len(shapes))
    }
    group = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "foreach": None}
    groups = [{**group, "params": list(range(len(shapes)))}, {**group, "params": []}]
    skeleton = saved_bytes({"state": state, "param_groups": groups})
    values = sum(2 * (math.prod(s) - 1) * size for s in shapes)
    return skeleton + values + 2 * len(shapes) * 32


def rng_state_bytes() -> int:
    """Bytes of rng_state.pth (one per process): Python's, NumPy's and torch's CPU (and CUDA) generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return saved_bytes(states)


def scheduler_bytes(args, steps: int) -> int:
    """Bytes of scheduler.pt: the state of `args`' learning-rate schedule over `steps` optimizer steps."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0})
    warmup = args.get_warmup_steps(steps) if hasattr(args, "get_warmup_steps") else 0
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return saved_bytes(scheduler.state_dict())


def tokenizer_files(tokenizer) -> dict[str, int]:
    """The files `tokenizer.save_pretrained` writes and their bytes (saved into a temporary folder, then removed)."""
    with tempfile.TemporaryDirectory(prefix="rose-plan-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def model_files(
    tensors: dict[str, tuple[int, ...]], dtype: torch.dtype, peft_config: dict | None, tokenizer: dict[str, int], args
) -> Folder:
    """A saved model folder (`Trainer.save_model`): the adapter (adapter_model.safetensors, adapter_config.json)
    or the whole model (model.safetensors, its configs), the tokenizer's files, the model card and
    training_args.bin."""
    folder = Folder(dict(tokenizer))
    if peft_config is not None:
        folder.files["adapter_model.safetensors"] = safetensors_bytes(tensors, torch.float32)
        folder.files["adapter_config.json"] = len(json.dumps(peft_config, indent=2, sort_keys=True, default=str))
    else:
        folder.files["model.safetensors"] = safetensors_bytes(tensors, dtype)
        folder.files["config.json"] = 1_000
        folder.files["generation_config.json"] = 200
    folder.files["README.md"] = MODEL_CARD_BYTES
    folder.files["training_args.bin"] = saved_bytes(args)
    return folder


def checkpoint_files(
    model: Folder,
    tensors: dict[str, tuple[int, ...]],
    moment_dtype: torch.dtype,
    args,
    step: int,
    max_steps: int,
    processes: int = 1,
) -> Folder:
    """A checkpoint-<step>/ folder: the saved model's files, then optimizer.pt, scheduler.pt, one rng_state per
    process and trainer_state.json with the log history up to `step`."""
    folder = Folder(dict(model.files))
    if not getattr(args, "save_only_model", False):
        folder.files["optimizer.pt"] = optimizer_bytes(tensors, moment_dtype)
        folder.files["scheduler.pt"] = scheduler_bytes(args, max_steps)
        for rank in range(processes):
            folder.files["rng_state.pth" if processes == 1 else f"rng_state_{rank}.pth"] = rng_state_bytes()
    every = args.logging_steps if args.logging_steps >= 1 else max(1, math.ceil(max_steps * args.logging_steps))
    logs = step // int(every) if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "steps" else 0
    folder.files["trainer_state.json"] = TRAINER_STATE_BYTES + LOG_ENTRY_BYTES * logs
    return folder
