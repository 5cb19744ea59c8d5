"""The run's memory budget, and every pass it makes sized to fit it.

The budget is `memory_budget_gb` (ROSEConfig) or, by default, a stated fraction of what the machine has for the
process (`MemoryBudget.for_device`):
- CPU: `CPU_BUDGET_FRACTION` (15%) of the memory available when the budget is taken (psutil's `available`: free
  and reclaimable), shared equally by the node's processes. A CPU machine is shared (other processes, the page
  cache that serves the gradient stores), and on a CPU more rows a pass buy little speed (docs/performance.md);
- CUDA: `CUDA_BUDGET_FRACTION` (90%) of the device's free memory (`torch.cuda.mem_get_info`), each process
  having its own device.

A plan (`plan_passes`, logged once per run) takes what the process holds when it is made (`resident_bytes`: its
RSS on the CPU, after the C library has returned freed heap pages; the memory allocated on a GPU) from the budget,
and gives each pass the most rows whose estimated peak (`memory.estimate_pass`: the model's shape, the LoRA
settings, the dtype and the loss path) fits what is left: pool gradient passes (rows and padded tokens, the
longest pool row's length), validation passes (preference pairs) and evaluation (rows). The options the user sets
(`gradient_batch_size`, `max_batch_tokens`, `gradient_memory_gb`, `validation_batch_size`) stay upper limits.
A pass that still runs out of memory (the estimate is not a measurement) halves its rows and runs again
(`halving_on_oom`: accelerate's `find_executable_batch_size`), and the log says so. The Trainer's own batch sizes
(warm-up and final training) are not changed: `check_training` warns, before training, with the size that fits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import find_executable_batch_size

from .distributed import max_over_ranks
from .memory import FUSED_HEAD_TOKENS, Estimate, LoraShape, ModelShape, estimate_pass, largest_rows

logger = get_logger(__name__)

CPU_BUDGET_FRACTION = 0.15
MIN_HEAD_TOKENS = 64
CUDA_BUDGET_FRACTION = 0.90
GB = 1e9


def _trim_heap() -> None:
    """Ask glibc to return freed heap pages to the system (malloc_trim): the RSS then counts what is in use."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def resident_bytes(device: torch.device | str | None = None) -> int:
    """What this process holds now: its resident memory on the CPU, the memory allocated on a CUDA device."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    _trim_heap()
    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes one process may hold (`limit`), and where the figure comes from (`source`)."""

    limit: int
    source: str
    device: str = "cpu"

    @classmethod
    def for_device(cls, memory_budget_gb: float | None = None, device: torch.device | str | None = None,
                   processes: int | None = None) -> "MemoryBudget":
        """`memory_budget_gb` when set, else the machine's default share (module docstring)."""
        device = torch.device(device or PartialState().device)
        if memory_budget_gb is not None:
            return cls(int(memory_budget_gb * GB), f"memory_budget_gb: {memory_budget_gb:g}", device.type)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return cls(int(CUDA_BUDGET_FRACTION * free), f"{CUDA_BUDGET_FRACTION:.0%} of the {free / GB:.1f} GB free "
                                                         f"on {device}", device.type)
        import psutil

        available = psutil.virtual_memory().available
        if processes is None:
            state = PartialState()
            processes = max(1, getattr(state, "local_num_processes", None) or state.num_processes)
        share = f", shared by {processes} processes" if processes > 1 else ""
        return cls(int(CPU_BUDGET_FRACTION * available / processes),
                   f"{CPU_BUDGET_FRACTION:.0%} of the {available / GB:.1f} GB of CPU memory available{share}",
                   device.type)

    def describe(self) -> str:
        return f"{self.limit / GB:.2f} GB ({self.source})"


@dataclass
class PassPlan:
    """One kind of pass: its rows (and padded tokens) a pass, at rows of up to `width` tokens, and its estimate."""

    kind: str
    rows: int
    width: int
    estimate: Estimate
    limit: str  # what set `rows`: the budget, or the user's option
    tokens: int | None = None
    head_tokens: int | None = None  # positions a tile of TRL's fused LM head, when lowered to fit the budget

    def describe(self, budget: MemoryBudget, resident: int) -> str:
        tokens = f" / {self.tokens} tokens" if self.tokens else ""
        unit = ("pair" if self.kind == "validation" else "row") + ("s" if self.rows > 1 else "")
        tokens += f", TRL's fused LM head {self.head_tokens} positions a tile" if self.head_tokens else ""
        return (f"{self.kind}: {self.rows} {unit}{tokens} a pass "
                f"(rows of up to {self.width} tokens; set by {self.limit}), estimated peak "
                f"{(resident + self.estimate.transient) / GB:.2f} GB")


