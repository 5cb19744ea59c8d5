"""A warm-up checkpoint's learning rate eta_i, recovered from what the Trainer saved.

eta_i is the mean learning rate of the optimizer steps since the previous checkpoint: what ROSECallback
records live (the LR each step applies, read as the step begins). For a warm-up that ran without the
callback, this module recovers the same numbers from the checkpoint folders, read without running code:

- `trainer_state.json`: global_step, max_steps and the log history. transformers 5 logs, at step s, the
  LR that step s applied; a log covering every step of an interval gives its mean directly.
- `scheduler.pt` (`torch.load(weights_only=True)`): the LambdaLR state, i.e. base_lrs, last_epoch (steps
  taken) and _last_lr (the LR the next step applies).
- `training_args.bin`: the Trainer's pickled TrainingArguments (lr_scheduler_type, warmup_steps,
  lr_scheduler_kwargs, learning_rate), unpickled against inert records (`_ArgsUnpickler`): no constructor,
  function or attribute lookup of any other module runs.

The schedule is rebuilt with transformers' own `get_scheduler` (the LR of step t is base * lambda(t - 1)),
and accepted only if it reproduces every observation (each checkpoint's scheduler state, every logged LR)
to 1e-12 relative. Without readable training arguments the four standard schedules (linear, cosine,
constant, constant_with_warmup) x every warm-up length are fitted instead, and accepted only when every
schedule that fits gives the same per-checkpoint means. Anything else raises `ScheduleError`, naming what
is missing.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rose_trl.utils.files import checkpoint_step


SCHEDULER_FILE = "scheduler.pt"
TRAINING_ARGS_FILE = "training_args.bin"
FITTED_SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
RTOL = 1e-12
_MAX_ARGS_PICKLE = 16 * 2**20  # a TrainingArguments pickle is a few kB


class ScheduleError(ValueError):
    """The checkpoints do not determine their learning-rate schedule."""


# ---- training_args.bin, read without running code ------------------------------------------------------
class _Record:
    """Stands in for every object a training_args.bin pickle names: it keeps the arguments and the state
    pickle hands it, and does nothing else."""

    global_name = ""

    def __new__(cls, *args, **kwargs):
        record = object.__new__(cls)
        record.args, record.state = args, None
        return record

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _ArgsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Every global, whatever it names, becomes an inert record type: nothing is imported or looked up.
        key = f"{module}.{name}"
        if key not in self._records:
            self._records[key] = type("Record", (_Record,), {"global_name": key})
        return self._records[key]

    def __init__(self, file):
        super().__init__(file)
        self._records = {}


def _plain(value):
    """A plain value out of the records: an enum member (a record built from one plain argument) gives that
    argument; containers are read recursively; any other record gives None."""
    if isinstance(value, _Record):
        return _plain(value.args[0]) if len(value.args) == 1 and value.state is None else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else None


def read_training_args(path: str | Path) -> dict:
    """The plain fields of a Trainer's training_args.bin (a torch.save zip holding one pickle)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")]
            if len(pickles) != 1 or pickles[0].file_size > _MAX_ARGS_PICKLE:
                raise ValueError("not a torch.save archive of one small object")
            with archive.open(pickles[0]) as f:
                top = _ArgsUnpickler(f).load()
    except Exception as e:  # a damaged file or an unexpected layout: the caller reports what it lacks
        raise ScheduleError(f"{path} cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(top, _Record) or not isinstance(top.state, dict):
        raise ScheduleError(f"{path} does not hold a TrainingArguments object")
    return {str(k): _plain(v) for k, v in top.state.items()}


# ---- what the checkpoint folders say ----------------------------------------------------------------------
@dataclass
class WarmupRecord:
    """What a warm-up's checkpoint folders say about its learning rates."""

    names: list[str]
    steps: list[int]
    max_steps: int | None = None
    logged: dict[int, float] = field(default_factory=dict)  # step s -> the LR step s applied
    schedulers: dict[str, dict] = field(default_factory=dict)  # checkpoint name -> LambdaLR state
    args: dict | None = None  # plain fields of training_args.bin
    unreadable: list[str] = field(default_factory=list)  # what could not be read, and why


def read_warmup_record(checkpoints: list[Path]) -> WarmupRecord:
    record = WarmupRecord([c.name for c in checkpoints], [checkpoint_step(c.name) for c in checkpoints])
    for ckpt in checkpoints:
        state_path = ckpt / "trainer_state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            record.max_steps = state.get("max_steps", record.max_steps)
            record.logged.update(
                {
                    int(e["step"]): float(e["learning_rate"])
                    for e in state.get("log_history", [])
                    if "learning_rate" in e and "step" in e
                }
            )
        path = ckpt / SCHEDULER_FILE
        if path.exists():
            try:
                # weights_only: a scheduler file is untrusted input and must not run code when read.
                scheduler = torch.load(path, map_location="cpu", weights_only=True)
                record.schedulers[ckpt.name] = {
                    "base_lrs": [float(x) for x in scheduler["base_lrs"]],
                    "last_epoch": int(scheduler["last_epoch"]),
                    "_last_lr": [float(x) for x in scheduler["_last_lr"]],
                }
            except Exception as e:  # not a LambdaLR state, or refused by weights_only
                record.unreadable.append(f"{ckpt.name}/{SCHEDULER_FILE} ({type(e).__name__}: {str(e)[:120]})")
        else:
            record.unreadable.append(f"{ckpt.name}/{SCHEDULER_FILE} (missing)")
    for ckpt in reversed(checkpoints):  # every checkpoint of a run holds the same arguments: read the newest
        if (ckpt / TRAINING_ARGS_FILE).exists():
            try:
                record.args = read_training_args(ckpt / TRAINING_ARGS_FILE)
            except ScheduleError as e:
                record.unreadable.append(str(e))
            break
    else:
        record.unreadable.append(f"{TRAINING_ARGS_FILE} (missing)")
    return record


def mean_over_steps(step_lrs: Mapping[int, float], after: int, upto: int) -> float | None:
    """Mean LR of the steps after < t <= upto when every one of them is known, else None."""
    steps = range(after + 1, upto + 1)
    if not steps or any(t not in step_lrs for t in steps):
        return None
    return float(np.mean([step_lrs[t] for t in steps]))


# ---- the schedule --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    name: str
    warmup_steps: int
    kwargs: tuple = ()

    def describe(self) -> str:
        extra = f", {dict(self.kwargs)}" if self.kwargs else ""
        return f"{self.name} (warm-up {self.warmup_steps} steps{extra})"


def _lr_lambda(schedule: Schedule, max_steps: int):
    """lambda(k), the LR factor after k scheduler steps, from the scheduler transformers builds."""
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        schedule.name,
        optimizer=dummy,
        num_warmup_steps=schedule.warmup_steps,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=dict(schedule.kwargs),
    )
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ScheduleError(
            f"lr_scheduler_type {schedule.name!r} is not a fixed schedule (LambdaLR); its learning "
            "rates depend on the training run"
        )
    return scheduler.lr_lambdas[0]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


