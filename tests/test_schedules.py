"""Learning rates of a warm-up run without ROSE, recovered offline (rose_trl/checkpoints/schedules.py, offline.py):
they equal what ROSECallback records live, for the Trainer's four standard schedules with and without warm-up
steps, from checkpoints whose log history does not cover an epoch. What cannot be recovered stops the
run before any gradient pass."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from trl import SFTConfig, SFTTrainer

from rose_trl.checkpoints.schedules import (
    ScheduleError,
    read_training_args,
    read_warmup_record,
    recover_learning_rates,
)
from rose_trl.config import ROSEConfig
from rose_trl.models.tiny import build_tiny_llama
from rose_trl.run.callback import ROSECallback
from rose_trl.run.offline import find_checkpoints, resolve_learning_rates, select_from_checkpoints, warmup_model
from rose_trl.run.pipeline import sft_training_dataset
from rose_trl.run.selector import ROSESelector
from tests.helpers import counting_gradient_passes


LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
CONFIG = dict(projection_dim=64, selection_fraction=0.25)
# 8 rows, batch 2: 4 optimizer steps an epoch, 3 epochs; checkpoints at steps 4, 8, 12. Warm-up of 5 steps
# reaches into the second epoch; a log every 5 steps never covers an epoch.
CASES = [(name, warmup, 5) for name in ("linear", "cosine", "constant", "constant_with_warmup") for warmup in (0, 5)]
CASES += [("linear", 0.3, 500), ("cosine", 5, 1)]  # a warm-up ratio with nothing logged; every step logged


@pytest.fixture(scope="module")
def small(planted):
    pool, validation, tokenizer, _ = planted
    return pool.select(range(8)), validation.select([0, 4]), tokenizer  # one pair of each subtask


def base_model(tokenizer):
    return build_tiny_llama(tokenizer, hidden=32, layers=1)


@pytest.fixture(scope="module")
def warm_up(small, tmp_path_factory):
    """(schedule, warmup_steps, logging_steps) -> folder of a 3-epoch warm-up with ROSECallback (rose/ and
    warmup/checkpoint-*), run once per module."""
    pool, validation, tokenizer = small
    runs = {}

    def run(name, warmup, logging_steps):
        if (name, warmup, logging_steps) not in runs:
            out = tmp_path_factory.mktemp(f"{name}-{warmup}-{logging_steps}")
            args = SFTConfig(
                output_dir=str(out / "warmup"),
                num_train_epochs=3,
                per_device_train_batch_size=2,
                learning_rate=1e-3,
                lr_scheduler_type=name,
                warmup_steps=warmup,
                save_strategy="epoch",
                logging_steps=logging_steps,
                use_cpu=True,
                bf16=False,
                report_to=[],
                max_length=64,
                disable_tqdm=True,
                seed=0,
            )
            callback = ROSECallback(
                pool, validation, tokenizer, ROSEConfig(**CONFIG), output_dir=str(out), max_length=64
            )
            SFTTrainer(
                base_model(tokenizer),
                args=args,
                train_dataset=sft_training_dataset(pool, tokenizer, 64, "warm-up"),
                processing_class=tokenizer,
                peft_config=LORA,
                callbacks=[callback],
            ).train()
            runs[name, warmup, logging_steps] = out
        return runs[name, warmup, logging_steps]

    return run


def recorded(out):
    """The learning rates ROSECallback recorded live, checkpoint by checkpoint."""
    return [c["learning_rate"] for c in json.loads((out / "rose/checkpoints.json").read_text())["checkpoints"]]


def selector_for(small, out, **config):
    pool, validation, tokenizer = small
    return ROSESelector(
        pool,
        validation,
        tokenizer,
        ROSEConfig(**{**CONFIG, **config}),
        out,
        max_length=64,
        use_cpu=True,
        progress=False,
    )


def offline_rates(small, warmup_dir, out, **config):
    checkpoints = find_checkpoints(warmup_dir)
    model = warmup_model(checkpoints[0], base_model(small[2]))
    return resolve_learning_rates(checkpoints, model, selector_for(small, out, **config))


def copy_warmup(run, tmp_path, drop=()):
    """The run's warm-up checkpoints alone (no rose/), without the files named in `drop`."""
    shutil.copytree(run / "warmup", tmp_path / "warmup")
    for ckpt in find_checkpoints(tmp_path / "warmup"):
        for name in drop:
            (ckpt / name).unlink()
    return tmp_path / "warmup"


@pytest.mark.parametrize("name,warmup,logging_steps", CASES)
def test_offline_rates_equal_the_callbacks(small, warm_up, tmp_path, name, warmup, logging_steps):
    run = warm_up(name, warmup, logging_steps)
    live = recorded(run)
    varies = name in ("linear", "cosine") or (name == "constant_with_warmup" and warmup > 0)
    assert len(live) == 3 and (len(set(live)) > 1) == varies
    offline = offline_rates(small, run / "warmup", tmp_path)  # another output_dir: nothing recorded there
    np.testing.assert_allclose(offline, live, rtol=1e-9, atol=0)


def test_fit_without_training_args(small, warm_up, tmp_path):
    """training_args.bin unreadable: the standard schedules x every warm-up length are fitted to the
    scheduler states; here only linear with 5 warm-up steps fits."""
    run = warm_up("linear", 5, 5)
    record = read_warmup_record(find_checkpoints(copy_warmup(run, tmp_path, drop=["training_args.bin"])))
    assert record.args is None
    rates, schedule = recover_learning_rates(record)
    assert (schedule.name, schedule.warmup_steps) == ("linear", 5)
    np.testing.assert_allclose(rates, recorded(run), rtol=1e-9, atol=0)


