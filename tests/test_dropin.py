"""The drop-in tried as a user would: TRL's own scripts/sft.py with the callback (recipes/trl_sft_with_rose.py)."""

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import trl


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "recipes" / "trl_sft_with_rose.py"
TRL_SCRIPT = Path(trl.__file__).parent / "scripts" / "sft.py"


def changed_lines() -> tuple[list[str], list[str]]:
    diff = list(
        difflib.unified_diff(TRL_SCRIPT.read_text().splitlines(), SCRIPT.read_text().splitlines(), lineterm="")
    )
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    return added, removed


def test_copy_differs_from_trls_script_only_by_the_rose_lines():
    """Every line added to TRL's script is marked `# ROSE` (or is the provenance note or a blank line);
    every line removed is one of the 4 that gained ROSE's config (signature, parser types, unpacking)."""
    added, removed = changed_lines()
    unmarked = [
        line
        for line in added
        if line.strip() and not line.rstrip().endswith("# ROSE") and "changed only by" not in line
    ]
    assert not unmarked, unmarked
    non_blank = [line for line in added if line.strip()]
    assert len(non_blank) <= 11 and len(removed) == 4, (added, removed)
    assert any("callbacks=[ROSECallback(" in line for line in added)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_trls_sft_script_with_the_callback_gives_the_recipes_selection(tmp_path):
    """On the tiny task: TRL's script warmed up on the recipe's warm-up rows selects what the recipe selects
    with the same arguments (no row is over max_length, so both trainers see the same tokens;
    docs/guides/callback.md)."""
    from rose_trl.run.pipeline import warmup_indices

    run([sys.executable, "-m", "rose_trl.cli", "tiny-assets", "tiny", "--pool-size", "120"], tmp_path)
    pool = [json.loads(line) for line in (tmp_path / "tiny" / "pool.jsonl").read_text().splitlines()]
    warm = [pool[i] for i in warmup_indices(len(pool), 0.1, 0)]
    (tmp_path / "warmup").mkdir()  # a local dataset folder: what the script's --dataset_name loads
    (tmp_path / "warmup" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in warm))
    shared = [
        "--model_name_or_path",
        "tiny/model",
        "--dtype",
        "float32",
        "--use_peft",
        "--lora_r",
        "8",
        "--lora_alpha",
        "16",
        "--lora_target_modules",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "--pool_dataset",
        "tiny/pool.jsonl",
        "--validation_dataset",
        "tiny/validation.jsonl",
        "--selection_fraction",
        "0.1",
        "--projection_dim",
        "1024",
        "--num_train_epochs",
        "2",
        "--learning_rate",
        "1e-3",
        "--per_device_train_batch_size",
        "4",
        "--max_length",
        "256",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--gradient_checkpointing",
        "false",
        "--seed",
        "0",
        "--report_to",
        "none",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu.yaml"),
    ]
    run(
        [
            *launch,
            str(ROOT / "recipes" / "rose_sft.py"),
            *shared,
            "--warmup_fraction",
            "0.1",
            "--final_training",
            "false",
            "--output_dir",
            "recipe",
        ],
        tmp_path,
    )
    run(
        [
            *launch,
            str(SCRIPT),
            *shared,
            "--dataset_name",
            "warmup",
            "--save_strategy",
            "epoch",
            "--output_dir",
            "dropin",
        ],
        tmp_path,
    )

    recipe = pd.read_parquet(tmp_path / "recipe" / "selection" / "scores.parquet")
    dropin = pd.read_parquet(tmp_path / "dropin" / "selection" / "scores.parquet")
    assert dropin["selected"].sum() == 12 and (tmp_path / "dropin" / "adapter_model.safetensors").exists()
    np.testing.assert_array_equal(np.flatnonzero(dropin["selected"]), np.flatnonzero(recipe["selected"]))
    np.testing.assert_allclose(dropin["score"], recipe["score"], atol=1e-5)
