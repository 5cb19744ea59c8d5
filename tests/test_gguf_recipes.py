"""`model_name_or_path: <file>.gguf` through the recipes (slow): recipes/rose_sft.py and recipes/rose_select.py
on the tiny task, the tiny model written as a GGUF file (tests/gguf_fixtures.py), converted once and cached."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rose_trl.models.source import file_sha256

from .gguf_fixtures import write_tiny_gguf


ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("gguf")


def launch(script: str, cwd: Path, env: dict, *args: str, config: str = "cpu.yaml") -> None:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
        str(ROOT / "recipes" / script),
        *args,
    ]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_gguf_model_through_rose_sft_and_rose_select(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "ROSE_TRL_CACHE": str(tmp_path / "cache")}
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", "tiny", "--pool-size", "120"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    folder = tmp_path / "tiny" / "model"
    gguf = write_tiny_gguf(
        tmp_path / "tiny.gguf", AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    )
    small = [
        "--pool_dataset",
        "tiny/pool.jsonl",
        "--validation_dataset",
        "tiny/validation.jsonl",
        "--projection_dim",
        "1024",
        "--selection_fraction",
        "0.1",
    ]
    recipe = str(ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml")
    launch(
        "rose_sft.py",
        tmp_path,
        env,
        "--config",
        recipe,
        *small,
        "--model_name_or_path",
        "tiny.gguf",
        "--num_train_epochs",
        "2",
        "--final_training",
        "false",
        "--output_dir",
        "run",
    )
    # Converted once, under the file's content hash, and the run names the file and its hash.
    sha = file_sha256(gguf)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [sha[:16]]
    config = json.loads((tmp_path / "run" / "selection" / "config.json").read_text())
    assert config["gguf_sha256"] == sha and config["gguf_file"] == str(gguf)

    # Offline selection from that warm-up, the model named by its GGUF file again, on 2 processes.
    select = str(ROOT / "recipes" / "tiny" / "rose" / "select_tiny.yaml")
    launch(
        "rose_select.py",
        tmp_path,
        env,
        "--config",
        select,
        *small,
        "--model_name_or_path",
        "tiny.gguf",
        "--warmup_dir",
        "run/warmup",
        "--output_dir",
        "select",
        config="multi_cpu.yaml",
    )
    online = pd.read_parquet(tmp_path / "run" / "selection" / "scores.parquet")
    offline = pd.read_parquet(tmp_path / "select" / "selection" / "scores.parquet")
    assert online["selected"].sum() == 12
    np.testing.assert_array_equal(np.flatnonzero(offline["selected"]), np.flatnonzero(online["selected"]))
    np.testing.assert_allclose(offline["score"], online["score"], atol=1e-4)
