"""The Trainer's own batches (warm-up and final training) against the memory budget: their estimated peak, and a
warning before training with the batch that fits. The batch sizes are the user's: nothing here changes them."""

from __future__ import annotations

import math

import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from rose_trl.resources import budget as budget_module
from rose_trl.resources.budget import (
    GB,
    HEAP_SLACK,
    MemoryBudget,
    heap_slack,
    model_dtype,
    smallest_gb,
)
from rose_trl.resources.memory import LoraShape, ModelShape, dtype_bytes, estimate_pass, largest_rows
from rose_trl.resources.process import resident_bytes


logger = get_logger(__name__)


def training_rows(
    shape: ModelShape, lora: LoraShape, dtype, width: int, available: int, limit: int, slack: float = 1.0, **options
) -> int:
    """The most rows (<= `limit`) of `width` tokens a Trainer step (TRL's SFT loss, train mode) may take within
    `available` bytes beyond the weights and optimizer state (its live bytes times `slack`); 0 when not even one
    fits."""
    return largest_rows(
        lambda r: int(slack * estimate_pass("training", shape, lora, dtype, r, width, **options).transient),
        available,
        limit,
    )


def training_peak(
    shape: ModelShape,
    lora: LoraShape,
    dtype,
    rows: int,
    width: int,
    resident: int,
    budget: MemoryBudget,
    device: torch.device | str = "cpu",
    **options,
) -> tuple[int, int, float]:
    """(estimated peak, bytes held between steps, heap slack) of a Trainer step of `rows` rows of `width` tokens
    (TRL's SFT loss, AdamW), on top of `resident` bytes. On a CPU the slack is the compact heap's when the default
    heap's would go over a budget the user set and the compact one's would not: what `check_training` switches to
    (the default budget never pays the compact heap's page faults). Nothing is changed here."""
    device = torch.device(device)
    step = estimate_pass("training", shape, lora, dtype, rows, width, **options)
    held = resident + step.parts["optimizer"]  # AdamW's state, made at the first step, is held from then on
    slack = heap_slack(device)
    if (
        held + slack * step.transient > budget.limit
        and budget.chosen
        and device.type != "cuda"
        and budget_module.heap_mode() == "default"
        and held + HEAP_SLACK["compact"] * step.transient <= budget.limit
    ):
        slack = HEAP_SLACK["compact"]
    return int(held + slack * step.transient), held, slack


def check_training(
    model,
    args,
    budget: MemoryBudget,
    what: str,
    width: int | None = None,
    resident: int | None = None,
    lora: LoraShape | None = None,
) -> str | None:
    """Warn (and return the warning) when the Trainer's `per_device_train_batch_size` rows of `width` tokens
    (default: args.max_length) are estimated over `budget`, with the batch that fits. Nothing is changed: the
    training's batch sizes are the user's. `model`: a live model, or a transformers config with `lora` given (a
    model not loaded yet)."""
    PartialState()  # accelerate's logger needs its state
    width = width or getattr(args, "max_length", None) or 1024
    if hasattr(model, "parameters") and callable(model.parameters):
        shape, dtype = ModelShape.from_model(model), model_dtype(model)
        lora = lora or LoraShape.from_model(model)
        if resident is None:
            resident = resident_bytes(next(p.device for p in model.parameters()), model)
    else:
        if lora is None:
            raise ValueError("check_training on a config (a model not loaded yet) needs its LoraShape: lora=...")
        shape, dtype = ModelShape.from_config(model), getattr(model, "dtype", None) or "float32"
        # Not loaded yet: the weights will be held too.
        resident = (resident if resident is not None else resident_bytes()) + shape.parameters * dtype_bytes(dtype)
    options = dict(gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))
    rows = args.per_device_train_batch_size
    device = (
        next(p.device for p in model.parameters())
        if hasattr(model, "parameters") and callable(model.parameters)
        else torch.device("cpu")
    )
    squeezable = budget.chosen and device.type != "cuda"
    _, held, slack = training_peak(shape, lora, dtype, rows, width, resident, budget, device, **options)
    if slack != heap_slack(device):  # the compact heap lets the Trainer's batch fit
        budget_module.compact_heap()
    slack = heap_slack(device)
    peak = held + slack * estimate_pass("training", shape, lora, dtype, rows, width, **options).transient
    if peak <= budget.limit:
        logger.info(
            "%s: batches of %d rows of up to %d tokens, estimated peak %.2f GB, within the memory budget %s",
            what,
            rows,
            width,
            peak / GB,
            budget.describe(),
        )
        return None
    fits = training_rows(
        shape,
        lora,
        dtype,
        width,
        budget.limit - held,
        rows,
        HEAP_SLACK["compact"] if squeezable else slack,
        **options,
    )
    accumulate = args.gradient_accumulation_steps * rows
    rows_fit = f"{fits} rows fit" if fits > 1 else "1 row fits"
    # The least this training can hold: 1 row a step, with the compact heap on a CPU (a budget the user sets).
    least = (
        held
        + (HEAP_SLACK["compact"] if device.type != "cuda" else 1.0)
        * estimate_pass("training", shape, lora, dtype, 1, width, **options).transient
    )
    advice = (
        f"{rows_fit}: per_device_train_batch_size: {fits} with gradient_accumulation_steps: "
        f"{math.ceil(accumulate / fits)} keeps about {accumulate} rows an optimizer step"
        if fits
        else f"not even 1 row fits: 1 row is estimated at {least / GB:.2f} GB, the smallest budget this "
        f"training can hold (memory_budget_gb: {smallest_gb(least)}); lower max_length or turn "
        "gradient_checkpointing on to hold a smaller one"
    )
    message = (
        f"{what}: per_device_train_batch_size={rows} rows of up to {width} tokens are estimated at a peak of "
        f"{peak / GB:.2f} GB (the process holds {held / GB:.2f} GB), over the memory budget "
        f"{budget.describe()}; {advice}. The training's batch sizes are the Trainer's: not changed"
    )
    logger.warning(message)
    return message
