"""The run ledger: what a run's `rose/` folder records, and every way of knowing a checkpoint's learning rate.

    rose/run.json           what every gradient store under rose/ depends on (refused, or cleared, when it changes);
                            of the warm-up's batch, the effective batch only (per-device batch x accumulation x
                            processes: `effective_batch_size`), so that a run moves to another process count
    rose/checkpoints.json   each checkpoint in step order: name, learning rate eta_i, name@adapter-hash, and
                            whether its gradient stores were computed (`stores`: false for a checkpoint that
                            selection_checkpoints leaves out)
    rose/step_lrs.json      optimizer step -> the learning rate it applied (written as each step begins)

eta_i is the mean learning rate of the optimizer steps since the previous checkpoint. It is known, first
source first:
1. live, while the warm-up runs (`step_began`, then `pop_live_learning_rate` at the save: ROSECallback);
2. from checkpoints.json, when it records the checkpoint for the same weights;
3. from step_lrs.json, when it covers every step since the previous checkpoint (a resumed warm-up, or a
   finished one read offline);
4. from the Trainer's log history and, last, from the warm-up's schedule rebuilt from its checkpoint
   folders (schedules.py);
and `checkpoint_learning_rates` (`scoring_learning_rates`) overrides them all when the scores are computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger

from rose_trl.checkpoints.schedules import ScheduleError, mean_over_steps, read_warmup_record, recover_learning_rates
from rose_trl.gradients.capture import trainable_parameters
from rose_trl.stores.store import StoreMismatchError, describe_mismatch
from rose_trl.utils.distributed import gathered
from rose_trl.utils.errors import ConfigError
from rose_trl.utils.files import atomic_write_json, checkpoint_step, read_json, remove_tree
from rose_trl.utils.timing import stage


logger = get_logger(__name__)


def adapter_fingerprint(model) -> str:
    """Hash of the trainable weights: a checkpoint name alone does not say which weights produced a store."""
    h = hashlib.sha256()
    with gathered(model):  # ZeRO-3/FSDP2: whole weights (a collective: every rank hashes)
        for name, p in trainable_parameters(model):
            h.update(name.encode())
            # a copy: numpy must not hold (and pin) the storage FSDP2 frees when it reshards
            h.update(p.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
    return h.hexdigest()[:16]


@stage("callback checks and records")
def checkpoint_identity(name: str, model) -> str:
    """`name@adapter-hash`: what the stores and checkpoints.json record, so that nothing recorded for other
    weights under the same name is reused."""
    return f"{name}@{adapter_fingerprint(model)}"


# ---- the warm-up's batch, whatever the process count ---------------------------------------------------------

EFFECTIVE_BATCH = "run.effective_batch_size"
# What run.json held of the batch before it held the effective batch: read, never written.
LEGACY_BATCH = ("run.per_device_train_batch_size", "run.gradient_accumulation_steps")
BATCH_HINT = (
    "\n  (the effective batch is per_device_train_batch_size x gradient_accumulation_steps x processes: on another "
    "process count, keep the one found, e.g. halve per_device_train_batch_size on twice the processes)"
)


def effective_batch_size(args, num_processes: int | None = None) -> int:
    """Rows an optimizer step of a Trainer with `args` sees: per-device batch x accumulation x processes (this
    launch's processes by default)."""
    if num_processes is None:
        from accelerate import PartialState

        num_processes = PartialState().num_processes
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(num_processes)


def saved_process_count(checkpoint: str | Path) -> int | None:
    """How many processes saved a Trainer checkpoint: one `rng_state.pth`, or one `rng_state_<rank>.pth` each (as
    Trainer._save_rng_state writes them); None when the folder holds neither."""
    folder = Path(checkpoint)
    ranks = list(folder.glob("rng_state_*.pth"))
    return len(ranks) if ranks else (1 if (folder / "rng_state.pth").exists() else None)


def resume_differences(checkpoint: str | Path, args, what: str) -> str | None:
    """When `what` (the warm-up, the final training) resumes mid-way from `checkpoint` on another process count
    than saved it, what differs from an unbroken run: the warning to log, else None."""
    from accelerate import PartialState

    saved, now = saved_process_count(checkpoint), PartialState().num_processes
    if saved is None or saved == now:
        return None
    return (
        f"{what} resumes from {Path(checkpoint).name}, saved by {saved} process(es), on {now}: with the same "
        f"effective batch ({effective_batch_size(args, now)} rows an optimizer step) its steps see as many rows, but "
        f"it is not what an unbroken run on {saved} process(es) would have been: the remaining steps' rows are dealt "
        f"to {now} process(es) (each averages the loss over its own rows' tokens before their gradients are "
        "averaged, and a last batch that does not divide evenly is padded with repeated rows), and the random "
        "states saved per process (dropout) are not restored. Its checkpoints, their Adam states and learning rates "
        "are this run's, and the selection is computed from them as always."
    )


def _warmup_processes(rose_dir: Path) -> int | None:
    """The process count of the warm-up whose stores `rose_dir` holds, from the checkpoints beside it (the recipe's
    warmup/, or a callback's output_dir); None when none is there."""
    for folder in (rose_dir.parent / "warmup", rose_dir.parent):
        counts = {saved_process_count(c) for c in folder.glob("checkpoint-*") if c.is_dir()} - {None}
        if len(counts) == 1:
            return counts.pop()
    return None


def upgrade_legacy_batch(found: dict, wanted: dict, rose_dir: Path) -> dict:
    """`found` (a run.json) with the effective batch in place of the per-device batch and accumulation an older
    rose_trl recorded (only the recipe recorded them), the process count read from the warm-up's checkpoints (their
    rng_state files). Without a checkpoint to read it from, a StoreMismatchError says what to do."""
    if EFFECTIVE_BATCH in found or EFFECTIVE_BATCH not in wanted or not all(k in found for k in LEGACY_BATCH):
        return found
    rows, steps = (found[k] for k in LEGACY_BATCH)
    processes = _warmup_processes(rose_dir)
    if processes is None:
        current = wanted[EFFECTIVE_BATCH]
        raise StoreMismatchError(
            f"{rose_dir / 'run.json'} was written by an earlier rose_trl: it records per_device_train_batch_size="
            f"{rows} and gradient_accumulation_steps={steps}, not how many processes the warm-up ran on, and no "
            f"warm-up checkpoint beside it says; this run's effective batch is {current}. If the warm-up ran on P "
            f'processes, replace those two entries of run.json by "{EFFECTIVE_BATCH}": {rows * steps} x P '
            "(or set overwrite_stores: true to recompute)"
        )
    upgraded = {k: v for k, v in found.items() if k not in LEGACY_BATCH}
    upgraded[EFFECTIVE_BATCH] = rows * steps * processes
    return upgraded


def resolve_checkpoints(indices: list[int] | None, count: int) -> list[int]:
    """The positions (sorted, 0-based) that `selection_checkpoints` names among a warm-up's `count` checkpoints in
    step order: all of them for None, negative positions counted from the end as in Python. Out of range or named
    twice: an error naming the option and the number of checkpoints."""
    if indices is None:
        return list(range(count))
    span = f"the warm-up has {count} checkpoint{'s' if count != 1 else ''} (0..{count - 1}, or -{count}..-1)"
    resolved = []
    for i in indices:
        if not -count <= i < count:
            raise ConfigError(f"selection_checkpoints {list(indices)}: {i} is out of range: {span}")
        resolved.append(i % count)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"selection_checkpoints {list(indices)} names a checkpoint twice: {span}")
    return sorted(resolved)


