"""Resume after SIGKILL: a killed run started again with the same command gives bit-identical outputs.

The fast test kills a process that is filling a gradient store; the slow one kills the tiny recipe
(warm-up -> extraction -> scoring -> selection) at several points, one of them inside a checkpoint's
extraction, and compares the outputs with an uninterrupted run.
"""

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import load_from_disk

from rose_trl.stores.store import GradientStore


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

# Fills `store_dir` with the gradients of a fixed small torch model over a fixed random pool, one row
# per batch (so that a kill lands between many writes), and prints how many rows it computed. Plain
# torch (no transformers/peft import) keeps each interpreter start short.
EXTRACT = textwrap.dedent("""
    import sys, types, numpy as np, torch
    from torch import nn
    from rose_trl.stores.extraction import extract_gradients
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.store import GradientStore

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid, self.head = nn.Embedding(128, 32), nn.Linear(32, 32), nn.Linear(32, 128)
            self.embed.requires_grad_(False)
        def forward(self, input_ids, attention_mask=None, use_cache=None):
            return types.SimpleNamespace(logits=self.head(torch.tanh(self.mid(self.embed(input_ids)))))

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Tiny()
    rng = np.random.default_rng(0)
    pool = []
    for i in range(48):
        n = int(rng.integers(6, 24))
        completion_mask = [0] * (n // 2) + [1] * (n - n // 2)
        pool.append({"input_ids": rng.integers(3, 128, n).tolist(), "completion_mask": completion_mask})
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    projector = build_projector("sjlt", n_params, 64, 0)
    # ~50 ms a row (two layers, each projected on its own in the fused path): extraction lasts ~2.5 s,
    # so each kill lands between writes whatever the machine's speed.
    add_projection = projector.add_projection
    projector.add_projection = lambda *a: (__import__("time").sleep(0.025), add_projection(*a))[1]
    store = GradientStore.open_or_create(sys.argv[1], model="tiny", checkpoint="c", projection=projector.describe(),
                                         gradient_type="sgd", pool_fingerprint="p", num_rows=len(pool), shard_size=16)
    print(extract_gradients(model, pool, store, projector, 0, batch_size=1, progress=False), flush=True)
""")


def _extract(script: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(store)], env=ENV, stdout=subprocess.PIPE, text=True)


def test_killed_extraction_resumes_to_identical_rows(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(EXTRACT)
    # The uninterrupted reference runs in this process (saves a slow interpreter start).
    argv = sys.argv
    try:
        sys.argv = [str(script), str(tmp_path / "reference")]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv

    store = tmp_path / "killed"
    killed_with = []
    for _ in range(2):
        proc = _extract(script, store)
        # Kill once some rows are done, and before all of them are.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            meta = store / "meta.json"
            if meta.exists() and 0 < GradientStore.open(store).done_mask().sum() - sum(killed_with):
                break
            time.sleep(0.02)
        time.sleep(float(np.random.default_rng(len(killed_with)).uniform(0, 0.3)))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_with.append(int(GradientStore.open(store).done_mask().sum()) - sum(killed_with))
    assert killed_with and 0 < sum(killed_with) < 48, killed_with  # the kills did land mid-way

    finish = _extract(script, store)
    computed = int(finish.communicate(timeout=300)[0].strip())
    assert computed == 48 - sum(killed_with)  # finished rows were not recomputed
    np.testing.assert_array_equal(
        GradientStore.open(store).read_all(), GradientStore.open(tmp_path / "reference").read_all()
    )


def _launch(cwd: Path, args: list[str]) -> subprocess.Popen:
    # The recipe itself, without `accelerate launch` (one process on CPU either way; one interpreter
    # start less per launch). test_recipe_tiny.py covers the accelerate launch.
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "rose_sft.py"),
        "--config",
        str(ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml"),
        *args,
    ]
    # A new session: SIGKILL reaches the whole process tree (dataloader or tokenizer workers included).
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _kill_tree(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _outputs(run: Path):
    return pd.read_parquet(run / "selection" / "scores.parquet"), load_from_disk(
        str(run / "selection" / "selected")
    ).to_pandas()


@pytest.mark.slow
def test_recipe_killed_at_random_points_finishes_with_identical_outputs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "ref/outputs/tiny")], env=ENV, check=True
    )
    args = [
        "--final_training",
        "false",
        "--pool_max_examples",
        "160",
        "--num_train_epochs",
        "3",
        "--projection_dim",
        "2048",
        "--disable_tqdm",
        "true",
    ]
    (tmp_path / "killed").mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "ref/outputs"), str(tmp_path / "killed")], check=True)

    start = time.time()
    ref = _launch(tmp_path / "ref", args)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    duration = time.time() - start
    expected_scores, expected_selected = _outputs(tmp_path / "ref/outputs/tiny/run")

    run = tmp_path / "killed/outputs/tiny/run"
    rng = np.random.default_rng(int(time.time()))  # random kill points; printed on failure
    kills = []
    # First kill: inside the first checkpoint's pool extraction (its store exists, it is not recorded yet).
    proc = _launch(tmp_path / "killed", args)
    store_meta = run / "rose/train/checkpoint-2/meta.json"
    while proc.poll() is None and not store_meta.exists():
        time.sleep(0.05)
    time.sleep(rng.uniform(0, 0.5))
    assert proc.poll() is None, "the run ended before the first kill"
    _kill_tree(proc)
    kills.append("in extraction of checkpoint-2")
    # Then at random times of a run.
    for _ in range(2):
        delay = float(rng.uniform(0.2, 0.9) * duration)
        proc = _launch(tmp_path / "killed", args)
        try:
            proc.wait(timeout=delay)
            kills.append(f"none (finished before {delay:.1f}s)")
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            kills.append(f"after {delay:.1f}s")
    final = _launch(tmp_path / "killed", args)
    assert final.wait(timeout=600) == 0, (kills, final.stderr.read()[-3000:])

    scores, selected = _outputs(run)
    pd.testing.assert_frame_equal(scores, expected_scores, check_exact=True, obj=f"scores after kills {kills}")
    pd.testing.assert_frame_equal(selected, expected_selected, check_exact=True)
    assert json.loads((run / "rose/checkpoints.json").read_text()) == json.loads(
        (tmp_path / "ref/outputs/tiny/run/rose/checkpoints.json").read_text()
    )
    assert not list(run.rglob(".*tmp-*")), "temporary folders left behind"


def test_resume_skips_and_removes_checkpoints_killed_while_saving(tmp_path):
    from rose_trl.run.pipeline import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "absent") is None
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_st'), (15, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