def test_fit_that_several_schedules_explain_is_refused(small, warm_up, tmp_path):
    # A constant LR at every observed step: constant_with_warmup of 0 to 4 steps fits too, with other means.
    run = warm_up("constant", 0, 5)
    record = read_warmup_record(find_checkpoints(copy_warmup(run, tmp_path, drop=["training_args.bin"])))
    with pytest.raises(ScheduleError, match="reproduce every observation but give different means"):
        recover_learning_rates(record)


def test_schedule_that_misses_an_observation_is_refused(small, warm_up, tmp_path):
    run = warm_up("linear", 5, 5)
    warmup_dir = copy_warmup(run, tmp_path)
    path = warmup_dir / "checkpoint-8" / "scheduler.pt"
    state = torch.load(path, weights_only=True)
    state["_last_lr"] = [lr * 1.001 for lr in state["_last_lr"]]
    torch.save(state, path)
    with pytest.raises(ScheduleError, match="checkpoint-8/scheduler.pt gives"):
        recover_learning_rates(read_warmup_record(find_checkpoints(warmup_dir)))


def test_unknown_rate_stops_before_any_gradient_pass(small, warm_up, tmp_path):
    run = warm_up("linear", 0.3, 500)  # nothing logged
    warmup_dir = copy_warmup(run, tmp_path, drop=["scheduler.pt", "training_args.bin"])
    selector = selector_for(small, tmp_path / "out")
    with counting_gradient_passes() as counter, pytest.raises(ValueError) as error:
        select_from_checkpoints(warmup_dir, base_model(small[2]), selector)
    message = str(error.value)
    for part in (
        "checkpoint-4",
        "steps 1-4",
        "logs the learning rate of 0 of those 4 steps",
        "scheduler.pt (missing)",
        "training_args.bin (missing)",
        "checkpoint_learning_rates",
        "3 here: checkpoint-4, checkpoint-8, checkpoint-12",
    ):
        assert part in message, (part, message)
    assert counter["passes"] == 0 and not (tmp_path / "out/rose/train").exists()


def test_checkpoint_learning_rates_override_and_are_checked(small, warm_up, tmp_path, caplog):
    run = warm_up("linear", 0.3, 500)
    warmup_dir = copy_warmup(run, tmp_path, drop=["scheduler.pt", "training_args.bin"])
    with pytest.raises(ValueError, match=r"has 2 values but 3 checkpoints were found \(\['checkpoint-4'"):
        select_from_checkpoints(
            warmup_dir, base_model(small[2]), selector_for(small, tmp_path / "a", checkpoint_learning_rates=[1.0, 2.0])
        )
    with caplog.at_level(logging.WARNING):
        sel = select_from_checkpoints(
            warmup_dir,
            base_model(small[2]),
            selector_for(small, tmp_path / "b", checkpoint_learning_rates=[3.0, 2.0, 1.0]),
        )
    assert "overriding the recorded learning rates" in caplog.text
    config = json.loads((sel / "config.json").read_text())
    assert [c["learning_rate"] for c in config["checkpoints"]] == [3.0, 2.0, 1.0]
    # The given rates are not recorded as if they had been measured: a run without them stops again.
    manifest = json.loads((tmp_path / "b/rose/checkpoints.json").read_text())["checkpoints"]
    assert [c["learning_rate"] for c in manifest] == [None, None, None]
    with pytest.raises(ValueError, match="records no learning rate for"):
        selector_for(small, tmp_path / "b").finalize()


def test_recorded_rates_are_reused_only_for_the_same_weights(small, warm_up, tmp_path):
    run = warm_up("cosine", 5, 5)
    out = tmp_path / "run"
    shutil.copytree(run, out)
    warmup_dir = out / "warmup"
    for ckpt in find_checkpoints(warmup_dir):  # nothing left to recover the schedule from
        (ckpt / "scheduler.pt").unlink()
        (ckpt / "training_args.bin").unlink()
        (ckpt / "trainer_state.json").write_text(json.dumps({"max_steps": 12, "log_history": []}))
    (out / "rose/step_lrs.json").unlink()
    assert offline_rates(small, warmup_dir, out) == recorded(run)  # read from rose/checkpoints.json
    weights = warmup_dir / "checkpoint-8/adapter_model.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match="checkpoint-8: cannot tell its learning rate"):
        offline_rates(small, warmup_dir, out)  # recorded for other weights: not reused


class _Planted:
    """Unpickling this would run `touch` on the marker path."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _Args:
    """Stands for TrainingArguments: a plain object whose state holds a planted payload."""

    def __init__(self, marker):
        self.lr_scheduler_type, self.warmup_steps, self.payload = "linear", 0, _Planted(marker)


def test_planted_payloads_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save(_Args(marker), tmp_path / "args.bin")
    fields = read_training_args(tmp_path / "args.bin")
    # the planted call reads as inert data (like an enum member: its argument), never as a call
    assert fields["lr_scheduler_type"] == "linear" and fields["payload"] == f"touch {marker}"
    torch.save(_Planted(marker), tmp_path / "top.bin")
    with pytest.raises(ScheduleError, match="does not hold a TrainingArguments object"):
        read_training_args(tmp_path / "top.bin")
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    torch.save(_Planted(marker), ckpt / "scheduler.pt")
    torch.save(_Planted(marker), ckpt / "training_args.bin")
    record = read_warmup_record([ckpt])
    assert not record.schedulers and record.args is None
    assert any("scheduler.pt (UnpicklingError" in u for u in record.unreadable), record.unreadable
    assert not marker.exists()
