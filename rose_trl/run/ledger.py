"""The run ledger: what a run's `rose/` folder records, and every way of knowing a checkpoint's learning rate.

    rose/run.json           what every gradient store under rose/ depends on (refused, or cleared, when it changes)
    rose/checkpoints.json   each checkpoint in step order: name, learning rate eta_i, name@adapter-hash
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
from rose_trl.utils.files import atomic_write_json, checkpoint_step, read_json, remove_tree


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


def checkpoint_identity(name: str, model) -> str:
    """`name@adapter-hash`: what the stores and checkpoints.json record, so that nothing recorded for other
    weights under the same name is reused."""
    return f"{name}@{adapter_fingerprint(model)}"


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
    def open(self, fingerprint: dict, overwrite: bool) -> bool:
        """Refuse (or, with `overwrite`, clear: returns True) a rose/ folder left by a run on other inputs,
        before any of its checkpoints or stores could be mixed into this one."""
        wanted = json.loads(json.dumps(fingerprint, default=str))
        found = read_json(self.run_file)
        cleared = False
        if found is not None:
            diff = describe_mismatch(found, wanted, keys=sorted(set(found) | set(wanted)))
            if not diff:
                return False
            if not overwrite:
                raise StoreMismatchError(
                    f"{self.rose_dir} holds the gradients of a run on other inputs:\n  "
                    + "\n  ".join(d.replace("store has", "found") for d in diff)
                    + "\n(use another output_dir, or set overwrite_stores: true to recompute)"
                )
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

    def record_checkpoint(self, name: str, learning_rate: float | None, identity: str) -> None:
        """`identity`: `checkpoint_identity`. A rate of None (given only by checkpoint_learning_rates) is
        recorded as unknown."""
        checkpoints = self.checkpoints()
        entry = {
            "name": name,
            "learning_rate": None if learning_rate is None else float(learning_rate),
            "checkpoint": identity,
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
    def scoring_learning_rates(self, explicit: list[float] | None = None) -> tuple[list[str], list[float]]:
        """(recorded checkpoint names, their eta_i): the recorded rates, or `explicit` (checkpoint_learning_rates,
        which overrides them)."""
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
