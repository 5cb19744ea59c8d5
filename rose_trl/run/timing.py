"""`rose-trl plan --measure`: a few real passes of the run, timed on this machine, and each stage's time from them.

Every pass is the run's own code on the run's own rows, in a temporary folder (removed after): the model loaded as
the run loads it; the warm-up's SFTTrainer for its first `TIMED_WARMUP_STEPS` optimizer steps (the run's first
rows, in its order) and one checkpoint save; pool gradient passes on the run's first (longest) batch once cold,
then on it, a middle batch and the last, each the fastest of up to `TIMING_REPEATS` passes, with the Adam state of
those steps (`Featurizer`, the projection of the run); the validation passes of the first pairs through
`ROSEDPOTrainer` (its reference pass and its gradient pass). Each stage is then counted from what the plan says
the run does:
- setup: this process's start to the tokenized pool (imports, data, tokenizer), the pool tokenized again (the
  run tokenizes it for the selector), the model's load and the warm-up Trainer's construction;
- warm-up training: its optimizer steps at the measured rate (the median step after the first; the first step's
  extra once) and its saves;
- pool gradients: per checkpoint, every planned batch at t = a x padded tokens + b x rows (a and b fitted to the
  measured batches: the longest, a middle one, the last), the projection's first-use cost once;
- validation gradients: the DPO trainer's construction and the reference passes once, the gradient passes per
  checkpoint;
- selection: the scoring's read of every store, at the rate a store is read here (`SCORE_BYTES_PER_SECOND`), and a
  fixed second for the selection's files;
- final training: the model's load, the Trainer's construction, its steps at the warm-up's rate per row, its saves.
What it cannot see: other processes' load on this machine (timings are its state now), and a final model other than
the warm-up's (its steps are counted at the warm-up model's rate; said in the output).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import TrainerCallback


# Scoring reads each checkpoint's pool store once (scores.py): float16 rows converted and multiplied at about this
# rate on the project's 2-core machine (benchmarks/speed/scoring.py: 1 GB of store in about 2.5 s warm).
SCORE_BYTES_PER_SECOND = 400e6
SELECTION_FILES_SECONDS = 1.0
# Each pool pass is timed up to this many times and the fastest kept: a single timing of a short pass carries the
# thread pool's wake-up and any other process's burst, and the plan multiplies it by every pass of the run. Repeats
# stop once a pass has taken REPEAT_SECONDS in all: a pass that long is not moved much by a burst, and timing it
# again would cost the plan more than the run's own passes of a small pool (as timeit's autorange does).
TIMING_REPEATS = 3
REPEAT_SECONDS = 2.0
# Warm-up steps timed: the first (it pays the first use of the optimizer and the data loader) and the median of the
# rest.
TIMED_WARMUP_STEPS = 4
STAGES = ("setup", "warm-up training", "pool gradients", "validation gradients", "selection", "final training")


class _StepClock(TrainerCallback):
    """Wall time of each optimizer step (its accumulation included)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def fastest(function, repeats: int = TIMING_REPEATS, enough: float = REPEAT_SECONDS) -> float:
    """The shortest wall time of up to `repeats` calls of `function()` (at least one; no more once they have taken
    `enough` seconds in all), in seconds: the pass's own cost, the least disturbed by other work on the machine."""
    times = []
    while not times or (len(times) < repeats and sum(times) < enough):
        t = time.perf_counter()
        function()
        times.append(time.perf_counter() - t)
    return min(times)


def _timed(function, *args, **kwargs):
    t = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - t


