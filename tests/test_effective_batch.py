"""A run keeps its work on another process count: its fingerprint holds the effective batch (per-device batch x
accumulation x processes), not how it is factored; run.json files that recorded the factors are still read; a
resume mid-way on another process count says what differs (tests/test_distributed.py runs 1 -> 2 processes)."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from trl import ModelConfig, SFTConfig

from rose_trl import ROSEConfig
from rose_trl.run.ledger import (
    EFFECTIVE_BATCH,
    RunLedger,
    effective_batch_size,
    resume_differences,
    saved_process_count,
)
from rose_trl.run.pipeline import _run_config, _warn_on_other_process_count, final_training_fingerprint
from rose_trl.stores.store import StoreMismatchError


def sft(tmp_path, batch: int, accumulation: int = 1) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        use_cpu=True,
        bf16=False,
        report_to=[],
    )


def checkpoint(folder, name: str, processes: int):
    """A Trainer checkpoint folder as `processes` processes save it (Trainer._save_rng_state's file names)."""
    path = folder / name
    path.mkdir(parents=True)
    for rank in range(processes):
        torch.save({}, path / ("rng_state.pth" if processes == 1 else f"rng_state_{rank}.pth"))
    return path


def test_the_run_fingerprint_holds_the_effective_batch(tmp_path):
    config = _run_config(ROSEConfig(), ModelConfig(model_name_or_path="m"), sft(tmp_path, 4, 2))
    assert config["effective_batch_size"] == 8 == effective_batch_size(sft(tmp_path, 4, 2))  # one process here
    assert "per_device_train_batch_size" not in config and "gradient_accumulation_steps" not in config
    assert effective_batch_size(sft(tmp_path, 4, 2), num_processes=2) == 16


def test_the_final_model_fingerprint_holds_the_effective_batch(tmp_path):
    tokens = Dataset.from_list([{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}])
    model = ModelConfig(model_name_or_path="m")
    eight = final_training_fingerprint(tokens, sft(tmp_path, 8), model)
    assert final_training_fingerprint(tokens, sft(tmp_path, 4, 2), model) == eight
    assert final_training_fingerprint(tokens, sft(tmp_path, 8, 2), model) != eight
    # rose_final.json written before: the per-device batch and accumulation, still recognized (pipeline.py)
    assert final_training_fingerprint(tokens, sft(tmp_path, 8), model, legacy=True) != eight


def test_saved_process_count(tmp_path):
    assert saved_process_count(checkpoint(tmp_path, "checkpoint-2", 1)) == 1
    assert saved_process_count(checkpoint(tmp_path, "checkpoint-4", 2)) == 2
    (tmp_path / "checkpoint-6").mkdir()
    assert saved_process_count(tmp_path / "checkpoint-6") is None


def test_another_effective_batch_is_refused_naming_both(tmp_path):
    ledger = RunLedger(tmp_path / "rose")
    assert ledger.open({EFFECTIVE_BATCH: 8, "pool_fingerprint": "p"}, overwrite=False) is False
    assert ledger.open({EFFECTIVE_BATCH: 8, "pool_fingerprint": "p"}, overwrite=False) is False  # the same run
    with pytest.raises(StoreMismatchError) as error:
        ledger.open({EFFECTIVE_BATCH: 16, "pool_fingerprint": "p"}, overwrite=False)
    message = str(error.value)
    assert f"{EFFECTIVE_BATCH}: found 8, asked for 16" in message
    assert "per_device_train_batch_size x gradient_accumulation_steps x processes" in message


@pytest.mark.parametrize("processes, now", [(1, 8), (2, 8), (1, 16), (2, 16), (2, 4)])
def test_an_older_run_json_is_read_with_its_process_count(tmp_path, processes, now):
    """rose/run.json as rose_trl wrote it before: the per-device batch and accumulation. The warm-up's checkpoints
    beside it say how many processes ran it: 8 rows a step either way (8 x 1 x 1, or 4 x 1 x 2)."""
    rose = tmp_path / "run" / "rose"
    rose.mkdir(parents=True)
    older = {"pool_fingerprint": "p", "run.per_device_train_batch_size": 8 // processes}
    older["run.gradient_accumulation_steps"] = 1
    (rose / "run.json").write_text(json.dumps(older))
    for name in ("checkpoint-5", "checkpoint-10"):
        checkpoint(tmp_path / "run" / "warmup", name, processes)
    wanted = {"pool_fingerprint": "p", EFFECTIVE_BATCH: now}
    if now == 8:
        assert RunLedger(rose).open(wanted, overwrite=False) is False
        assert json.loads((rose / "run.json").read_text()) == wanted  # brought up to date
    else:
        with pytest.raises(StoreMismatchError, match=rf"{EFFECTIVE_BATCH}: found 8, asked for {now}"):
            RunLedger(rose).open(wanted, overwrite=False)
        assert json.loads((rose / "run.json").read_text()) == older  # left as it was


def test_an_older_run_json_without_checkpoints_says_what_to_do(tmp_path):
    rose = tmp_path / "rose"
    rose.mkdir()
    older = {"run.per_device_train_batch_size": 4, "run.gradient_accumulation_steps": 2}
    (rose / "run.json").write_text(json.dumps(older))
    with pytest.raises(StoreMismatchError) as error:
        RunLedger(rose).open({EFFECTIVE_BATCH: 8}, overwrite=False)
    message = str(error.value)
    assert "per_device_train_batch_size=4 and gradient_accumulation_steps=2, not how many processes" in message
    assert f'replace those two entries of run.json by "{EFFECTIVE_BATCH}": 8 x P' in message
    assert RunLedger(rose).open({EFFECTIVE_BATCH: 8}, overwrite=True) is True  # overwrite_stores: cleared


def test_a_resume_on_another_process_count_says_what_differs(tmp_path, caplog):
    from accelerate import PartialState

    PartialState(cpu=True)  # one process here
    two = checkpoint(tmp_path, "checkpoint-4", 2)
    assert resume_differences(checkpoint(tmp_path, "checkpoint-2", 1), sft(tmp_path, 8), "the warm-up") is None
    warning = resume_differences(two, sft(tmp_path, 8), "the warm-up")
    assert warning.startswith("the warm-up resumes from checkpoint-4, saved by 2 process(es), on 1: with the same ")
    for differs in ("effective batch (8 rows", "dealt to 1 process(es)", "padded with repeated rows", "not restored"):
        assert differs in warning
    with caplog.at_level(logging.WARNING):
        _warn_on_other_process_count(str(two), sft(tmp_path, 8), "the warm-up")
        _warn_on_other_process_count(None, sft(tmp_path, 8), "the warm-up")
    assert [r.getMessage() for r in caplog.records if "resumes from" in r.getMessage()] == [f"[RANK 0] {warning}"]
