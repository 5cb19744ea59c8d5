"""Subtasks may have any name: `ckpt0` would take checkpoint 0's column name and `score` reads like the score
itself. The writer (scoring) and every reader (balance, explain, report, hub) go through columns.ScoreColumns."""

import json

import numpy as np
import pandas as pd
from datasets import Dataset

from rose_trl.outputs.explain import explain_row, load_contributions, selected_for, write_contributions
from rose_trl.outputs.hub import build_dataset_card
from rose_trl.outputs.report import load_selection, render_report
from rose_trl.outputs.selection import write_selection
from rose_trl.scoring.columns import ScoreColumns
from rose_trl.scoring.scores import CheckpointGradients, score_checkpoints, validation_targets
from rose_trl.stores.store import GradientStore


SUBTASKS = ["ckpt0", "score"]


def test_columns_of_ordinary_and_awkward_subtask_names():
    plain = ScoreColumns.for_table(["polite", "safe"], 3)
    assert plain.subtask_columns == ["score_polite", "score_safe"]
    assert plain.checkpoints == ("score_ckpt0", "score_ckpt1", "score_ckpt2")  # the layout outputs have always had
    awkward = ScoreColumns.for_table(SUBTASKS, 2)
    assert awkward.subtask_columns == ["score_ckpt0", "score_score"]
    assert awkward.checkpoints == ("score__ckpt0", "score__ckpt1")
    columns = ["pool_index", "score", *awkward.subtask_columns, *awkward.checkpoints, "selected"]
    assert ScoreColumns.read(columns, SUBTASKS) == awkward
    assert ScoreColumns.read(["score", "score_polite", "score_ckpt0"]) == ScoreColumns(("polite",), ("score_ckpt0",))
    assert ScoreColumns.read(["score"], ["a", "b"]) == ScoreColumns()  # a baseline without per-subtask scores


def stores(tmp_path, n_pool=40, dim=16, n_ckpt=2):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_ckpt):
        store = GradientStore.open_or_create(
            tmp_path / f"train{i}",
            model="m",
            checkpoint=f"c{i}",
            projection={"type": "sjlt", "dim": dim, "seed": 0},
            gradient_type="adam",
            pool_fingerprint="p",
            num_rows=n_pool,
            dtype="float32",
        )
        store.write(np.arange(n_pool), rng.normal(size=(n_pool, dim)).astype(np.float32))
        out.append(store)
    return out, {f"c{i}": rng.normal(size=(6, dim)) for i in range(n_ckpt)}


def test_subtasks_named_ckpt0_and_score_through_every_reader(tmp_path):
    trains, val_grads = stores(tmp_path)
    labels = ["ckpt0", "ckpt0", "ckpt0", "score", "score", "score"]
    targets = validation_targets(val_grads, labels)
    assert targets.subtasks == SUBTASKS
    checkpoints = [
        CheckpointGradients(f"c{i}", s, targets.targets[i], lr, pair_vectors=targets.vectors[i])
        for i, (s, lr) in enumerate(zip(trains, [2e-4, 1e-4], strict=True))
    ]
    table = score_checkpoints(checkpoints, targets.subtasks)
    assert list(table) == ["score", "score_ckpt0", "score_score", "score__ckpt0", "score__ckpt1"]
    np.testing.assert_array_equal(table["score"], np.maximum(table["score_ckpt0"], table["score_score"]))

    pool = Dataset.from_dict({"prompt": [f"q{i}" for i in range(40)], "completion": [f"a{i}" for i in range(40)]})
    validation = Dataset.from_dict(
        {"prompt": [f"p{i}" for i in range(6)], "chosen": ["c"] * 6, "rejected": ["r"] * 6, "subtask": labels}
    )
    write = lambda tmp, chosen: write_contributions(tmp, checkpoints, chosen, validation, targets.usable) or {}  # noqa: E731
    folder = write_selection(
        tmp_path,
        pool,
        table,
        0.25,
        {"selection_method": "rose"},
        "rose",
        targets.subtasks,
        subtask_balance="round_robin",
        pair_counts={"ckpt0": 3, "score": 3},
        before_publish=write,
    )
    scores = pd.read_parquet(folder / "scores.parquet")
    assert json.loads((folder / "summary.json").read_text())["subtask_counts"] == {"ckpt0": 5, "score": 5}

    # explain's identity: a selected row's subtask score is the mean of its pairs' contributions
    contributions = load_contributions(folder)
    for subtask, column in zip(SUBTASKS, ["score_ckpt0", "score_score"], strict=True):
        means = contributions[contributions["subtask"] == subtask].groupby("pool_index")["contribution"].mean()
        np.testing.assert_allclose(
            means.to_numpy(), scores.set_index("pool_index").loc[means.index, column], rtol=1e-5
        )

    run = load_selection(folder)
    assert run.subtask_columns == ["score_ckpt0", "score_score"]
    assert run.checkpoint_columns == ["score__ckpt0", "score__ckpt1"]
    assert set(run.owners) == set(SUBTASKS)
    assert selected_for(scores.drop(columns="selected_for"), SUBTASKS).isin(SUBTASKS).all()
    assert "Spearman correlation" in render_report([run])

    row = int(scores.loc[scores["selected"], "pool_index"].iloc[0])
    text, problem = explain_row(tmp_path, row)
    assert problem is None and "per-subtask scores: ckpt0 " in text and ", score " in text
    card = build_dataset_card(tmp_path)
    assert "ckpt0" in card and "10" in card
