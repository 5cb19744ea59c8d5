"""`rose-trl plan` and `rose-trl check-pairs`: the plan writes nothing, says what the run does (its Trainer's steps and
checkpoints, its bytes), marks exactly the loss tokens, and every command answers --help."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rose_trl.cli import main
from rose_trl.run.plan import PLAN_KEYS


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from rose_trl.models.tiny import write_tiny_assets

    out = tmp_path_factory.mktemp("plan_assets")
    write_tiny_assets(out, n_pool=120)
    return out


def recipe_args(assets: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(RECIPE),
        "--model_name_or_path",
        str(assets / "model"),
        "--pool_dataset",
        str(assets / "pool.jsonl"),
        "--validation_dataset",
        str(assets / "validation.jsonl"),
        "--output_dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def planned(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "run"
    from rose_trl.run.plan import make_plan
    from rose_trl.run.plan_cli import parse_recipe

    return out, make_plan(*parse_recipe(str(RECIPE), recipe_args(assets, out)[2:]))


def test_plan_writes_nothing_and_prints_every_documented_key(assets, tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    assert main(["plan", "--json", *recipe_args(assets, out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists() and not out.parent.exists()  # not even the parent folders
    assert list(plan) == list(PLAN_KEYS)
    assert plan["pool"]["rows"] == 120 and plan["validation"]["pairs"] == 8
    assert plan["disk"]["destinations"]["output_dir"]["nearest_existing"] == str(tmp_path)
    assert main(["plan", *recipe_args(assets, out, "--final_training", "false")]) == 0
    text = capsys.readouterr().out
    assert "nothing was written" in text and "final training" not in text and not out.exists()
    assert "[[" in text and "]]" in text  # the loss tokens marked


def test_plan_counts_the_trainers_steps_and_checkpoints(planned):
    """The tiny recipe: 10% of 120 rows = 12 warm-up rows, batches of 8 -> 2 steps an epoch, 4 epochs."""
    _, plan = planned
    w = plan["warmup"]
    assert (w["rows"], w["steps_per_epoch"], w["optimizer_steps"]) == (12, 2, 8)
    assert w["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    f = plan["final_training"]
    assert f["rows"] == 6 and f["optimizer_steps"] == 4 and f["checkpoints"] == ["checkpoint-4"]
    from rose_trl.stores.store import store_bytes

    s = plan["store_bytes"]
    assert s["pool_per_checkpoint"] == store_bytes(120, 8192, "float16")
    assert s["validation_per_checkpoint"] == store_bytes(8, 8192, "float16") and s["checkpoints"] == 4


def test_schedule_follows_accumulation_processes_and_max_steps():
    from trl import SFTConfig

    from rose_trl.run.plan import schedule

    args = SFTConfig(
        output_dir="unused",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        num_train_epochs=2,
        save_strategy="epoch",
    )
    # 25 rows: 13 batches; 2 processes take 7 each; an optimizer step every 3 and one for the remainder: 3 a epoch
    plan = schedule(25, args, processes=2)
    assert (plan["micro_batches_per_epoch"], plan["steps_per_epoch"], plan["optimizer_steps"]) == (7, 3, 6)
    assert plan["effective_batch"] == 12 and plan["checkpoints"] == ["checkpoint-3", "checkpoint-6"]
    steps = dataclasses.replace(args, save_strategy="steps", save_steps=4, max_steps=10)
    assert schedule(25, steps)["checkpoints"] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]


def test_the_marked_tokens_are_exactly_the_label_tokens(planned, assets):
    """The pool row's loss mask is the labels the warm-up trains on; the pair's is TRL's completion mask of the
    run's DPO trainer."""
    from transformers import AutoTokenizer

    from rose_trl.data import load_pool, load_preferences
    from rose_trl.models.tiny import build_tiny_llama
    from rose_trl.run.pipeline import sft_training_dataset
    from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config

    out, plan = planned
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    pool = load_pool(str(assets / "pool.jsonl"))
    labels = sft_training_dataset(pool.select([0]), tokenizer, 256, "pool")[0]
    row = plan["examples"]["pool_row"]
    assert row["token_ids"] == labels["input_ids"]
    assert row["loss_mask"] == [int(t != -100) for t in labels["labels"]]
    assert "".join(s["text"] for s in row["segments"]) == tokenizer.decode(labels["input_ids"])
    assert sum(len(tokenizer(s["text"], add_special_tokens=False)["input_ids"]) > 0 for s in row["segments"]) >= 2

    from peft import LoraConfig, get_peft_model

    validation = load_preferences(str(assets / "validation.jsonl"))
    model = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(str(out.parent / "dpo"), max_length=256, use_cpu=True),
        validation.select_columns(["prompt", "chosen", "rejected"]),
        tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    pair = plan["examples"]["preference_pair"]
    for side, r in (("chosen", 0), ("rejected", 1)):
        keep = batch["attention_mask"][r].bool()
        assert pair[side]["token_ids"] == batch["input_ids"][r][keep].tolist()
        assert pair[side]["loss_mask"] == batch["completion_mask"][r][keep].tolist()
        assert 0 < pair[side]["loss_tokens"] < pair[side]["tokens"]


