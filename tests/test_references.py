"""Outputs stay what the code wrote when the references were recorded (tests/references/, made by
tests/references/make_references.py): scores.parquet and contributions.parquet as decoded tables (every column
and type; floats to compare.TOLERANCE, derived in tests/references/compare.py from the float16 stores; picks
exactly, except rows tied at the threshold within it), and byte for byte where the floats are bit-identical under
the pyarrow/pandas that wrote them. The inline case runs in the default suite; the recipe cases are slow."""

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.references.compare import TOLERANCE, _versions, differences
from tests.references.make_references import HERE, run_case


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    """(working folder, selection folders) of one inline run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("inline")
    return workdir, run_case("inline", workdir)


def test_selector_outputs_match_the_references(inline_run):
    assert differences(HERE / "inline", inline_run[1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny", "matrix", "rerun"])
def test_recipe_outputs_match_the_references(tmp_path, case):
    assert differences(HERE / case, run_case(case, tmp_path)) == []


def one_step_away(store_file, rng) -> None:
    """Another CPU, as the stores see it: every float16 element one step up or down (at random); in every
    int8 row, the largest element one step toward zero (a flip at the place where a step weighs most)."""
    values = np.load(store_file, mmap_mode="r+")
    if values.dtype == np.float16:
        up = rng.random(values.shape) < 0.5
        values[...] = np.where(up, np.nextafter(values, np.float16(np.inf)), np.nextafter(values, np.float16(-np.inf)))
    elif values.dtype == np.int8:
        rows, cols = np.arange(len(values)), np.abs(values.astype(np.int16)).argmax(axis=1)
        values[rows, cols] -= np.sign(values[rows, cols])
    values.flush()


def test_tolerance_covers_another_cpu(inline_run, tmp_path):
    """The inline run's stores moved by one storage step (compare.py's point 2 and 5), then scored again: the
    outputs move, and stay within the tolerance."""
    workdir, first = inline_run
    shutil.copytree(workdir, tmp_path / "other")
    rng = np.random.default_rng(0)
    shards = sorted((tmp_path / "other").glob("*/rose/*/checkpoint-*/shard_*.npy"))
    assert {str(np.load(s, mmap_mode="r").dtype) for s in shards} == {"float16", "int8"}
    for shard in shards:
        one_step_away(shard, rng)
    again = run_case("inline", tmp_path / "other")  # the stores are complete: scoring only
    moved = max(
        np.abs(
            pd.read_parquet(again[name] / "scores.parquet")["score"]
            - pd.read_parquet(first[name] / "scores.parquet")["score"]
        ).max()
        for name in first
    )
    assert moved > 0
    assert differences(HERE / "inline", again) == []


def test_comparison_sees_a_changed_value(tmp_path):
    """The check itself can fail: a score moved beyond the tolerance, or a pick flipped away from the threshold,
    in a copy of a reference folder is reported; a move within the tolerance (another CPU) is not."""
    folder = tmp_path / "selection"
    others = {"selection_less": HERE / "inline" / "selection_less", "whole_row": HERE / "inline" / "whole_row"}
    shutil.copytree(HERE / "inline" / "selection", folder)
    frame = pd.read_parquet(folder / "scores.parquet")
    edited = frame.copy()
    edited.loc[0, "score"] = frame.loc[0, "score"] + TOLERANCE / 2
    edited.to_parquet(folder / "scores.parquet", index=False)
    assert differences(HERE / "inline", {"selection": folder, **others}) == []
    edited.loc[0, "score"] = frame.loc[0, "score"] + 2 * TOLERANCE
    edited.to_parquet(folder / "scores.parquet", index=False)
    assert differences(HERE / "inline", {"selection": folder, **others}) == [
        f"selection/scores.parquet: column 'score' differs by up to {2 * TOLERANCE:.3g} (tolerance {TOLERANCE:.3g})"
    ]
    edited = frame.copy()
    worst_left_out, best_row = frame[~frame.selected].score.idxmin(), frame[frame.selected].score.idxmax()
    edited.loc[[worst_left_out, best_row], "selected"] = [True, False]
    edited.loc[worst_left_out, "selected_for"] = frame.selected_for[best_row]
    edited.loc[best_row, "selected_for"] = pd.NA
    edited.to_parquet(folder / "scores.parquet", index=False)
    owner, why = frame.selected_for[best_row], "(not tied at the threshold)"
    assert sorted(differences(HERE / "inline", {"selection": folder, **others})) == sorted(
        [
            f"selection/scores.parquet: pool row {best_row}: picked None, was {owner!r} {why}",
            f"selection/scores.parquet: pool row {worst_left_out}: picked {owner!r}, was None {why}",
        ]
    )


def reference_folder(root, frames: dict[str, pd.DataFrame]):
    """A reference folder like tests/references/<case>/ holding `frames` ("<folder>/<file>" -> table)."""
    manifest = {"versions": _versions(), "files": {}}
    for key, frame in frames.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(root / key, index=False)
        manifest["files"][key] = hashlib.sha256((root / key).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def selection(scores: dict[str, list[float]], picks: dict[int, str], balance: str):
    """(scores.parquet, contributions.parquet) frames: `picks` maps the selected rows to their subtask."""
    n = len(scores["score"])
    frame = pd.DataFrame(
        {"pool_index": np.arange(n), **{k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}}
    )
    frame["selected"] = [i in picks for i in range(n)]
    frame["selected_for"] = pd.Series([picks.get(i, pd.NA) for i in range(n)], dtype="string")
    rows = sorted(picks)
    contributions = pd.DataFrame(
        {"pool_index": np.repeat(rows, 2), "pair_index": np.tile([0, 1], len(rows)), "subtask": "a"}
    )
    contributions["contribution"] = contributions.pool_index * 0.01 + contributions.pair_index
    return frame, contributions, balance


def new_run(root, frames) -> dict:
    scores, contributions, balance = frames
    root.mkdir(parents=True)
    scores.to_parquet(root / "scores.parquet", index=False)
    contributions.to_parquet(root / "contributions.parquet", index=False)
    (root / "summary.json").write_text(json.dumps({"subtask_balance": balance}))
    return {"selection": root}


@pytest.mark.parametrize("balance", ["max", "round_robin"])
def test_rows_tied_at_the_threshold_may_swap(tmp_path, balance):
    """Two rows within the tolerance of each other at the threshold swap their picks (another CPU): accepted,
    with their contributions on one side only; a swap with a row clear of the threshold is reported."""
    a = [0.9, 0.3, 0.5000, 0.1, 0.4995, 0.2]  # max and round_robin (2 rows each) both pick rows 0, 2, 3, 5
    b = [0.1, 0.2, 0.1, 0.7, 0.1, 0.6]
    score = np.maximum(a, b).tolist()
    old = selection({"score": score, "score_a": a, "score_b": b}, {0: "a", 2: "a", 3: "b", 5: "b"}, balance)
    scores, contributions, _ = old
    reference = reference_folder(
        tmp_path / "ref", {"selection/scores.parquet": scores, "selection/contributions.parquet": contributions}
    )
    moved = list(a)
    moved[2], moved[4] = a[2] - 0.4 * TOLERANCE, a[4] + 0.4 * TOLERANCE  # row 4 now above row 2
    score = np.maximum(moved, b).tolist()
    swapped = selection({"score": score, "score_a": moved, "score_b": b}, {0: "a", 4: "a", 3: "b", 5: "b"}, balance)
    assert differences(reference, new_run(tmp_path / "tie", swapped)) == []
    clear = selection({"score": scores.score, "score_a": a, "score_b": b}, {0: "a", 1: "a", 3: "b", 5: "b"}, balance)
    found = differences(reference, new_run(tmp_path / "clear", clear))
    assert found[:2] == [
        "selection/scores.parquet: pool row 1: picked 'a', was None (not tied at the threshold)",
        "selection/scores.parquet: pool row 2: picked None, was 'a' (not tied at the threshold)",
    ]