def check_rate_count(explicit: list[float] | None, names: list[str], found: str) -> None:
    if explicit is not None and len(explicit) != len(names):
        raise ValueError(
            f"checkpoint_learning_rates has {len(explicit)} values but {len(names)} checkpoints were {found} ({names})"
        )


class RunLedger:
    """What a run's `rose/` folder records, and every way of knowing a checkpoint's learning rate eta_i.

    It owns `rose/run.json` (the fingerprint every store depends on: `open` refuses, or clears, a folder left by a
    run on other inputs), `rose/checkpoints.json` (each checkpoint's name, learning rate and adapter hash, in step
    order) and `rose/step_lrs.json` (each optimizer step's learning rate, written as the step begins). `resolve`
    and `scoring_learning_rates` give every checkpoint's eta_i, first source first (see the module docstring).
    The selector keeps one per run; only the main process writes.

    Args:
        rose_dir (`str` or `pathlib.Path`):
            The run's `rose/` folder (`<output_dir>/rose`).

    Example:

    ```python
    >>> import tempfile
    >>> from rose_trl.run.ledger import RunLedger
    >>> ledger = RunLedger(tempfile.mkdtemp())
    >>> ledger.step_began(1, 2e-4, write=False)
    >>> ledger.step_began(2, 1e-4, write=False)
    >>> round(ledger.pop_live_learning_rate(), 8)  # at a save: the mean LR of the steps since the last one
    0.00015
    >>> ledger.pop_live_learning_rate() is None  # the next interval starts empty
    True

    ```
    """

    def __init__(self, rose_dir: str | Path):
        self.rose_dir = Path(rose_dir)
        self.run_file = self.rose_dir / "run.json"
        self.checkpoints_file = self.rose_dir / "checkpoints.json"
        self.step_lrs_file = self.rose_dir / "step_lrs.json"
        self._live: list[float] = []  # the LRs of the steps since the last save (this process's warm-up)

    # ---- run.json --------------------------------------------------------------------------------
    def compare(self, fingerprint: dict, overwrite: bool) -> tuple[dict, dict | None, list[str]]:
        """(the fingerprint as run.json holds it, what run.json holds (an older record brought up to date), what
        differs). Reads only: every process of a launch may call it, so that a refusal stops all of them."""
        wanted = json.loads(json.dumps(fingerprint, default=str))
        found = read_json(self.run_file)
        if found is None:
            return wanted, None, []
        try:
            found = upgrade_legacy_batch(found, wanted, self.rose_dir)
        except StoreMismatchError:
            if not overwrite:
                raise  # what to do; with overwrite_stores the folder is cleared
        diff = describe_mismatch(found, wanted, keys=sorted(set(found) | set(wanted)))
        if diff and not overwrite:
            raise StoreMismatchError(
                f"{self.rose_dir} holds the gradients of a run on other inputs:\n  "
                + "\n  ".join(d.replace("store has", "found") for d in diff)
                + (BATCH_HINT if any(d.startswith(EFFECTIVE_BATCH) for d in diff) else "")
                + "\n(use another output_dir, or set overwrite_stores: true to recompute)"
            )
        return wanted, found, diff

    def open(self, fingerprint: dict, overwrite: bool) -> bool:
        """Refuse (or, with `overwrite`, clear: returns True) a rose/ folder left by a run on other inputs,
        before any of its checkpoints or stores could be mixed into this one (`compare`)."""
        wanted, found, diff = self.compare(fingerprint, overwrite)
        cleared = False
        if found is not None:
            if not diff:
                if found != read_json(self.run_file):  # the same run, recorded the older way: now as this version does
                    atomic_write_json(self.run_file, wanted)
                return False
            remove_tree(self.rose_dir)
            cleared = True
        self.rose_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_file, wanted)
        return cleared

    # ---- checkpoints.json ------------------------------------------------------------------------
    def checkpoints(self) -> list[dict]:
        return read_json(self.checkpoints_file, {"checkpoints": []})["checkpoints"]

    def is_recorded(self, name: str) -> bool:
        return any(c["name"] == name for c in self.checkpoints())

    def record_left_out(self, name: str, learning_rate: float | None, identity: str) -> None:
        """Record (main process; every process waits) a checkpoint that selection_checkpoints leaves out: its
        learning rate and weights' identity, no stores, unless it is recorded with its stores already."""
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process and not self.has_stores(name):
            self.record_checkpoint(name, learning_rate, identity, stores=False)
        state.wait_for_everyone()

    def has_stores(self, name: str) -> bool:
        """Whether `name` is recorded with its gradient stores computed (entries before `stores` existed had them)."""
        return any(c["name"] == name and c.get("stores", True) for c in self.checkpoints())

    @stage("callback checks and records")
    def record_checkpoint(self, name: str, learning_rate: float | None, identity: str, stores: bool = True) -> None:
        """`identity`: `checkpoint_identity`. A rate of None (given only by checkpoint_learning_rates) is
        recorded as unknown. `stores`: whether its gradient stores were computed (False: a checkpoint that
        selection_checkpoints leaves out, recorded so that positions and learning rates stay the warm-up's)."""
        checkpoints = self.checkpoints()
        entry = {
            "name": name,
            "learning_rate": None if learning_rate is None else float(learning_rate),
            "checkpoint": identity,
            "stores": bool(stores),
        }
        if entry in checkpoints:
            return  # a re-run: nothing to rewrite
        names = [c["name"] for c in checkpoints]
        if name in names:  # in place: the manifest's order is the checkpoints' (step) order
            checkpoints[names.index(name)] = entry
        else:
            checkpoints.append(entry)
        self.rose_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.checkpoints_file, {"checkpoints": checkpoints})

    def recorded_learning_rate(self, name: str, identity: str) -> float | None:
        """The learning rate checkpoints.json records for `name`, if recorded for the same weights."""
        entry = next((c for c in self.checkpoints() if c["name"] == name), None)
        if entry is None or entry.get("learning_rate") is None:
            return None
        if "checkpoint" in entry and entry["checkpoint"] != identity:
            return None  # recorded for other weights under the same name
        return entry["learning_rate"]

    # ---- step learning rates ---------------------------------------------------------------------
    @stage("callback checks and records")
    def step_began(self, step: int, learning_rate: float, write: bool = True) -> None:
        """Optimizer step `step` applies `learning_rate`: kept for the next save's mean, and (`write`: one
        process) on disk, so that a checkpoint whose extraction was killed can be finished after a resume
        with the same eta_i (the steps before it are not replayed)."""
        self._live.append(float(learning_rate))
        if write:
            lrs = read_json(self.step_lrs_file, {})
            lrs[str(step)] = float(learning_rate)
            atomic_write_json(self.step_lrs_file, lrs)

    def pop_live_learning_rate(self) -> float | None:
        """At a save: the mean LR of the steps since the previous save (None when no step began since),
        taken out: the next call averages the steps that begin after this one."""
        lr = float(np.mean(self._live)) if self._live else None
        self._live = []
        return lr

    def step_learning_rates(self) -> dict[int, float]:
        """rose/step_lrs.json: optimizer step -> the LR it applied."""
        return {int(k): v for k, v in read_json(self.step_lrs_file, {}).items()}

    def logged_mean_lr(self, name: str, step: int) -> float:
        """Mean logged LR of the steps since the previous recorded checkpoint, up to `step`."""
        done = [s for s in (checkpoint_step(c["name"]) for c in self.checkpoints()) if s is not None]
        after = max([s for s in done if s < step], default=0)
        lr = mean_over_steps(self.step_learning_rates(), after, step)
        if lr is None:
            raise ValueError(
                f"{name} was saved but its gradients were never extracted, and the learning rates of steps "
                f"{after + 1}-{step} were not all logged in {self.step_lrs_file}: cannot weight it; start "
                "a new output_dir or set checkpoint_learning_rates"
            )
        return lr

    # ---- a finished warm-up's checkpoint folders ---------------------------------------------------
    def resolve(
        self, checkpoints: list[Path], identity: Callable[[Path], str], explicit: list[float] | None = None
    ) -> list[float | None]:
        """Each checkpoint folder's learning rate, from the first source that has it (sources 2-4 of the module
        docstring); `identity(folder)` gives its `checkpoint_identity`. Raises, naming the checkpoint, what is
        missing and the option, when none has it; with `explicit` (checkpoint_learning_rates, which scoring uses
        instead) an unknown rate is returned as None."""
        names = [c.name for c in checkpoints]
        check_rate_count(explicit, names, "found")
        step_lrs = self.step_learning_rates()
        record = read_warmup_record(checkpoints)
        lrs = []
        previous = 0
        for ckpt, step in zip(checkpoints, record.steps, strict=True):
            lr = None
            if self.is_recorded(ckpt.name):  # only then are its weights needed
                lr = self.recorded_learning_rate(ckpt.name, identity(ckpt))
            if lr is None:
                lr = mean_over_steps(step_lrs, previous, step)
            if lr is None:
                lr = mean_over_steps(record.logged, previous, step)
            lrs.append(lr)
            previous = step
        if None in lrs:
            try:
                recovered, schedule = recover_learning_rates(record)
                logger.info("learning rates of %s from the rebuilt schedule %s", names, schedule.describe())
                lrs = [recovered[i] if lr is None else lr for i, lr in enumerate(lrs)]
            except ScheduleError as e:
                if explicit is None:
                    i = lrs.index(None)
                    previous = record.steps[i - 1] if i else 0
                    logged = len([s for s in record.logged if previous < s <= record.steps[i]])
                    raise ValueError(
                        f"{names[i]}: cannot tell its learning rate (the mean over optimizer steps {previous + 1}-"
                        f"{record.steps[i]}): {self.checkpoints_file} does not record it, trainer_state.json "
                        f"logs the learning rate of {logged} of those {record.steps[i] - previous} steps, and the "
                        f"warm-up's schedule cannot be rebuilt: {e}. Set checkpoint_learning_rates: one learning rate "
                        f"per checkpoint, in step order ({len(names)} here: {', '.join(names)})"
                    ) from None
        return lrs

    # ---- scoring ---------------------------------------------------------------------------------
    def scoring_learning_rates(
        self, explicit: list[float] | None = None, selection: list[int] | None = None
    ) -> tuple[list[str], list[float]]:
        """(recorded checkpoint names, their eta_i): the recorded rates, or `explicit` (checkpoint_learning_rates, one
        per recorded checkpoint, which overrides them); with `selection` (selection_checkpoints: positions among
        the recorded checkpoints) those checkpoints only, each of which must have its stores."""
        names, rates = self._learning_rates(explicit)
        chosen = resolve_checkpoints(selection, len(names))
        entries = self.checkpoints()
        without = [names[i] for i in chosen if not entries[i].get("stores", True)]
        if without:
            raise ValueError(
                f"selection_checkpoints {selection if selection is not None else 'all'}: {', '.join(without)} "
                f"{'has' if len(without) == 1 else 'have'} no gradient stores under {self.rose_dir} (the run that "
                "made them left them out with its selection_checkpoints): select again from the finished warm-up "
                "(recipes/rose_select.py, or the recipe, which reads its checkpoints) to compute them"
            )
        return [names[i] for i in chosen], [rates[i] for i in chosen]

    def _learning_rates(self, explicit: list[float] | None) -> tuple[list[str], list[float]]:
        checkpoints = self.checkpoints()
        names = [c["name"] for c in checkpoints]
        if not checkpoints:
            raise ValueError(f"no warm-up checkpoint was recorded under {self.rose_dir}: did the warm-up save any?")
        if explicit is None:
            unknown = [c["name"] for c in checkpoints if c.get("learning_rate") is None]
            if unknown:
                raise ValueError(
                    f"{self.checkpoints_file} records no learning rate for {unknown}: set "
                    f"checkpoint_learning_rates (one per checkpoint, in step order: {names})"
                )
            return names, [c["learning_rate"] for c in checkpoints]
        check_rate_count(explicit, names, "recorded")
        logger.warning(
            "checkpoint_learning_rates given: %s used for %s, overriding the recorded learning rates",
            list(explicit),
            names,
        )
        return names, [float(lr) for lr in explicit]