def fit_rows(kind: str, shape: ModelShape, lora: LoraShape, dtype, width: int, available: int, limit: int,
             **options) -> tuple[int, Estimate, bool]:
    """(rows, their estimate, whether the budget set them) for the most rows <= `limit` a pass of `kind` at `width`
    tokens may take within `available` bytes; 1 row (with its estimate) when not even one fits."""
    def adds(rows: int) -> int:
        return estimate_pass(kind, shape, lora, dtype, rows, width, **options).transient

    rows = largest_rows(adds, available, limit)
    by_budget = rows < limit
    rows = max(rows, 1)
    return rows, estimate_pass(kind, shape, lora, dtype, rows, width, **options), by_budget


@dataclass
class MemoryPlan:
    budget: MemoryBudget
    resident: int
    passes: dict[str, PassPlan]

    @property
    def available(self) -> int:
        return self.budget.limit - self.resident

    def describe(self) -> str:
        lines = [f"memory plan: budget {self.budget.describe()}; the process holds {self.resident / GB:.2f} GB, "
                 f"{max(self.available, 0) / GB:.2f} GB left for a pass"]
        lines += [f"  {p.describe(self.budget, self.resident)}" for p in self.passes.values()]
        over = [p.kind for p in self.passes.values() if p.estimate.transient > self.available]
        if over:
            lines.append(f"  over the budget even at 1 row: {', '.join(over)} (raise memory_budget_gb, or lower "
                         "max_length)")
        return "\n".join(lines)


def model_dtype(model) -> torch.dtype:
    return next((p.dtype for name, p in model.named_parameters() if "lora_" not in name), torch.float32)