def _base_lr(record: WarmupRecord) -> float:
    bases = {s["base_lrs"][0] for s in record.schedulers.values()}
    if len(bases) > 1:
        raise ScheduleError(f"the checkpoints' scheduler states start from different learning rates {sorted(bases)}")
    if bases:
        return bases.pop()
    if record.args and isinstance(record.args.get("learning_rate"), (int, float)):
        return float(record.args["learning_rate"])
    raise ScheduleError("the base learning rate is unknown (no readable scheduler.pt or training_args.bin)")


def _misfit(lr_after, record: WarmupRecord) -> str | None:
    """The first observation `lr_after(k) = base * lambda(k)` fails to reproduce, or None."""
    for name, step in zip(record.names, record.steps, strict=True):
        state = record.schedulers.get(name)
        if state is None:
            continue
        if state["last_epoch"] != step:
            return (
                f"{name}'s scheduler took {state['last_epoch']} steps in {step} optimizer steps (skipped steps "
                "cannot be replayed)"
            )
        if not _close(state["_last_lr"][0], lr_after(step)):
            return (
                f"{name}/scheduler.pt gives {state['_last_lr'][0]!r} for step {step + 1}, "
                f"the schedule {lr_after(step)!r}"
            )
    for step, lr in sorted(record.logged.items()):
        if not _close(lr, lr_after(step - 1)):
            return f"the log history gives {lr!r} for step {step}, the schedule {lr_after(step - 1)!r}"
    return None


