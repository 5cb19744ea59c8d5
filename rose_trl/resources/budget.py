"""The run's memory budget, and every pass it makes sized to fit it.

The budget is `memory_budget_gb` (ROSEConfig) or, by default, the machine's memory less headroom, chosen for speed
(`MemoryBudget.for_device`): a user who sets no budget wants the run fast on the memory the machine has.
- CPU: what the process holds when the budget is taken, plus `CPU_BUDGET_SHARE` (75%) of the memory available
  (psutil's `available`: free and reclaimable), shared equally by the node's processes. The quarter left is
  headroom: for the page cache that serves the gradient stores, for the machine's other processes, and for the
  estimates' error (a pass's RSS rose up to 1.27 times its planned figure, at the 7B shape: docs/results/memory.md).
  On this project's 2-core CPU machine (24 GiB) that is about 18 GB, where SmolLM2-135M's passes reach their
  limits (gradient_batch_size, validation_batch_size): the recipe's time stops improving from about 8 GB
  (docs/results/memory_budget.md);
- CUDA: what the process has reserved plus `CUDA_BUDGET_SHARE` (90%) of the device's free memory
  (`torch.cuda.mem_get_info`), each process having its own device.
A budget the user sets is held: where a pass fits it only with glibc's compact heap (`compact_heap`), the heap is
made compact; the default budget never is (the compact heap's page faults make passes slower).

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
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from rose_trl.resources.memory import (
    FUSED_HEAD_TOKENS,
    Estimate,
    LoraShape,
    ModelShape,
    estimate_pass,
    largest_rows,
)
from rose_trl.resources.process import halving_on_oom, resident_bytes, unread_weight_bytes  # noqa: F401
from rose_trl.utils.distributed import max_over_ranks


logger = get_logger(__name__)

CPU_BUDGET_SHARE = 0.75  # of the memory available, beyond what the process holds: the default budget on a CPU
CUDA_BUDGET_SHARE = 0.90  # of the device's free memory, beyond what the process has reserved
MIN_HEAD_TOKENS = 64
GB = 1e9
# On a CPU, glibc's heap keeps the holes that freed blocks leave, so a pass raises the process's RSS by more than its
# live bytes (what memory.py estimates). Measured on SmolLM2's shape (docs/results/memory.md, "RSS against live
# bytes"), the passes the plan sizes: with glibc's default (dynamic) mmap threshold up to 1.51 times in one pass,
# 1.7 in the recipe's gradient passes end to end: HEAP_SLACK["default"]; once every block of COMPACT_MMAP_THRESHOLD
# bytes or more is mapped on its own and unmapped when freed (`compact_heap`), up to 1.28 in one pass, and end to end
# in the recipe at memory_budget_gb 2 (each pass's peak against the RSS when the plan or the Trainer's check was
# made) 1.35 to 1.38 for the Trainer's steps and the validation passes, 1.25 to 1.55 for the gradient passes:
# HEAP_SLACK["compact"] (blocks under
# COMPACT_MMAP_THRESHOLD, most of a 1- or 2-row pass's tensors at SmolLM2's width, still come from the heap).
# The compact heap costs page faults (passes take longer), so the plan uses it only when a pass would not fit a budget
# the user set otherwise. CUDA's caching allocator is measured by what it allocates: no slack.
HEAP_SLACK = {"default": 1.8, "compact": 1.6}
# What a larger budget saves (`pass_seconds`), measured on a CPU (docs/results/memory_budget.md):
# a pass costs as much as PASS_OVERHEAD_TOKENS tokens of its rows beyond them, and glibc's compact heap makes the
# passes COMPACT_HEAP_TIME times as long (its page faults). Not measured on CUDA: no time figure there.
PASS_OVERHEAD_TOKENS = {"cpu": 64}
COMPACT_HEAP_TIME = 1.3
COMPACT_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_heap = {"mode": "default"}


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


def heap_mode() -> str:
    """glibc's heap in this process: "default", or "compact" once `compact_heap` has run."""
    return _heap["mode"]


def heap_slack(device: torch.device | str) -> float:
    """How much a pass's live bytes raise the process's memory on `device` (HEAP_SLACK; 1 on CUDA)."""
    return 1.0 if torch.device(device).type == "cuda" else HEAP_SLACK[_heap["mode"]]


