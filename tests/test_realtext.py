"""The shipped real-text slice and the tasks built from it."""

from pathlib import Path

import pytest

from rose_trl.data.realtext import SLICE_DIR, SLICE_FILES, build_real_task, load_slice, write_slice


RELEASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "rose"


def test_slice_is_small_and_attributed():
    files = list(SLICE_DIR.glob("*.jsonl"))
    assert sorted(f.name for f in files) == ["hh.jsonl", "se.jsonl"]  # no SHP
    assert sum(f.stat().st_size for f in files) <= 2_000_000
    readme = (SLICE_DIR / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "MIT License" in readme


@pytest.mark.skipif(not RELEASE.is_dir(), reason="needs the ROSE release copy in ../shared/data/rose")
def test_slice_rebuilds_byte_identical_from_the_release(tmp_path):
    write_slice(RELEASE, tmp_path)
    for task in ("se", "hh"):
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (SLICE_DIR / f"{task}.jsonl").read_bytes()


@pytest.mark.skipif(not RELEASE.is_dir(), reason="needs the ROSE release copy in ../shared/data/rose")
@pytest.mark.parametrize("target", ["se", "hh"])
def test_validation_is_the_released_file(target):
    from rose_trl.data.released import load_released_preferences

    for k in SLICE_FILES[target]:
        released = load_released_preferences(
            RELEASE / "validation" / target / f"{target}_{k}_shot" / f"{target}_{k}_shot_preference.json",
            drop_unusable=True,
        )
        assert build_real_task(target, k=k).validation.to_list() == released.to_list()


@pytest.mark.parametrize("target", ["se", "hh"])
def test_task_can_be_right_or_wrong_and_holds_out_its_pairs(target):
    task = build_real_task(target, pool_target=60, pool_other=20, heldout=40, seed=1)
    pool = task.pool.to_list()
    answers = {r["answer"] for r in pool}
    assert answers == {"chosen", "rejected", "other"}
    assert all(r["task"] == target for r in pool if r["answer"] != "other")
    assert all(r["task"] != target for r in pool if r["answer"] == "other")
    shipped = {r["prompt"] for r in load_slice(target) if r["released"]}
    held = task.heldout.to_list()
    held_prompts = {r["prompt"] for r in held}
    assert not held_prompts & ({r["prompt"] for r in pool} | shipped)
    assert {r["half"] for r in held} == {"dev", "test"} and len(held) == 40
    # Seeded: the same task twice, another seed another one.
    assert build_real_task(target, pool_target=60, pool_other=20, heldout=40, seed=1).pool.to_list() == pool
    assert build_real_task(target, pool_target=60, pool_other=20, heldout=40, seed=2).pool.to_list() != pool


def test_unknown_k_and_oversized_requests_are_refused():
    with pytest.raises(ValueError, match="se_3_shot"):
        build_real_task("se", k=3)
    with pytest.raises(ValueError, match="pool_target"):
        build_real_task("hh", pool_target=10_000)
