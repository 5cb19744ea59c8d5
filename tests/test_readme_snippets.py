"""The README's drop-in callback snippet, then its offline snippet on the callback's warm-up, run as a user would run
them, at tiny scale.

The snippets are read from README.md (its python blocks that call `ROSECallback(` and `select_from_checkpoints(`),
not copied here, and run in a fresh interpreter each, in that order, with these substitutions, made here and nowhere
else:
- the model id `"HuggingFaceTB/SmolLM2-135M-Instruct"` becomes the tiny model's folder (`rose-trl tiny-assets`: a
  tiny Llama and its tokenizer, nothing downloaded);
- they run in a folder holding the tiny task's `pool.jsonl` (40 rows) and `validation.jsonl`, the file names they
  load;
- each `SFTConfig(` gets the settings the README gives for a machine without a GPU (`use_cpu=True, bf16=False`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import load_from_disk


ROOT = Path(__file__).resolve().parents[1]
CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
MODEL_ID = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
CPU = "use_cpu=True, bf16=False"


def readme_block(calling: str) -> str:
    blocks = [b for b in CODE_BLOCK.findall((ROOT / "README.md").read_text()) if calling in b]
    assert len(blocks) == 1, f"README.md should have one python block calling {calling}, found {len(blocks)}"
    return blocks[0]


def run_snippet(code: str, folder: Path, model: Path, name: str) -> None:
    assert code.count(MODEL_ID) == 1, "the substitutions no longer apply"
    code = code.replace(MODEL_ID, repr(str(model))).replace("SFTConfig(", f"SFTConfig({CPU}, ")
    (folder / name).write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, name], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_the_readme_callback_and_offline_snippets_run_end_to_end(tmp_path):
    from rose_trl.models.tiny import write_tiny_assets

    callback = readme_block("ROSECallback(")
    assert callback.count("SFTConfig(") == 2, "the substitutions no longer apply"
    assert CPU in (ROOT / "README.md").read_text(), "the README no longer gives the CPU settings the test uses"
    assets = write_tiny_assets(tmp_path / "tiny", n_pool=40)
    for name in ("pool.jsonl", "validation.jsonl"):
        shutil.copy(assets / name, tmp_path / name)
    run_snippet(callback, tmp_path, assets / "model", "callback.py")

    run = tmp_path / "outputs" / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{i}" for i in range(1, 5)]  # 4 epochs
    scores = pd.read_parquet(run / "selection" / "scores.parquet")
    assert len(scores) == 40
    selected = load_from_disk(str(run / "selection" / "selected"))
    assert len(selected) == 2  # 5% of 40 rows
    best = scores.sort_values("score", ascending=False, kind="stable")["pool_index"].head(2).tolist()
    assert sorted(selected["pool_index"]) == sorted(best)
    # the final model: a LoRA adapter trained on the 2 selected rows (4 epochs, one step each)
    assert (run / "final" / "adapter_model.safetensors").exists()
    state = (run / "final" / "checkpoint-4" / "trainer_state.json").read_text()
    assert '"global_step": 4' in state

    # the offline snippet, on the callback's warm-up checkpoints: the callback's selection, from the folders alone
    run_snippet(readme_block("select_from_checkpoints("), tmp_path, assets / "model", "offline.py")
    offline = pd.read_parquet(tmp_path / "outputs" / "offline" / "selection" / "scores.parquet")
    assert (offline["selected"] == scores["selected"]).all()
    assert np.allclose(offline["score"], scores["score"], rtol=0, atol=1e-6)