def smallest_gb(peak: int) -> str:
    """`peak` bytes as a memory_budget_gb that holds it: GB rounded up to the tenth."""
    return f"{math.ceil(peak / GB * 10 - 1e-9) / 10:g}"


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes one process may hold (`limit`), and where the figure comes from (`source`). `chosen`: a budget the user
    set (memory_budget_gb), held with glibc's compact heap on a CPU when a pass fits only so; the default budget
    (False) is the machine's, and never pays the compact heap's page faults."""

    limit: int
    source: str
    device: str = "cpu"
    chosen: bool = True

    @classmethod
    def for_device(
        cls,
        memory_budget_gb: float | None = None,
        device: torch.device | str | None = None,
        processes: int | None = None,
        held: int | None = None,
    ) -> MemoryBudget:
        """`memory_budget_gb` when set, else the machine's default (module docstring): what the process holds
        now plus a share of the memory still free (`held` overrides what it holds; tests)."""
        device = torch.device(device or PartialState().device)
        if memory_budget_gb is not None:
            return cls(int(memory_budget_gb * GB), f"memory_budget_gb: {memory_budget_gb:g}", device.type)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            held = torch.cuda.memory_reserved(device) if held is None else held
            return cls(
                int(held + CUDA_BUDGET_SHARE * free),
                f"the default: the {held / GB:.1f} GB this process holds and {CUDA_BUDGET_SHARE:.0%} of the "
                f"{free / GB:.1f} GB free on {device}",
                device.type,
                chosen=False,
            )
        import psutil

        available = psutil.virtual_memory().available
        held = resident_bytes() if held is None else held
        if processes is None:
            state = PartialState()
            processes = max(1, getattr(state, "local_num_processes", None) or state.num_processes)
        share = f", shared by {processes} processes" if processes > 1 else ""
        return cls(
            int(held + CPU_BUDGET_SHARE * available / processes),
            f"the default: the {held / GB:.1f} GB this process holds and {CPU_BUDGET_SHARE:.0%} of the "
            f"{available / GB:.1f} GB of CPU memory available{share}",
            device.type,
            chosen=False,
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
class LargerBudget:
    """What a larger budget would buy: its bytes, the plan under it (glibc's default heap), and the share of the
    passes' time it would save (`pass_seconds`; None where no time model is measured: CUDA)."""

    limit: int
    plan: MemoryPlan
    saving: float | None

    def describe(self, plan: MemoryPlan) -> str:
        units = {"gradient": ("pool gradient passes of", "row"), "validation": ("validation passes of", "pair")}
        changed = [
            f"{units[k][0]} {p.rows} {units[k][1]}{'s' if p.rows > 1 else ''}"
            for k, p in self.plan.passes.items()
            if p.rows != plan.passes[k].rows or p.head_tokens != plan.passes[k].head_tokens
        ]
        heap = plan.slack != self.plan.slack
        what = " and ".join(changed) + (", " if changed and heap else "") + ("glibc's default heap" if heap else "")
        saving = f": about {self.saving:.0%} less time in these passes" if self.saving is not None else ""
        return (
            f"  a budget of {smallest_gb(self.limit)} GB (memory_budget_gb: {smallest_gb(self.limit)}) would allow "
            f"{what}{saving}"
        )


@dataclass
class MemoryPlan:
    budget: MemoryBudget
    resident: int
    passes: dict[str, PassPlan]
    slack: float = 1.0  # heap_slack when the plan was made
    larger: LargerBudget | None = None  # what a larger budget (up to the machine's default) would buy
    notes: list[str] = field(default_factory=list)  # more lines of the log (the selection's passes: cost.py)

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
        lines += [f"  {note}" for note in self.notes]
        if self.larger is not None:  # last: what a larger budget would change in the lines above
            lines.append(self.larger.describe(self))
        return "\n".join(lines)


def model_dtype(model) -> torch.dtype:
    return next((p.dtype for name, p in model.named_parameters() if "lora_" not in name), torch.float32)


class ShapedModel(NamedTuple):
    """What a plan needs of a model: its shape, its LoRA adapter's, its dtype and its device (no weights)."""

    shape: ModelShape
    lora: LoraShape
    dtype: torch.dtype | str
    device: torch.device


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
    counts: dict[str, int] | None = None,
) -> MemoryPlan:
    """Rows a pass for the pool's gradient passes and the validation passes of `model` under `budget`.
    `gradient_rows`, `max_batch_tokens`, `validation_pairs`: the user's upper limits (None: none for tokens). On a
    CPU, when a pass does not fit even at 1 row with glibc's default heap and the budget is the user's, the heap is
    made compact (`compact_heap`) and the plan made again. `counts` (pool rows and validation pairs a checkpoint,
    {"gradient": n, "validation": m}) weigh the passes' time in what a larger budget would save (`plan.larger`)."""
    device = next(p.device for p in model.parameters())
    resident = resident_bytes(device, model) if resident is None else resident
    return plan_shape_passes(
        ModelShape.from_model(model),
        LoraShape.from_model(model),
        model_dtype(model),
        budget,
        device=device,
        resident=resident,
        counts=counts,
        pool_width=pool_width,
        validation_width=validation_width,
        gradient_rows=gradient_rows,
        max_batch_tokens=max_batch_tokens,
        validation_pairs=validation_pairs,
        dim=dim,
        fused=fused,
        labelled_fraction=labelled_fraction,
    )