def _candidates(record: WarmupRecord) -> list[Schedule]:
    if record.args is None:
        # Fit: every standard schedule with every warm-up length (constant has none).
        return [
            Schedule(name, w)
            for name in FITTED_SCHEDULES
            for w in range(record.max_steps + 1)
            if name != "constant" or w == 0
        ]
    from transformers import TrainingArguments

    args = record.args
    name, kwargs = args.get("lr_scheduler_type"), args.get("lr_scheduler_kwargs") or {}
    if not isinstance(name, str) or not isinstance(kwargs, dict):
        raise ScheduleError(f"{TRAINING_ARGS_FILE} names no lr_scheduler_type (or lr_scheduler_kwargs is not a dict)")
    warmups = set()
    try:  # transformers' own rule (warmup_steps < 1 is a ratio of the training steps)
        warmups.add(int(TrainingArguments.get_warmup_steps(_Fields(args), record.max_steps)))
    except Exception as e:
        raise ScheduleError(f"{TRAINING_ARGS_FILE}: no warm-up length ({type(e).__name__}: {e})") from e
    ratio = args.get("warmup_ratio")  # transformers 4.x kept the ratio apart, used when warmup_steps is 0
    if isinstance(ratio, (int, float)) and ratio > 0 and not args.get("warmup_steps"):
        warmups.add(int(np.ceil(record.max_steps * ratio)))
    return [Schedule(name, w, tuple(sorted(kwargs.items()))) for w in sorted(warmups)]


class _Fields:
    """Attribute access to the plain fields read from training_args.bin (TrainingArguments' methods read them)."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)


def recover_learning_rates(record: WarmupRecord) -> tuple[list[float], Schedule]:
    """Every checkpoint's mean LR over its steps, from the one schedule the observations determine."""
    if record.max_steps is None:
        raise ScheduleError("trainer_state.json is missing (max_steps unknown)")
    if not record.schedulers and not record.logged:
        raise ScheduleError(
            "there is nothing to check a schedule against: no readable scheduler.pt and no "
            f"logged learning rate (unreadable: {'; '.join(record.unreadable)})"
        )
    base = _base_lr(record)
    fitting, reasons = [], []
    for schedule in _candidates(record):
        try:
            lam = _lr_lambda(schedule, record.max_steps)
        except ScheduleError as e:
            reasons.append(str(e))
            continue
        except Exception as e:  # get_scheduler refuses the name or its arguments
            reasons.append(f"{schedule.describe()}: {type(e).__name__}: {str(e)[:200]}")
            continue
        lr_after = lambda k, lam=lam: base * lam(k)  # noqa: E731  (torch's LambdaLR: base_lr * lmbda(last_epoch))
        misfit = _misfit(lr_after, record)
        if misfit is not None:
            reasons.append(f"{schedule.describe()}: {misfit}")
            continue
        previous = 0
        means = []
        for step in record.steps:
            means.append(float(np.mean([lr_after(t - 1) for t in range(previous + 1, step + 1)])))
            previous = step
        if fitting and not all(_close(a, b) for a, b in zip(fitting[0][1], means, strict=True)):
            raise ScheduleError(
                f"both {fitting[0][0].describe()} and {schedule.describe()} reproduce every observation "
                f"but give different means ({fitting[0][1]} vs {means})"
            )
        fitting.append((schedule, means))
    if not fitting:
        shown = (
            reasons
            if record.args is not None
            else reasons[:1] + [f"... and {len(reasons) - 1} other fitted schedules"]
        )
        raise ScheduleError("no schedule reproduces the saved learning rates: " + "; ".join(shown))
    return fitting[0][1], fitting[0][0]