def plan_passes(model, budget: MemoryBudget, *, pool_width: int, validation_width: int | None,
                gradient_rows: int, max_batch_tokens: int | None, validation_pairs: int, dim: int, fused: bool,
                labelled_fraction: float = 1.0, resident: int | None = None) -> MemoryPlan:
    """Rows a pass for the pool's gradient passes and the validation passes of `model` under `budget`.
    `gradient_rows`, `max_batch_tokens`, `validation_pairs`: the user's upper limits (None: none for tokens)."""
    device = next(p.device for p in model.parameters())
    resident = resident_bytes(device) if resident is None else resident
    shape, lora, dtype = ModelShape.from_model(model), LoraShape.from_model(model), model_dtype(model)
    available = budget.limit - resident
    if max_batch_tokens:  # the user's token cap bounds the rows of the longest rows too
        gradient_rows = max(1, min(gradient_rows, max_batch_tokens // max(pool_width, 1)))
    rows, est, by_budget = fit_rows("gradient", shape, lora, dtype, pool_width, available, gradient_rows,
                                    labelled_fraction=labelled_fraction, dim=dim, fused=fused)
    tokens = rows * pool_width if by_budget else max_batch_tokens
    if by_budget and max_batch_tokens:
        tokens = min(tokens, max_batch_tokens)
    passes = {"gradient": PassPlan("pool gradient passes", rows, pool_width, est,
                                   "the budget" if by_budget else "gradient_batch_size/max_batch_tokens", tokens)}
    if validation_width:
        # When one pair does not fit, TRL's fused LM head scores fewer positions a tile (its largest part on a CPU).
        head_tokens = FUSED_HEAD_TOKENS
        while True:
            pairs, est, by_budget = fit_rows("validation", shape, lora, dtype, validation_width, available,
                                             validation_pairs, dim=dim, fused=fused, head_tokens=head_tokens,
                                             scored_positions="labelled" if device.type == "cuda" else "all")
            if est.transient <= available or head_tokens <= MIN_HEAD_TOKENS:
                break
            head_tokens //= 2
        passes["validation"] = PassPlan("validation", pairs, validation_width, est,
                                        "the budget" if by_budget else "validation_batch_size",
                                        head_tokens=head_tokens if head_tokens < FUSED_HEAD_TOKENS else None)
    return MemoryPlan(budget, resident, passes)


def plan_run(model, config, fused: bool, pool_width: int, validation_width: int | None, gradient_rows: int
             ) -> MemoryPlan:
    """A run's plan (`plan_passes` under `config.memory_budget_gb` or the machine's default, with the config's
    limits), the same on every process (the smallest), logged once."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    plan = plan_passes(model, MemoryBudget.for_device(config.memory_budget_gb, device), pool_width=pool_width,
                       validation_width=validation_width, gradient_rows=gradient_rows,
                       max_batch_tokens=config.max_batch_tokens, validation_pairs=config.validation_batch_size,
                       dim=config.projection_dim, fused=fused)
    for kind in plan.passes.values():  # every process runs the same passes (the batches are dealt out)
        kind.rows = -max_over_ranks(-kind.rows)
        kind.tokens = -max_over_ranks(-kind.tokens) if kind.tokens else kind.tokens
    logger.warning(plan.describe())
    return plan


def evaluation_rows(model, budget: MemoryBudget, width: int, limit: int, labelled_fraction: float = 1.0) -> PassPlan:
    """Rows a held-out evaluation pass (no gradient) may take under `budget`, at most `limit`."""
    PartialState()  # accelerate's logger needs its state
    device = next(p.device for p in model.parameters())
    resident = resident_bytes(device)
    shape = ModelShape.from_model(model)
    lora = LoraShape.from_model(model) if hasattr(model, "peft_config") else LoraShape(r=0, targets=())
    rows, est, by_budget = fit_rows("evaluation", shape, lora, model_dtype(model), width, budget.limit - resident,
                                    limit, labelled_fraction=labelled_fraction)
    plan = PassPlan("evaluation", rows, width, est, "the budget" if by_budget else "--batch-size")
    logger.info("memory plan: budget %s; %s", budget.describe(), plan.describe(budget, resident))
    return plan


def check_training(model, args, budget: MemoryBudget, what: str, width: int | None = None,
                   resident: int | None = None, lora: LoraShape | None = None) -> str | None:
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
            resident = resident_bytes(next(p.device for p in model.parameters()))
    else:
        shape, dtype = ModelShape.from_config(model), getattr(model, "dtype", None) or "float32"
        resident = resident if resident is not None else resident_bytes()
    options = dict(gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))
    rows = args.per_device_train_batch_size
    step = estimate_pass("training", shape, lora, dtype, rows, width, **options)
    held = resident + step.parts["optimizer"]  # AdamW's state, made at the first step, is held from then on
    if held + step.transient <= budget.limit:
        logger.info("%s: batches of %d rows of up to %d tokens, estimated peak %.2f GB, within the memory budget %s",
                    what, rows, width, (held + step.transient) / GB, budget.describe())
        return None
    fits = largest_rows(lambda r: estimate_pass("training", shape, lora, dtype, r, width, **options).transient,
                        budget.limit - held, rows)
    accumulate = args.gradient_accumulation_steps * rows
    rows_fit = f"{fits} rows fit" if fits > 1 else "1 row fits"
    advice = (f"{rows_fit}: per_device_train_batch_size: {fits} with gradient_accumulation_steps: "
              f"{math.ceil(accumulate / fits)} keeps about {accumulate} rows an optimizer step" if fits
              else "not even 1 row fits: lower max_length, turn gradient_checkpointing on, or raise the budget")
    message = (f"{what}: per_device_train_batch_size={rows} rows of up to {width} tokens are estimated at a peak of "
               f"{(held + step.transient) / GB:.2f} GB (the process holds {held / GB:.2f} GB), over the memory budget "
               f"{budget.describe()}; {advice}. The training's batch sizes are the Trainer's: not changed")
    logger.warning(message)
    return message


def halving_on_oom(function, start: int, what: str):
    """`function(rows)` run with `start` rows a pass; when it runs out of memory, run again with half as many
    (accelerate's `find_executable_batch_size`, halving), each retry logged. `function` must resume, not
    redo, what it finished before the error."""
    current = {"rows": max(1, int(start))}

    def halve() -> int:  # called inside accelerate's handler of the error
        PartialState()  # accelerate's logger needs its state
        if current["rows"] == 1:
            raise torch.OutOfMemoryError(f"{what} ran out of memory at 1 row a pass: lower max_length, or give the "
                                         "process more memory")
        before, current["rows"] = current["rows"], current["rows"] // 2
        logger.warning("%s ran out of memory at %d rows a pass: retrying at %d (accelerate's "
                       "find_executable_batch_size; lower memory_budget_gb to avoid the retry)", what, before,
                       current["rows"])
        return current["rows"]

    return find_executable_batch_size(function, starting_batch_size=current["rows"], reduce_batch_size_fn=halve)()