def plan_shape_passes(
    shape: ModelShape,
    lora: LoraShape,
    dtype,
    budget: MemoryBudget,
    *,
    device: torch.device | str,
    resident: int,
    compact: bool = True,
    counts: dict[str, int] | None = None,
    **options,
) -> MemoryPlan:
    """`plan_passes` from the model's shape (a model not loaded yet: `rose-trl plan`), `resident` bytes held when the
    passes run. `compact`: on a CPU, when a pass does not fit at 1 row with glibc's default heap and the budget is the
    user's, make the heap compact (`compact_heap`, as a run does) and plan again; False plans with the compact heap's
    slack without changing this process's heap (what a run would do, said beforehand)."""
    device = torch.device(device)
    model = ShapedModel(shape, lora, dtype, device)
    plan = _plan(model, budget, resident, heap_slack(device), **options)
    if plan.over and budget.chosen and device.type != "cuda" and _heap["mode"] == "default":
        if not compact:
            plan = _plan(model, budget, resident, HEAP_SLACK["compact"], **options)
        elif compact_heap():
            plan = _plan(model, budget, resident, heap_slack(device), **options)
    plan.larger = larger_budget(model, plan, counts, **options)
    return plan


def pass_seconds(plan: MemoryPlan, counts: dict[str, int] | None = None) -> float:
    """The time of a checkpoint's passes under `plan`, in seconds of one token of a pass (`PASS_OVERHEAD_TOKENS`):
    each pass costs its rows' tokens (a validation pair: two rows) and the device's overhead of a pass, and on a CPU
    glibc's compact heap multiplies it by `COMPACT_HEAP_TIME`. `counts`: rows (pairs) a checkpoint of each kind
    (default: one of each)."""
    device = plan.budget.device
    overhead = PASS_OVERHEAD_TOKENS.get(device)
    if overhead is None:
        raise ValueError(f"no time model for passes on {device}")
    total = 0.0
    for kind, p in plan.passes.items():
        n = (counts or {}).get(kind, 1)
        sequences = 2 if kind == "validation" else 1
        total += (n / p.rows) * overhead + n * sequences * p.width
    compact = device != "cuda" and plan.slack == HEAP_SLACK["compact"]
    return total * (COMPACT_HEAP_TIME if compact else 1.0)


def larger_budget(
    model: ShapedModel, plan: MemoryPlan, counts: dict[str, int] | None = None, **options
) -> LargerBudget | None:
    """The budget that would give every pass its user's limit (gradient_batch_size, validation_batch_size: the rows
    a roomy budget gives) on glibc's default heap, at most the machine's default budget, when it is larger than
    `plan`'s and changes a pass; with the share of the passes' time it would save (`pass_seconds`). None when no
    larger budget would change anything, and under the default budget (already the machine's)."""
    if not plan.budget.chosen:
        return None
    device = torch.device(plan.budget.device)
    slack = 1.0 if device.type == "cuda" else HEAP_SLACK["default"]
    roomy = _plan(model, MemoryBudget(plan.resident + 10**18, "roomy", device.type), plan.resident, slack, **options)
    needed = plan.resident + max(int(slack * p.estimate.transient) for p in roomy.passes.values())
    machine = MemoryBudget.for_device(None, device, processes=None, held=plan.resident).limit
    limit = min(needed, machine)
    if limit <= plan.budget.limit:
        return None
    larger = _plan(model, MemoryBudget(limit, "larger", device.type), plan.resident, slack, **options)
    if larger.slack == plan.slack and all(
        (p.rows, p.head_tokens) == (plan.passes[k].rows, plan.passes[k].head_tokens) for k, p in larger.passes.items()
    ):
        return None
    saving = None
    if device.type in PASS_OVERHEAD_TOKENS:
        saving = 1 - pass_seconds(larger, counts) / pass_seconds(plan, counts)
    return LargerBudget(limit, larger, saving)


def _plan(
    model: ShapedModel,
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
    labelled_fraction: float = 1.0,
) -> MemoryPlan:
    shape, lora, dtype, device = model
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
                # the validation passes score the labelled positions only, on every device (labelled_positions_only)
                scored_positions="labelled",
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
    model,
    config,
    fused: bool,
    pool_width: int,
    validation_width: int | None,
    gradient_rows: int,
    counts: dict[str, int] | None = None,
    notes: list[str] | None = None,
) -> MemoryPlan:
    """A run's plan (`plan_passes` under `config.memory_budget_gb` or the machine's default, with the config's
    limits), the same on every process (the smallest), logged once with `notes` (the selection's passes)."""
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
        counts=counts,
    )
    for kind in plan.passes.values():  # every process runs the same passes (the batches are dealt out)
        kind.rows = -max_over_ranks(-kind.rows)
        kind.tokens = -max_over_ranks(-kind.tokens) if kind.tokens else kind.tokens
    plan.notes = list(notes or [])
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
