"""Every command is safe to run again: the same recipe command over a finished output_dir reuses the
recorded checkpoints and learning rates, does no gradient pass, rewrites no file and does not train a
finished final model again. The re-run matrix with SIGKILLs is tests/test_rerun_matrix.py (slow)."""

import json
import os
from pathlib import Path

import pytest
from trl import ModelConfig, SFTConfig, TrlParser

from rose_trl.config import BASELINE_METHODS, GRADIENT_METHODS, ROSEConfig
from rose_trl.models.tiny import write_tiny_assets
from rose_trl.run.pipeline import FINAL_RECORD, run
from tests.helpers import counting_gradient_passes


ROOT = Path(__file__).resolve().parents[1]
ROSE_DATA = Path(os.environ.get("ROSE_DATA_DIR", ROOT.parent / "shared" / "data" / "rose"))
SE_2_SHOT = ROSE_DATA / "validation/se/se_2_shot/se_2_shot_preference.json"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The tiny recipe's assets (a 400-row pool) and its config with logging_steps left at
    TrainingArguments' default (500: nothing is logged during the warm-up)."""
    root = tmp_path_factory.mktemp("recipe")
    write_tiny_assets(root / "outputs/tiny")
    lines = (ROOT / "recipes/tiny/rose/config_tiny.yaml").read_text().splitlines()
    (root / "config.yaml").write_text("\n".join(line for line in lines if not line.startswith("logging_steps")))
    return root


def recipe(workdir, monkeypatch, *args) -> dict:
    """`recipes/rose_sft.py --config config.yaml <args>`, in this process."""
    monkeypatch.chdir(workdir)
    configs = TrlParser((ROSEConfig, SFTConfig, ModelConfig)).parse_args_and_config(
        args=["--config", "config.yaml", "--disable_tqdm", "true", *args]
    )
    return run(*configs)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its inode and modification time: equal snapshots, nothing rewritten."""
    # timings.json is the log of the last run's stage times, written by every run (a rerun that does nothing too).
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.name != "timings.json"
    }


def run_again_changes_nothing(workdir, monkeypatch, out: Path, args: list[str], first: dict) -> None:
    before = snapshot(out)
    with counting_gradient_passes() as counter:
        assert recipe(workdir, monkeypatch, *args) == first
    assert counter["passes"] == 0
    assert snapshot(out) == before


@pytest.mark.parametrize("validation", ["tiny", pytest.param("se_2_shot", marks=pytest.mark.slow)])
def test_same_command_twice_with_default_logging_steps(workdir, tmp_path, monkeypatch, validation):
    """The issue's reproduction: a warm-up of 2 epochs of 5 steps, final_training false, logging_steps at its
    default; the second run used to fail reading the learning rates from the log. Slow: the issue's own
    400-row pool and se_2_shot_preference.json; fast: 160 rows (a quarter of them warm up) and the tiny set."""
    if validation == "se_2_shot" and not SE_2_SHOT.exists():
        pytest.skip(f"{SE_2_SHOT} not found (set ROSE_DATA_DIR)")
    out = tmp_path / "run"
    args = [
        "--output_dir",
        str(out),
        "--num_train_epochs",
        "2",
        "--final_training",
        "false",
        "--projection_dim",
        "512",
        *(
            ["--validation_dataset", str(SE_2_SHOT)]
            if validation == "se_2_shot"
            else ["--pool_max_examples", "160", "--warmup_fraction", "0.25"]
        ),
    ]
    with counting_gradient_passes() as counter:
        first = recipe(workdir, monkeypatch, *args)
    assert counter["passes"] > 0
    assert sorted(p.name for p in (out / "warmup").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    log = json.loads((out / "warmup/checkpoint-10/trainer_state.json").read_text())["log_history"]
    assert all(entry["step"] > 5 for entry in log if "learning_rate" in entry)  # none for checkpoint-5's steps
    run_again_changes_nothing(workdir, monkeypatch, out, args, first)


def test_final_model_is_reused_and_retrained_only_for_another_selection(workdir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [
        "--output_dir",
        str(out),
        "--selection_method",
        "random",
        "--num_train_epochs",
        "1",
        "--save_strategy",
        "epoch",
    ]
    first = recipe(workdir, monkeypatch, *args)
    final = out / "final_random"
    assert first["final_model"] == str(final) and (final / "adapter_model.safetensors").exists()
    record = json.loads((final / FINAL_RECORD).read_text())
    assert record["finished"] is True
    run_again_changes_nothing(workdir, monkeypatch, out, args, first)

    # Another selection: the final model is trained again, from scratch (its old folder is cleared).
    (final / "stale-marker").write_text("from the previous training")
    with counting_gradient_passes() as counter:
        recipe(workdir, monkeypatch, *args, "--selection_fraction", "0.1")
    assert counter["passes"] > 0 and not (final / "stale-marker").exists()
    again = json.loads((final / FINAL_RECORD).read_text())
    assert again["finished"] is True and again["fingerprint"] != record["fingerprint"]


@pytest.mark.slow
def test_every_method_with_and_without_final_training_runs_again_unchanged(workdir, tmp_path, monkeypatch):
    """Each selection_method, final_training off then on, on one output_dir (the gradient methods share
    the warm-up): every re-run does no gradient pass and leaves every file as it was."""
    out = tmp_path / "run"
    for method in GRADIENT_METHODS + BASELINE_METHODS:
        folder = out / ("selection" if method == "rose" else f"selection_{method}")
        scores = None
        for final_training in ("false", "true"):
            args = [
                "--output_dir",
                str(out),
                "--selection_method",
                method,
                "--final_training",
                final_training,
                "--num_train_epochs",
                "2",
                "--projection_dim",
                "512",
                "--save_strategy",
                "epoch",
                "--pool_max_examples",
                "160",
                "--warmup_fraction",
                "0.25",
            ]
            first = recipe(workdir, monkeypatch, *args)
            # final_training is part of the recorded configuration; the scores do not depend on it
            assert scores is None or (folder / "scores.parquet").read_bytes() == scores, method
            scores = (folder / "scores.parquet").read_bytes()
            run_again_changes_nothing(workdir, monkeypatch, out, args, first)