def pass_rate(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(seconds a padded token, seconds a row) of t = a x tokens + b x rows, least squares through the measured
    passes (tokens, rows, seconds), both rates >= 0: when the two-rate fit gives a negative one, the better of the
    one-rate fits (tokens alone, rows alone)."""
    design = np.asarray([[t, r] for t, r, _ in points], dtype=np.float64)
    seconds = np.asarray([s for _, _, s in points], dtype=np.float64)
    if len(points) >= 2 and np.linalg.matrix_rank(design) == 2:
        (a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        if a >= 0 and b >= 0:
            return float(a), float(b)
    fits = []
    for column in (0, 1):
        x = design[:, column]
        rate = float(x @ seconds / max(x @ x, 1e-12))
        fits.append((float(((rate * x - seconds) ** 2).sum()), column, rate))
    _, column, rate = min(fits)
    return (rate, 0.0) if column == 0 else (0.0, rate)


def measure_run(rose, sft, model_args, plan, pool, validation, tokens, tokenizer, warm_rows) -> dict:
    """Time the run's passes (module docstring) -> {"device", "stages": {stage: s}, "total", "measured": [...]}."""
    from trl import SFTTrainer, get_peft_config

    from rose_trl.gradients.capture import AdamState, num_trainable_parameters, trainable_parameters
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.models.final_model import apply_chat_template_path
    from rose_trl.models.source import load_model_and_tokenizer
    from rose_trl.run.pipeline import with_labels
    from rose_trl.stores.extraction import plan_batches
    from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config

    measured = []
    prepared = plan.pop("_prepared")  # seconds from this process's start to the tokenized pool, and tokenizing
    startup = prepared["ready"] - psutil.Process().create_time()
    gradient, warm, passes = plan["warmup"] is not None, plan["warmup"], plan["gradient_passes"]
    with tempfile.TemporaryDirectory(prefix="rose-plan-measure-") as tmp:
        tmp = Path(tmp)
        (model, _), t_load = _timed(load_model_and_tokenizer, model_args, sft.trust_remote_code, rose.gguf_file)
        model, _, _ = apply_chat_template_path(model, tokenizer, None)
        measured.append(f"model load {t_load:.1f} s")
        device = "cpu" if sft.use_cpu or not torch.cuda.is_available() else "cuda"
        steps = min(TIMED_WARMUP_STEPS, warm["optimizer_steps"]) if gradient else TIMED_WARMUP_STEPS
        clock = _StepClock()
        args = dataclasses.replace(
            sft,
            output_dir=str(tmp / "warmup"),
            max_steps=steps,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            push_to_hub=False,
            chat_template_path=None,
        )
        rows = warm_rows if gradient else list(range(len(pool)))
        train_rows = with_labels(tokens.select(rows), "warm-up pool")
        trainer, t_init = _timed(
            SFTTrainer,
            model,
            args=args,
            train_dataset=train_rows,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[clock],
        )
        trainer.train()
        step = float(np.median(clock.times[1:])) if len(clock.times) > 1 else clock.times[0]
        first_extra = max(clock.times[0] - step, 0.0)
        rows_a_step = sft.per_device_train_batch_size * sft.gradient_accumulation_steps
        measured.append(
            f"{len(clock.times)} warm-up optimizer step(s) of {rows_a_step} rows: "
            + ", ".join(f"{t:.2f} s" for t in clock.times)
        )
        _, t_save = _timed(trainer._save_checkpoint, trainer.model, None)
        measured.append(f"a checkpoint save {t_save:.2f} s")
        stages = {"setup": startup + prepared["tokenize"] + t_load + t_init}
        if gradient:
            stages["warm-up training"] = (
                first_extra + warm["optimizer_steps"] * step + len(warm["checkpoints"]) * t_save
            )
            model = trainer.model
            adam = AdamState.from_optimizer(trainer.optimizer, trainable_parameters(model))
            projector = build_projector(
                rose.projection_type,
                num_trainable_parameters(model),
                rose.projection_dim,
                rose.projection_seed,
                device=device,
            )
            featurizer = Featurizer(projector)
            lengths = np.asarray([len(ids) for ids in tokens["input_ids"]])
            p = passes["pool"]
            batches = plan_batches(lengths, np.arange(len(pool)), p["rows_a_pass"], p["tokens_a_pass"])
            mine = batches[:: plan["recipe"]["processes"]]  # the first process's share
            pool_stage, points = _pool_passes(model, tokens, featurizer, adam, tokenizer, batches, lengths, device)
            a, b = pass_rate(points)
            per_checkpoint = sum(a * len(r) * lengths[r].max() + b * len(r) for r in mine)
            stages["pool gradients"] = pool_stage["first_use"] + passes["checkpoints"] * per_checkpoint
            measured += [f"pool gradient pass of {r} rows / {t} padded tokens: {s:.2f} s" for t, r, s in points] + [
                f"the projection's first use {pool_stage['first_use']:.2f} s"
            ]
            v = passes["validation"]
            if v["loss"] == "dpo":
                subset = validation.select(range(min(len(validation), 2 * v["pairs_a_pass"])))
                columns = [c for c in ("prompt", "chosen", "rejected") if c in subset.column_names]
                config = validation_dpo_config(
                    str(tmp / "dpo"),
                    beta=rose.validation_beta,
                    batch_size=v["pairs_a_pass"],
                    max_length=sft.max_length,
                    use_cpu=sft.use_cpu,
                    loss_type=rose.validation_loss_type,
                    loss_weights=rose.validation_loss_weights,
                    label_smoothing=rose.validation_label_smoothing,
                )
                dpo, t_dpo = _timed(ROSEDPOTrainer, model, config, subset.select_columns(columns), tokenizer)
                dpo.head_tokens = v.get("head_tokens")
                _, t_ref = _timed(dpo.reference_logps)
                _, t_val = _timed(dpo.pair_gradients, featurizer)
                measured_passes = math.ceil(len(subset) / v["pairs_a_pass"])
                measured.append(
                    f"validation: DPO trainer {t_dpo:.2f} s, reference {t_ref:.2f} s and gradients {t_val:.2f} s for "
                    f"{len(subset)} pairs in {measured_passes} pass(es)"
                )
                stages["validation gradients"] = (
                    t_dpo
                    + v["passes"] * t_ref / measured_passes
                    + passes["checkpoints"] * v["passes"] * t_val / measured_passes
                )
            else:  # LESS: SFT rows of the prompt and chosen answer, at the pool passes' rate
                stages["validation gradients"] = (
                    passes["checkpoints"] * a * plan["validation"]["pairs"] * (plan["validation"]["longest"] or 1)
                )
            store = plan["store_bytes"]["pool_per_checkpoint"] + plan["store_bytes"]["validation_per_checkpoint"]
            stages["selection"] = SELECTION_FILES_SECONDS + passes["checkpoints"] * store / SCORE_BYTES_PER_SECOND
        final = plan["final_training"]
        if final:
            per_row = step / max(rows_a_step, 1)
            f_rows = final["per_device_batch"] * final["gradient_accumulation_steps"]
            stages["final training"] = (
                t_load + t_init + first_extra + final["optimizer_steps"] * per_row * f_rows
                + (len(final["checkpoints"]) + 1) * t_save
            )  # fmt: skip
    return {
        "device": device,
        "stages": {k: float(stages[k]) for k in STAGES if k in stages},
        "total": float(sum(stages.values())),
        "measured": measured,
    }


def _pool_passes(model, tokens, featurizer, adam, tokenizer, batches, lengths, device) -> tuple[dict, list]:
    """The first (longest) batch once cold (it pays the projection's first use), then it, a middle batch and the
    last, each the fastest of up to `TIMING_REPEATS` passes:
    ({"first_use": s}, [(padded tokens, rows, seconds), ...])."""
    from rose_trl.data.sft import collate
    from rose_trl.utils.modeling import eval_mode

    rows = tokens.select_columns(["input_ids", "completion_mask"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def one(batch_rows, repeats=TIMING_REPEATS) -> float:
        batch = {k: v.to(device) for k, v in collate([rows[int(i)] for i in batch_rows], pad).items()}
        return fastest(lambda: featurizer(model, batch, adam), repeats)

    def point(batch_rows) -> tuple[int, int, float]:
        return int(len(batch_rows) * lengths[batch_rows].max()), len(batch_rows), one(batch_rows)

    with eval_mode(model):
        cold = one(batches[0], repeats=1)
        points = [point(batches[0])]
        if len(batches) > 2:  # a middle batch and the last (the shortest rows, or the fewest)
            points += [point(batches[len(batches) // 2]), point(batches[-1])]
    return {"first_use": max(cold - points[0][2], 0.0)}, points
