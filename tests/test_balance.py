"""subtask_balance: max lets a subtask with higher scores crowd the others out; round_robin and proportional share."""

import json

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from rose_trl.config import ROSEConfig
from rose_trl.outputs.selection import write_selection
from rose_trl.scoring.scores import largest_remainder_quotas, select_rows, selection_size


SUBTASKS = ["loud", "quiet", "tiny"]
PAIRS = {"loud": 2, "quiet": 4, "tiny": 6}


def shifted_table(n=1000, seed=0):
    """Independent scores per subtask; `loud`'s run 1.0 higher, as a subtask whose pairs agree more would."""
    rng = np.random.default_rng(seed)
    table = {f"score_{s}": rng.normal(0, 0.1, n) + (1.0 if s == "loud" else 0.0) for s in SUBTASKS}
    table["score"] = np.max([table[f"score_{s}"] for s in SUBTASKS], axis=0)
    return table


def counts(selected_for):
    return {s: int((np.asarray(selected_for) == s).sum()) for s in SUBTASKS}


def test_max_lets_the_shifted_subtask_crowd_the_others_out():
    chosen, owner = select_rows(shifted_table(), SUBTASKS, 0.05)
    assert len(chosen) == selection_size(1000, 0.05) == 50
    assert counts(owner) == {"loud": 50, "quiet": 0, "tiny": 0}


def test_round_robin_gives_equal_shares():
    table = shifted_table()
    chosen, owner = select_rows(table, SUBTASKS, 0.05, "round_robin")
    assert len(chosen) == len(set(chosen.tolist())) == 50
    assert counts(owner) == {"loud": 17, "quiet": 17, "tiny": 16}  # 50 = 17 + 17 + 16, earlier subtasks first
    # each subtask's picks are its own best rows, except for rows another subtask took first
    for s in SUBTASKS:
        mine = chosen[owner == s]
        assert table[f"score_{s}"][mine].min() >= np.sort(table[f"score_{s}"])[-(len(mine) + 50)]
    assert list(table["score"][chosen]) == sorted(table["score"][chosen], reverse=True)  # saved best first


def test_proportional_follows_the_validation_pairs():
    chosen, owner = select_rows(shifted_table(), SUBTASKS, 0.05, "proportional", PAIRS)
    assert len(set(chosen.tolist())) == 50
    # 50 * (2, 4, 6) / 12 = 8.33, 16.67, 25: largest remainders round to 8, 17, 25
    assert counts(owner) == {"loud": 8, "quiet": 17, "tiny": 25}
    with pytest.raises(ValueError, match="needs the number of validation pairs"):
        select_rows(shifted_table(), SUBTASKS, 0.05, "proportional", {"loud": 2})


def test_largest_remainder_quotas_sum_to_k():
    assert largest_remainder_quotas(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert largest_remainder_quotas(7, [5, 1]).tolist() == [6, 1]
    rng = np.random.default_rng(0)
    for _ in range(50):
        k, w = int(rng.integers(1, 500)), rng.integers(1, 30, size=int(rng.integers(1, 19)))
        q = largest_remainder_quotas(k, w.tolist())
        assert q.sum() == k and (np.abs(q - k * w / w.sum()) < 1).all()


def test_every_row_when_the_fraction_is_one():
    """Quotas can exceed a subtask's best rows only by taking everything: then every row, once."""
    table = shifted_table(n=30)
    chosen, owner = select_rows(table, SUBTASKS, 1.0, "round_robin")
    assert sorted(chosen.tolist()) == list(range(30)) and counts(owner) == {"loud": 10, "quiet": 10, "tiny": 10}


def test_write_selection_records_the_counts(tmp_path):
    pool = Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(1000)])
    for balance, expected in (
        ("max", {"loud": 50, "quiet": 0, "tiny": 0}),
        ("round_robin", {"loud": 17, "quiet": 17, "tiny": 16}),
    ):
        sel = write_selection(
            tmp_path,
            pool,
            shifted_table(),
            0.05,
            {},
            "rose",
            SUBTASKS,
            folder=balance,
            subtask_balance=balance,
            pair_counts=PAIRS,
        )
        summary = json.loads((sel / "summary.json").read_text())
        assert summary["subtask_balance"] == balance and summary["subtask_counts"] == expected
        scores = pd.read_parquet(sel / "scores.parquet")
        assert scores["selected_for"].isna().sum() == 950
        assert (
            scores.loc[scores["selected"], "selected_for"].value_counts().reindex(SUBTASKS, fill_value=0).to_dict()
            == expected
        )


def test_balance_without_subtask_scores_takes_the_top_rows(caplog):
    """random/full baselines score no subtask: there is nothing to balance."""
    for balance in ("max", "round_robin"):
        chosen, owner = select_rows({"score": np.arange(10.0)}, ["a", "b"], 0.2, balance)
        assert chosen.tolist() == [9, 8] and owner is None
    assert "subtask_balance 'round_robin': the score table has no score_<subtask> column" in caplog.text
    with pytest.raises(ValueError, match="unknown subtask_balance 'fair'"):
        select_rows({"score": np.arange(10.0)}, ["a"], 0.2, "fair")
    with pytest.raises(ValueError, match="subtask_balance must be one of"):
        ROSEConfig(subtask_balance="fair")
