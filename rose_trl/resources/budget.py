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

import bisect
import ctypes
import ctypes.util
import math
import re
from dataclasses import dataclass

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import should_reduce_batch_size

from rose_trl.resources.memory import (
    FUSED_HEAD_TOKENS,
    Estimate,
    LoraShape,
    ModelShape,
    dtype_bytes,
    estimate_pass,
    largest_rows,
)
from rose_trl.utils.distributed import max_over_ranks


logger = get_logger(__name__)

CPU_BUDGET_FRACTION = 0.15
CUDA_BUDGET_FRACTION = 0.90
MIN_HEAD_TOKENS = 64
GB = 1e9
# On a CPU, glibc's heap keeps the holes that freed blocks leave, so a pass raises the process's RSS by more than its
# live bytes (what memory.py estimates). Measured on SmolLM2's shape (docs/performance.md, "RSS against live
# bytes"), the passes the plan sizes: with glibc's default (dynamic) mmap threshold up to 1.51 times in one pass,
# 1.7 in the recipe's gradient passes end to end: HEAP_SLACK["default"]; once every block of COMPACT_MMAP_THRESHOLD
# bytes or more is mapped on its own and unmapped when freed (`compact_heap`), up to 1.28 in one pass, and end to end
# in the recipe at memory_budget_gb 2 (each pass's peak against the RSS when the plan or the Trainer's check was
# made) 1.35 to 1.38 for the Trainer's steps and the validation passes, 1.25 to 1.55 for the gradient passes:
# HEAP_SLACK["compact"] (blocks under
# COMPACT_MMAP_THRESHOLD, most of a 1- or 2-row pass's tensors at SmolLM2's width, still come from the heap).
# The compact heap costs page faults (passes take longer), so the plan uses it only when a pass would not fit the
# budget otherwise. CUDA's caching allocator is measured by what it allocates: no slack.
HEAP_SLACK = {"default": 1.8, "compact": 1.6}
COMPACT_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_heap = {"mode": "default"}
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)")


