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
