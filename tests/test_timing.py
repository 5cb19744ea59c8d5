"""Stage times (rose_trl/utils/timing.py): each stage counted once, nested ones taken off the outer; a run logs them at
its end and writes them to <output_dir>/timings.json."""

from __future__ import annotations

import json
import time

import pytest

from rose_trl.utils import timing


@pytest.fixture
def fake_clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    return now


def test_nested_stages_are_taken_off_the_outer_one(fake_clock):
    clock = timing.StageClock()
    with clock.stage("warm-up training steps"):
        fake_clock[0] += 2
        with clock.stage("pool gradient passes"):
            fake_clock[0] += 5
            with clock.stage("gradient store writes"):
                fake_clock[0] += 1
        fake_clock[0] += 3
        clock.add("warm-up checkpoint saves (Trainer)", 0.5)  # measured between two Trainer events
        with clock.stage("pool gradient passes"):
            fake_clock[0] += 4
    fake_clock[0] += 1.5  # between stages
    report = clock.report()
    assert report["stages"] == {
        "gradient store writes": 1.0,
        "pool gradient passes": 9.0,
        "warm-up checkpoint saves (Trainer)": 0.5,
        "warm-up training steps": 4.5,
    }
    assert report["wall_s"] == 16.5 and report["other_s"] == 1.5
    text = clock.describe()
    assert "stage times: 16.5 s wall in all" in text and "other (between stages)" in text
    assert "pool gradient passes" in text and "54.5%" in text


def test_a_stage_that_raises_is_counted_and_the_clock_goes_on(fake_clock):
    clock = timing.StageClock()
    with pytest.raises(RuntimeError), clock.stage("scoring"):
        fake_clock[0] += 2
        raise RuntimeError
    with clock.stage("selection writing"):
        fake_clock[0] += 1
    assert clock.report()["stages"] == {"scoring": 2.0, "selection writing": 1.0}
    clock.start()
    assert clock.report() == {"wall_s": 0.0, "stages": {}, "other_s": 0.0}


def test_the_tiny_recipe_writes_its_stage_times_and_they_sum_to_its_wall_time(tmp_path, caplog):
    """The tiny pipeline with final training: every stage of the recipe is timed, and the stages (with the little
    time between them) sum to the run's wall time."""
    from trl import ModelConfig, SFTConfig

    from rose_trl.config import ROSEConfig
    from rose_trl.models.tiny import write_tiny_assets
    from rose_trl.run.pipeline import TIMINGS_FILE, run

    assets = write_tiny_assets(tmp_path / "assets", n_pool=40)
    out = tmp_path / "run"
    began = time.perf_counter()
    with caplog.at_level("WARNING"):
        run(
            ROSEConfig(
                pool_dataset=str(assets / "pool.jsonl"),
                validation_dataset=str(assets / "validation.jsonl"),
                selection_fraction=0.25,
                warmup_fraction=0.2,
                projection_dim=512,
            ),
            SFTConfig(
                output_dir=str(out),
                use_cpu=True,
                bf16=False,
                report_to=[],
                max_length=128,
                num_train_epochs=2,
                per_device_train_batch_size=4,
                disable_tqdm=True,
                save_strategy="epoch",
            ),
            ModelConfig(
                model_name_or_path=str(assets / "model"),
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
            ),
        )
    wall = time.perf_counter() - began
    report = json.loads((out / TIMINGS_FILE).read_text())
    stages = report["stages"]
    for name in (
        "setup: data, models and checks",
        "warm-up training steps",
        "warm-up checkpoint saves (Trainer)",
        "callback checks and records",
        "pool gradient passes",
        "gradient store writes",
        "reference log-probs",
        "validation gradients",
        "scoring",
        "selection writing",
        "final training steps",
        "final model save",
    ):
        assert stages.get(name, 0) > 0, (name, stages)
    assert all(s >= 0 for s in stages.values()), stages
    assert sum(stages.values()) + report["other_s"] == pytest.approx(report["wall_s"], abs=0.01)
    # The stages cover the run: what is left between them is a small share, and the run's wall time is the one
    # measured around it.
    assert report["other_s"] <= 0.05 * report["wall_s"] + 0.5, report
    assert report["wall_s"] <= wall and report["wall_s"] >= 0.95 * wall - 0.5, (report["wall_s"], wall)
    logged = [r.getMessage() for r in caplog.records if "stage times:" in r.getMessage()]
    assert len(logged) == 1 and "pool gradient passes" in logged[0] and "final training steps" in logged[0]