def _trim_heap() -> None:
    """Ask glibc to return freed heap pages to the system (malloc_trim): the RSS then counts what is in use."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def compact_heap() -> bool:
    """From now on, every block of COMPACT_MMAP_THRESHOLD bytes or more gets its own mapping, returned to the system
    when freed (glibc's mallopt M_MMAP_THRESHOLD; the dynamic threshold is then off): the RSS follows the live bytes
    more closely, at the cost of page faults. False where the C library is not glibc."""
    if _heap["mode"] != "compact":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if libc.mallopt(_M_MMAP_THRESHOLD, COMPACT_MMAP_THRESHOLD) != 1:
                return False
        except (OSError, AttributeError):
            return False
        _heap["mode"] = "compact"
        PartialState()  # accelerate's logger needs its state
        logger.warning(
            "memory: blocks of %d MiB and more are now mapped on their own and returned when freed (glibc "
            "mallopt M_MMAP_THRESHOLD), so that the passes fit the budget; passes take longer",
            COMPACT_MMAP_THRESHOLD >> 20,
        )
    return True


def heap_slack(device: torch.device | str) -> float:
    """How much a pass's live bytes raise the process's memory on `device` (HEAP_SLACK; 1 on CUDA)."""
    return 1.0 if torch.device(device).type == "cuda" else HEAP_SLACK[_heap["mode"]]


def unread_weight_bytes(model) -> int:
    """Bytes of `model`'s weights mapped from their file but not yet read into this process's memory (Linux's
    /proc/self/smaps: the mappings that hold a parameter, their size less their resident part; 0 elsewhere).
    transformers loads safetensors weights of the file's dtype as a mapping of the file, and a page of it joins the
    RSS only when a pass first reads it: the first pass reads them all, so they are held from then on."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers()))
    # a sharded (FSDP2 DTensor) parameter has no storage of its own: its local shard's is the one that is mapped
    pointers = sorted({t.untyped_storage().data_ptr() for t in local if t.device.type == "cpu"})
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    except OSError:
        return 0
    unread = 0
    inside = False
    size = 0
    for line in smaps.splitlines():
        head = _MAPPING.match(line)
        if head:  # a mapping: "start-end perms offset dev inode path"
            start, end = int(head.group(1), 16), int(head.group(2), 16)
            i = bisect.bisect_left(pointers, start)
            inside = head.group(3) != "0" and i < len(pointers) and pointers[i] < end
        elif inside and line.startswith("Size:"):
            size = int(line.split()[1])
        elif inside and line.startswith("Rss:"):
            unread += max(0, size - int(line.split()[1])) * 1024
    return unread


def resident_bytes(device: torch.device | str | None = None, model=None) -> int:
    """What this process holds now: its resident memory on the CPU, the memory allocated on a CUDA device. With
    `model` (on the CPU), its weights mapped from their file and not read yet count too (`unread_weight_bytes`):
    the next pass reads them."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    _trim_heap()
    return int(psutil.Process().memory_info().rss) + (unread_weight_bytes(model) if model is not None else 0)


def smallest_gb(peak: int) -> str:
    """`peak` bytes as a memory_budget_gb that holds it: GB rounded up to the tenth."""
    return f"{math.ceil(peak / GB * 10 - 1e-9) / 10:g}"


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes one process may hold (`limit`), and where the figure comes from (`source`)."""

    limit: int
    source: str
    device: str = "cpu"

    @classmethod
    def for_device(
        cls,
        memory_budget_gb: float | None = None,
        device: torch.device | str | None = None,
        processes: int | None = None,
    ) -> MemoryBudget:
        """`memory_budget_gb` when set, else the machine's default share (module docstring)."""
        device = torch.device(device or PartialState().device)
        if memory_budget_gb is not None:
            return cls(int(memory_budget_gb * GB), f"memory_budget_gb: {memory_budget_gb:g}", device.type)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return cls(
                int(CUDA_BUDGET_FRACTION * free),
                f"{CUDA_BUDGET_FRACTION:.0%} of the {free / GB:.1f} GB free on {device}",
                device.type,
            )
        import psutil

        available = psutil.virtual_memory().available
        if processes is None:
            state = PartialState()
            processes = max(1, getattr(state, "local_num_processes", None) or state.num_processes)
        share = f", shared by {processes} processes" if processes > 1 else ""
        return cls(
            int(CPU_BUDGET_FRACTION * available / processes),
            f"{CPU_BUDGET_FRACTION:.0%} of the {available / GB:.1f} GB of CPU memory available{share}",
            device.type,
        )

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

    def describe(self, budget: MemoryBudget, resident: int, slack: float = 1.0) -> str:
        tokens = f" / {self.tokens} tokens" if self.tokens else ""
        unit = ("pair" if self.kind == "validation" else "row") + ("s" if self.rows > 1 else "")
        tokens += f", TRL's fused LM head {self.head_tokens} positions a tile" if self.head_tokens else ""
        return (
            f"{self.kind}: {self.rows} {unit}{tokens} a pass "
            f"(rows of up to {self.width} tokens; set by {self.limit}), estimated peak "
            f"{(resident + slack * self.estimate.transient) / GB:.2f} GB"
        )


def fit_rows(
    kind: str,
    shape: ModelShape,
    lora: LoraShape,
    dtype,
    width: int,
    available: int,
    limit: int,
    slack: float = 1.0,
    **options,
) -> tuple[int, Estimate, bool]:
    """(rows, their estimate, whether the budget set them) for the most rows <= `limit` a pass of `kind` at `width`
    tokens may take within `available` bytes (its live bytes times `slack`); 1 row (with its estimate) when not
    even one fits."""

    def adds(rows: int) -> int:
        return int(slack * estimate_pass(kind, shape, lora, dtype, rows, width, **options).transient)

    rows = largest_rows(adds, available, limit)
    by_budget = rows < limit
    rows = max(rows, 1)
    return rows, estimate_pass(kind, shape, lora, dtype, rows, width, **options), by_budget


@dataclass
class MemoryPlan:
    budget: MemoryBudget
    resident: int
    passes: dict[str, PassPlan]
    slack: float = 1.0  # heap_slack when the plan was made

    @property
    def available(self) -> int:
        return self.budget.limit - self.resident

    @property
    def over(self) -> list[str]:
        """The passes whose estimated peak is over the budget even at 1 row."""
        return [p.kind for p in self.passes.values() if self.slack * p.estimate.transient > self.available]

    def describe(self) -> str:
        heap = f" (x{self.slack:g} the passes' live bytes: the CPU heap's slack)" if self.slack != 1 else ""
        lines = [
            f"memory plan: budget {self.budget.describe()}; the process holds {self.resident / GB:.2f} GB, "
            f"{max(self.available, 0) / GB:.2f} GB left for a pass{heap}"
        ]
        lines += [f"  {p.describe(self.budget, self.resident, self.slack)}" for p in self.passes.values()]
        over = self.over
        if over:
            least = self.resident + self.slack * max(p.estimate.transient for p in self.passes.values())
            lines.append(
                f"  over the budget even at 1 row: {', '.join(over)}: the budget is not held (an estimated "
                f"peak of {least / GB:.2f} GB; the smallest budget this run can hold: memory_budget_gb: "
                f"{smallest_gb(least)}; or lower max_length)"
            )
        return "\n".join(lines)


def model_dtype(model) -> torch.dtype:
    return next((p.dtype for name, p in model.named_parameters() if "lora_" not in name), torch.float32)


def plan_passes(
    model,
    budget: MemoryBudget,
    *,
    pool_width: int,
    validation_width: int | None,
    gradient_rows: int,
    max_batch_tokens: int | None,
    validation_pairs: int,
    dim: int,
    fused: bool,
    labelled_fraction: float = 1.0,
    resident: int | None = None,
) -> MemoryPlan:
    """Rows a pass for the pool's gradient passes and the validation passes of `model` under `budget`.
    `gradient_rows`, `max_batch_tokens`, `validation_pairs`: the user's upper limits (None: none for tokens). On a
    CPU, when a pass does not fit even at 1 row with glibc's default heap, the heap is made compact (`compact_heap`)
    and the plan made again."""
    device = next(p.device for p in model.parameters())
    resident = resident_bytes(device, model) if resident is None else resident
    options = dict(
        pool_width=pool_width,
        validation_width=validation_width,
        gradient_rows=gradient_rows,
        max_batch_tokens=max_batch_tokens,
        validation_pairs=validation_pairs,
        dim=dim,
        fused=fused,
        labelled_fraction=labelled_fraction,
    )
    plan = _plan(model, budget, resident, heap_slack(device), **options)
    if plan.over and device.type != "cuda" and _heap["mode"] == "default" and compact_heap():
        plan = _plan(model, budget, resident, heap_slack(device), **options)
    return plan


def _plan(
    model,
    budget: MemoryBudget,
    resident: int,
    slack: float,
    *,
    pool_width: int,
    validation_width: int | None,
    gradient_rows: int,
    max_batch_tokens: int | None,
    validation_pairs: int,
    dim: int,
    fused: bool,
    labelled_fraction: float,
) -> MemoryPlan:
    device = next(p.device for p in model.parameters())
    shape, lora, dtype = ModelShape.from_model(model), LoraShape.from_model(model), model_dtype(model)
    available = budget.limit - resident
    if max_batch_tokens:  # the user's token cap bounds the rows of the longest rows too
        gradient_rows = max(1, min(gradient_rows, max_batch_tokens // max(pool_width, 1)))
    rows, est, by_budget = fit_rows(
        "gradient",
        shape,
        lora,
        dtype,
        pool_width,
        available,
        gradient_rows,
        slack,
        labelled_fraction=labelled_fraction,
        dim=dim,
        fused=fused,
    )
    tokens = rows * pool_width if by_budget else max_batch_tokens
    if by_budget and max_batch_tokens:
        tokens = min(tokens, max_batch_tokens)
    passes = {
        "gradient": PassPlan(
            "pool gradient passes",
            rows,
            pool_width,
            est,
            "the budget" if by_budget else "gradient_batch_size/max_batch_tokens",
            tokens,
        )
    }
    if validation_width:
        # When one pair does not fit, TRL's fused LM head scores fewer positions a tile (its largest part on a CPU).
        head_tokens = FUSED_HEAD_TOKENS
        while True:
            pairs, est, by_budget = fit_rows(
                "validation",
                shape,
                lora,
                dtype,
                validation_width,
                available,
                validation_pairs,
                slack,
                dim=dim,
                fused=fused,
                head_tokens=head_tokens,
                scored_positions="labelled" if device.type == "cuda" else "all",
            )
            if slack * est.transient <= available or head_tokens <= MIN_HEAD_TOKENS:
                break
            head_tokens //= 2
        passes["validation"] = PassPlan(
            "validation",
            pairs,
            validation_width,
            est,
            "the budget" if by_budget else "validation_batch_size",
            head_tokens=head_tokens if head_tokens < FUSED_HEAD_TOKENS else None,
        )
    return MemoryPlan(budget, resident, passes, slack)


def plan_run(
    model, config, fused: bool, pool_width: int, validation_width: int | None, gradient_rows: int
) -> MemoryPlan:
    """A run's plan (`plan_passes` under `config.memory_budget_gb` or the machine's default, with the config's
    limits), the same on every process (the smallest), logged once."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    plan = plan_passes(
        model,
        MemoryBudget.for_device(config.memory_budget_gb, device),
        pool_width=pool_width,
        validation_width=validation_width,
        gradient_rows=gradient_rows,
        max_batch_tokens=config.max_batch_tokens,
        validation_pairs=config.validation_batch_size,
        dim=config.projection_dim,
        fused=fused,
    )
    for kind in plan.passes.values():  # every process runs the same passes (the batches are dealt out)
        kind.rows = -max_over_ranks(-kind.rows)
        kind.tokens = -max_over_ranks(-kind.tokens) if kind.tokens else kind.tokens
    logger.warning(plan.describe())
    return plan


def evaluation_rows(model, budget: MemoryBudget, width: int, limit: int, labelled_fraction: float = 1.0) -> PassPlan:
    """Rows a held-out evaluation pass (no gradient) may take under `budget`, at most `limit`."""
    PartialState()  # accelerate's logger needs its state
    device = next(p.device for p in model.parameters())
    resident = resident_bytes(device, model)
    shape = ModelShape.from_model(model)
    lora = LoraShape.from_model(model) if hasattr(model, "peft_config") else LoraShape(r=0, targets=())
    slack = heap_slack(device)
    rows, est, by_budget = fit_rows(
        "evaluation",
        shape,
        lora,
        model_dtype(model),
        width,
        budget.limit - resident,
        limit,
        slack,
        labelled_fraction=labelled_fraction,
    )
    plan = PassPlan("evaluation", rows, width, est, "the budget" if by_budget else "--batch-size")
    logger.info("memory plan: budget %s; %s", budget.describe(), plan.describe(budget, resident, slack))
    return plan


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
    step = estimate_pass("training", shape, lora, dtype, rows, width, **options)
    held = resident + step.parts["optimizer"]  # AdamW's state, made at the first step, is held from then on
    device = (
        next(p.device for p in model.parameters())
        if hasattr(model, "parameters") and callable(model.parameters)
        else torch.device("cpu")
    )
    slack = heap_slack(device)
    if (
        held + slack * step.transient > budget.limit
        and device.type != "cuda"
        and _heap["mode"] == "default"
        and held + HEAP_SLACK["compact"] * step.transient <= budget.limit
        and compact_heap()
    ):
        slack = heap_slack(device)  # the compact heap lets the Trainer's batch fit
    peak = held + slack * step.transient
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
        HEAP_SLACK["compact"] if device.type != "cuda" else 1.0,
        **options,
    )
    accumulate = args.gradient_accumulation_steps * rows
    rows_fit = f"{fits} rows fit" if fits > 1 else "1 row fits"
    # The least this training can hold: 1 row a step, with the compact heap on a CPU.
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


def halving_on_oom(function, start: int, what: str):
    """`function(rows)` run with `start` rows a pass; when it runs out of memory, run again with half as many
    (accelerate's `find_executable_batch_size`, halving), each retry logged. `function` must resume, not
    redo, what it finished before the error.

    The first try is a plain call: accelerate's wrapper runs a full garbage collection before its first call
    (about 0.15 s with torch and transformers loaded), which would be paid by every extraction and validation
    call of a run, and is several times the whole gradient pass of a small model (tests/test_benchmarks.py).
    Only a pass that runs out of memory goes through accelerate's loop."""
    current = {"rows": max(1, int(start))}

    def halve() -> int:  # called once the error is caught (by this function, then by accelerate's handler)
        PartialState()  # accelerate's logger needs its state
        if current["rows"] == 1:
            raise torch.OutOfMemoryError(
                f"{what} ran out of memory at 1 row a pass: lower max_length, or give the process more memory"
            )
        before, current["rows"] = current["rows"], current["rows"] // 2
        logger.warning(
            "%s ran out of memory at %d rows a pass: retrying at %d (accelerate's "
            "find_executable_batch_size; lower memory_budget_gb to avoid the retry)",
            what,
            before,
            current["rows"],
        )
        return current["rows"]

    try:
        return function(current["rows"])
    except Exception as error:  # noqa: BLE001 - accelerate's test says which errors are out-of-memory ones
        if not should_reduce_batch_size(error):
            raise
    # Outside the handler: the failed pass's frames (and their tensors) are released by now; accelerate's wrapper
    # collects garbage and empties the device cache before its first call.
    return find_executable_batch_size(function, starting_batch_size=halve(), reduce_batch_size_fn=halve)()