def test_checkpoint_file_sizes_match_a_trainer_checkpoint(tmp_path):
    """checkpoints/sizes.py against what SFTTrainer writes for the tiny model, file by file."""
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from rose_trl.checkpoints import sizes
    from rose_trl.models.final_model import meta_model
    from rose_trl.models.tiny import build_tiny_llama, write_tiny_assets

    write_tiny_assets(tmp_path / "a", n_pool=20)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a" / "model")
    model = build_tiny_llama(tokenizer)
    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": "tell me about orbit .", "completion": " galaxy star moon ."}] * 8)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        learning_rate=1e-3,
    )
    SFTTrainer(model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora).train()
    real = {p.name: p.stat().st_size for p in (tmp_path / "out" / "checkpoint-2").iterdir()}
    tensors = sizes.trained_tensors(meta_model(model.config), lora.target_modules, 8)
    saved = sizes.model_files(tensors, torch.float32, lora.to_dict(), sizes.tokenizer_files(tokenizer), args)
    planned = sizes.checkpoint_files(saved, tensors, torch.float32, args, 2, 2).files
    assert set(planned) == set(real)
    for name in ("adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert planned[name] == real[name], name
    for name in planned:  # the rest within 10% each (model card, trainer state and archives' overheads)
        assert abs(planned[name] - real[name]) <= 0.1 * real[name] + 64, (name, planned[name], real[name])
    assert abs(sum(planned.values()) / sum(real.values()) - 1) < 0.02


def test_measure_times_every_stage_in_a_temporary_folder(assets, tmp_path):
    from rose_trl.run.plan import make_plan
    from rose_trl.run.plan_cli import parse_recipe
    from rose_trl.run.timing import STAGES

    out = tmp_path / "run"
    plan = make_plan(*parse_recipe(str(RECIPE), recipe_args(assets, out)[2:]), measure=True)
    t = plan["time"]
    assert list(t["stages"]) == list(STAGES) and all(v > 0 for v in t["stages"].values())
    assert t["total"] == pytest.approx(sum(t["stages"].values()))
    assert any("pool gradient pass" in m for m in t["measured"]) and not out.exists()


def test_a_pass_is_timed_by_its_fastest_repeat():
    """One slow call (another process's burst, the thread pool's wake-up) does not set the pass's time."""
    import time

    from rose_trl.run.timing import fastest

    delays = iter([0.3, 0.02, 0.15])
    seconds = fastest(lambda: time.sleep(next(delays)), repeats=3)
    assert 0.02 <= seconds < 0.15
    calls = []
    assert fastest(lambda: calls.append(1), repeats=0) >= 0 and len(calls) == 1  # at least one call
    calls = []  # a long pass is not timed again: once `enough` seconds are spent, the repeats stop
    fastest(lambda: (calls.append(1), time.sleep(0.05)), repeats=3, enough=0.04)
    assert len(calls) == 1


def test_pass_rate_fits_tokens_and_rows():
    from rose_trl.run.timing import pass_rate

    a, b = pass_rate([(400, 4, 4.0 + 0.2), (200, 4, 2.0 + 0.2), (100, 1, 1.0 + 0.05)])  # 0.01 s a token, 0.05 a row
    assert a == pytest.approx(0.01) and b == pytest.approx(0.05)
    assert pass_rate([(100, 4, 1.0)]) == (pytest.approx(0.01), 0.0)  # one pass: proportional to its tokens
    a, b = pass_rate([(100, 4, 1.0), (200, 4, 1.0)])  # more tokens, not slower: no negative rate
    assert a >= 0 and b >= 0


@pytest.mark.parametrize("command", ["plan", "check-pairs"])
def test_commands_answer_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "--json" in text and "recipe" in text
    assert main([command, "--recipe-help"]) == 0
    assert "--output_dir" in capsys.readouterr().out


def test_a_bad_recipe_option_is_one_line(assets, tmp_path, capsys):
    code = main(["plan", *recipe_args(assets, tmp_path / "run", "--selection_fraction", "2")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("rose-trl plan: error:") and "selection_fraction" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["explain", "--no-such-option"])  # other commands keep refusing options they do not have


def test_check_pairs_reports_the_agreement_before_any_warm_up(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["check-pairs", "--json", *recipe_args(assets, out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert set(result["validation_agreement"]) == {"polite", "safe"}
    for s in result["validation_agreement"].values():
        assert s["pairs"] == 4 and -1 <= s["agreement"] <= 1 and s["agrees"] in (True, False)
    assert result["validation_agreement_across"]["merged"]["pairs"] == 8
    assert any("Adam" in c for c in result["cannot_tell"])


@pytest.mark.slow
def test_plan_bytes_match_a_real_tiny_run(tmp_path):
    """The tiny recipe as a user runs it: the plan's bytes within 10% of what the run writes, quantity by quantity,
    and the Trainer's checkpoints the ones the plan names."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "speed"))
    from plan_accuracy import apparent_bytes

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", "outputs/tiny"], cwd=tmp_path, env=env, check=True
    )
    args = ["--config", str(RECIPE)]
    done = subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "plan", "--json", *args], cwd=tmp_path, env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    plan = json.loads(done.stdout)
    run = tmp_path / "outputs" / "tiny" / "run"
    assert not run.exists()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    subprocess.run(
        [*launch, str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "recipes" / "rose_sft.py"), *args],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    assert sorted(p.name for p in (run / "warmup").glob("checkpoint-*")) == sorted(plan["warmup"]["checkpoints"])
    assert sorted(p.name for p in (run / "final").glob("checkpoint-*")) == plan["final_training"]["checkpoints"]
    for planned, folder in (
        (plan["store_bytes"]["total"], run / "rose"),
        (plan["warmup_checkpoint_bytes"]["total"], run / "warmup"),
        (plan["final_model_bytes"]["total"], run / "final"),
        (plan["total_bytes"], run),
    ):
        real = apparent_bytes(folder)
        assert abs(planned / real - 1) < 0.10, (folder.name, planned, real)
