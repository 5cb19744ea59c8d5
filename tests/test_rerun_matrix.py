"""The re-run matrix (slow): the tiny recipe, as a user launches it, per selection_method in {rose, less,
random} x {finished run, SIGKILL during the warm-up, during extraction, during final training}. Every case
ends with the clean run's outputs: scores.parquet byte-identical, the same selected rows, rose/checkpoints.json
and final model weights equal. A re-run of a finished run does no gradient pass and rewrites no file.

Shared work: one clean run per method (final training on) is the reference of its cases and the finished
run; the final-training kill starts from a copy of it without final*/. The baseline has no warm-up or
extraction to kill. logging_steps stays at its default (500), so no learning rate is logged.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from rose_trl.run.pipeline import FINAL_RECORD
from tests.test_rerun import snapshot
from tests.test_resume import _kill_tree


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
# 160 rows; warm-up 16 rows x 3 epochs of 4 steps (2 of them warm-up steps); 16 rows selected, trained 3
# epochs of 4 steps with a checkpoint each epoch.
ARGS = [
    "--pool_max_examples",
    "160",
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--warmup_steps",
    "2",
    "--projection_dim",
    "512",
    "--selection_fraction",
    "0.1",
    "--logging_steps",
    "500",
    "--save_strategy",
    "epoch",
    "--disable_tqdm",
    "true",
]
# Runs that get killed sleep this long in each training step (warm-up, final training) or each gradient-store
# write (extraction): the kill lands in the stage it targets, and the rest of the run keeps its speed.
SLOW = {"warmup": "ROSE_TEST_SLOW_STEPS", "extraction": "ROSE_TEST_SLOW_WRITES", "final": "ROSE_TEST_SLOW_STEPS"}
CASES = [(m, c) for m in ("rose", "less") for c in ("finished", "warmup", "extraction", "final")]
CASES += [("random", "finished"), ("random", "final")]
TIMES: dict[str, float] = {}


def launch(cwd: Path, method: str, slow: str | None = None) -> subprocess.Popen:
    counts = cwd / f"counts-{time.monotonic_ns()}.json"
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "counted_run.py"),
        str(counts),
        str(ROOT / "recipes" / "rose_sft.py"),
        "--config",
        str(ROOT / "recipes/tiny/rose/config_tiny.yaml"),
        "--selection_method",
        method,
        *ARGS,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**ENV, **({SLOW[slow]: "0.3"} if slow else {})},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    proc.counts = counts
    return proc


def finish(proc: subprocess.Popen) -> dict:
    """Waits for a run to end well; its gradient passes and seconds."""
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-4000:]
    return json.loads(proc.counts.read_text())


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 600
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting to kill {what}"
        time.sleep(0.02)
    _kill_tree(proc)


def run_dir(workdir: Path) -> Path:
    return workdir / "outputs/tiny/run"


def outputs(workdir: Path, method: str) -> dict:
    run = run_dir(workdir)
    suffix = "" if method == "rose" else f"_{method}"
    manifest = run / "rose/checkpoints.json"
    return {
        "scores": (run / f"selection{suffix}/scores.parquet").read_bytes(),
        "selected": load_from_disk(str(run / f"selection{suffix}/selected")).to_pandas(),
        "checkpoints": json.loads(manifest.read_text()) if manifest.exists() else None,
        "final": load_file(str(run / f"final{suffix}/adapter_model.safetensors")),
    }


def assert_same_outputs(found: dict, expected: dict, case: str) -> None:
    assert found["scores"] == expected["scores"], f"{case}: scores.parquet differs"
    pd.testing.assert_frame_equal(found["selected"], expected["selected"], check_exact=True, obj=f"{case}: selected")
    assert found["checkpoints"] == expected["checkpoints"], case
    assert found["final"].keys() == expected["final"].keys(), case
    assert all(torch.equal(found["final"][k], expected["final"][k]) for k in expected["final"]), (
        f"{case}: final weights"
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """method -> folder of its uninterrupted run (made on first use), and its reference outputs."""
    assets = tmp_path_factory.mktemp("assets")
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(assets / "outputs/tiny")],
        env=ENV,
        check=True,
        capture_output=True,
    )
    runs = {}

    def get(method: str):
        if method not in runs:
            workdir = tmp_path_factory.mktemp(f"clean-{method}")
            shutil.copytree(assets / "outputs", workdir / "outputs")
            start = time.time()
            finish(launch(workdir, method))
            TIMES[f"{method} clean run"] = time.time() - start
            runs[method] = workdir, outputs(workdir, method)
        return runs[method]

    return get


def fresh_copy(tmp_path: Path, workdir: Path, keep_run: bool) -> Path:
    """The assets, and with keep_run the clean run's outputs less final*/ (a run killed in final training)."""
    shutil.copytree(
        workdir / "outputs", tmp_path / "outputs", ignore=None if keep_run else shutil.ignore_patterns("run")
    )
    for final in run_dir(tmp_path).glob("final*"):
        shutil.rmtree(final)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("method,case", CASES)
def test_rerun_matrix(clean, tmp_path, method, case):
    workdir, expected = clean(method)
    run = run_dir(workdir)
    if case == "finished":
        before = snapshot(run)
        start = time.time()
        counts = finish(launch(workdir, method))
        TIMES[f"{method} re-run of the finished run"] = time.time() - start
        assert counts["passes"] == 0, counts
        assert snapshot(run) == before, "a re-run of a finished run rewrote files"
        assert_same_outputs(outputs(workdir, method), expected, case)
        return

    killed = fresh_copy(tmp_path, workdir, keep_run=case == "final")
    out = run_dir(killed)
    start = time.time()
    proc = launch(killed, method, slow=case)
    if case == "warmup":  # inside the second epoch's steps, after the first checkpoint's extraction
        step_lrs = out / "rose/step_lrs.json"
        kill_when(proc, lambda: step_lrs.exists() and "6" in json.loads(step_lrs.read_text()), "in the warm-up")
        assert not (out / "warmup/checkpoint-12").exists()
    elif case == "extraction":  # inside the pool extraction of the last checkpoint, once the warm-up has ended
        kill_when(proc, lambda: (out / "rose/train/checkpoint-12/meta.json").exists(), "in extraction")
        recorded = json.loads((out / "rose/checkpoints.json").read_text())["checkpoints"]
        assert [c["name"] for c in recorded] == ["checkpoint-4", "checkpoint-8"]
    else:  # after the final training's first checkpoint
        suffix = "" if method == "rose" else f"_{method}"
        kill_when(proc, lambda: (out / f"final{suffix}/checkpoint-4/trainer_state.json").exists(), "in final training")
        assert json.loads((out / f"final{suffix}" / FINAL_RECORD).read_text())["finished"] is False
    finish(launch(killed, method))
    TIMES[f"{method} killed in {case}, then re-run"] = time.time() - start
    assert_same_outputs(outputs(killed, method), expected, f"{method}, killed in {case}")
    assert not list(out.rglob(".*tmp-*")), "temporary folders left behind"


@pytest.fixture(scope="module", autouse=True)
def report_times():
    start = time.time()
    yield
    if TIMES:
        TIMES["matrix wall time"] = time.time() - start
        print("\nre-run matrix times (s): " + json.dumps({k: round(v, 1) for k, v in TIMES.items()}, indent=1))
