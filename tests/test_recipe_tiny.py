"""The README's main command, end to end, as a user runs it (slow: a few minutes on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


ROOT = Path(__file__).resolve().parents[1]


def launch(config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / "cpu.yaml"),
        str(ROOT / "recipes" / "rose_sft.py"),
        "--config",
        str(config),
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_tiny_recipe_selects_the_planted_signal_and_resumes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "outputs/tiny")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    config = ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml"
    first = launch(config, tmp_path)
    run = tmp_path / "outputs/tiny/run"
    assert "selection: outputs/tiny/run/selection" in first.stdout
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (run / "warmup").glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-15",
        "checkpoint-20",
        "checkpoint-5",
    ]
    scores = pd.read_parquet(run / "selection" / "scores.parquet")
    pool = [json.loads(line) for line in (tmp_path / "outputs/tiny/pool.jsonl").read_text().splitlines()]
    picked = [pool[i]["feature"] for i in np.flatnonzero(scores["selected"])]
    assert len(picked) == 20 and not any(f.endswith("_bad") for f in picked)
    assert np.mean([f.endswith("_good") for f in picked]) >= 0.75
    # The run's stage times: every stage of the recipe, summing (with the little time between them) to its wall time.
    timings = json.loads((run / "timings.json").read_text())
    stages = timings["stages"]
    for name in ("warm-up training steps", "pool gradient passes", "validation gradients", "final training steps"):
        assert stages[name] > 0, stages
    assert abs(sum(stages.values()) + timings["other_s"] - timings["wall_s"]) < 0.01
    assert timings["other_s"] <= 0.05 * timings["wall_s"] + 0.5, timings
    assert "stage times:" in first.stderr + first.stdout

    # Same command again: the warm-up is finished and every store is complete, so nothing is recomputed
    # and the selection comes out the same.
    stamps = {p: p.stat().st_mtime_ns for p in (run / "rose").rglob("shard_*.npy")}
    launch(config, tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (run / "rose").rglob("shard_*.npy")} == stamps
    pd.testing.assert_frame_equal(scores, pd.read_parquet(run / "selection" / "scores.parquet"))

    # Another gradient method on the finished run: the warm-up's checkpoints are read, the pool
    # gradient stores are reused as they are, only LESS's validation gradients are new.
    launch_args = ["--selection_method", "less", "--final_training", "false"]
    launch(config, tmp_path, *launch_args)
    assert {p: p.stat().st_mtime_ns for p in (run / "rose" / "train").rglob("shard_*.npy")} == {
        p: s for p, s in stamps.items() if "/train/" in str(p)
    }
    less = pd.read_parquet(run / "selection_less" / "scores.parquet")
    assert less["selected"].sum() == 20 and (run / "rose" / "val_sft").is_dir()


@pytest.mark.slow
def test_an_alpaca_json_pool_and_a_csv_of_pairs_with_only_the_two_paths_changed(tmp_path):
    """The data users have, read as it is: the tiny recipe as it is, with pool_dataset an Alpaca JSON file and
    validation_dataset a CSV file of pairs (the same rows as the assets'); every pair is used."""
    import csv

    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "outputs/tiny")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assets = tmp_path / "outputs/tiny"
    pool = [json.loads(line) for line in (assets / "pool.jsonl").read_text().splitlines()]
    alpaca = []
    for i, row in enumerate(pool):  # "tell me about x and y ." -> instruction, input (half the rows), output
        instruction, rest = row["prompt"].split(" about ", 1)
        split = i % 2 == 0
        alpaca.append(
            {
                "instruction": f"{instruction} about" if split else row["prompt"],
                "input": rest if split else "",
                "output": row["completion"].strip(),
                "feature": row["feature"],
            }
        )
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    pairs = [json.loads(line) for line in (assets / "validation.jsonl").read_text().splitlines()]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "subtask"])
        writer.writeheader()
        writer.writerows(pairs)

    config = ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml"
    launch(config, tmp_path, "--pool_dataset", "alpaca.json", "--validation_dataset", "pairs.csv")
    run = tmp_path / "outputs/tiny/run"
    summary = json.loads((run / "selection" / "summary.json").read_text())
    assert summary["num_pool"] == len(alpaca) and summary["validation_subsample"] is None
    assert sum(a["pairs"] for a in summary["validation_agreement"].values()) == len(pairs)  # every pair used
    used = pd.read_parquet(run / "selection" / "pairs.parquet")
    assert len(used) == len(pairs) and used["usable"].all()
    assert list(used["chosen"]) == [p["chosen"] for p in pairs]
    selected = pd.read_parquet(run / "selection" / "scores.parquet")
    picked = [alpaca[i]["feature"] for i in np.flatnonzero(selected["selected"])]
    assert len(picked) == 20 and not any(f.endswith("_bad") for f in picked)
    assert (run / "final" / "adapter_model.safetensors").exists()
