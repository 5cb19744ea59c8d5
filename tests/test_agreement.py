"""rose_trl.scoring.agreement: the validation pairs' agreement, the target's reliability, and where users see them."""

import json
import math

import numpy as np
import pytest

from rose_trl.cli import main
from rose_trl.scoring.agreement import (
    RELIABILITY_THRESHOLD,
    across_subtasks,
    agreement_warnings,
    between_agreement,
    pair_agreement,
    pairs_needed,
    reliability,
    validation_agreement,
)
from tests.test_explain import run  # noqa: F401  (the module's tiny ROSE run, a fixture)


def brute_agreement(vectors):
    units = [v / np.linalg.norm(v) for v in vectors if np.linalg.norm(v) > 0]
    return np.mean([units[i] @ units[j] for i in range(len(units)) for j in range(len(units)) if i != j])


def test_pair_agreement_is_the_mean_pairwise_cosine():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 11)) + 2.0  # a shared direction: positive agreement
    assert math.isclose(pair_agreement(vectors), brute_agreement(vectors))
    assert pair_agreement(vectors) > 0.5
    with_zero = np.vstack([vectors, np.zeros(11)])  # a zero-gradient pair is left out
    assert math.isclose(pair_agreement(with_zero), pair_agreement(vectors))
    assert pair_agreement(vectors[:1]) is None and pair_agreement(np.zeros((3, 4))) is None
    assert math.isclose(pair_agreement(np.array([[1.0, 0], [-1.0, 0]])), -1.0)


def test_reliability_and_pairs_needed():
    assert reliability(None, 3) is None and reliability(-0.2, 10) == 0.0 and reliability(0.0, 50) == 0.0
    assert math.isclose(reliability(1.0, 4), 1.0) and math.isclose(reliability(0.25, 1), 0.25)
    assert math.isclose(reliability(0.1, 10), 1.0 / 1.9)
    for a in (0.005, 0.03, 0.1, 0.4, 0.9):
        k = pairs_needed(a)
        assert reliability(a, k) >= RELIABILITY_THRESHOLD - 1e-12  # k pairs reach the threshold
        assert k == 2 or reliability(a, k - 1) < RELIABILITY_THRESHOLD  # and no fewer do
    assert pairs_needed(0.0) is None and pairs_needed(-0.1) is None and pairs_needed(None) is None


def test_validation_agreement_weighs_checkpoints_and_flags_subtasks():
    rng = np.random.default_rng(1)
    shared = rng.normal(size=16)
    agree = np.stack([shared + 0.3 * rng.normal(size=16) for _ in range(4)])  # "a": agreeing pairs
    noise = rng.normal(size=(4, 16))  # "b": unrelated pairs
    single = rng.normal(size=(1, 16))  # "c": one pair
    vectors = [np.vstack([agree, noise, single]), np.vstack([agree[::-1], -noise, single])]
    subtasks = ["a"] * 4 + ["b"] * 4 + ["c"]
    report = validation_agreement(vectors, [3.0, 1.0], subtasks)
    assert list(report) == ["a", "b", "c"]
    expected_b = 0.75 * brute_agreement(noise) + 0.25 * brute_agreement(-noise)  # eta-weighted over checkpoints
    assert math.isclose(report["b"]["agreement"], expected_b)
    assert report["a"]["pairs"] == 4 and report["a"]["agrees"] is True and report["a"]["reliability"] > 0.9
    assert report["b"]["agrees"] is False and report["c"]["agrees"] is None and report["c"]["agreement"] is None
    usable = np.ones(9, dtype=bool)
    usable[:3] = False  # three of a's pairs left out: one is left, and it cannot be checked
    assert validation_agreement(vectors, [1.0, 1.0], subtasks, usable)["a"] == {
        "pairs": 1,
        "agreement": None,
        "reliability": None,
        "pairs_needed": None,
        "threshold": RELIABILITY_THRESHOLD,
        "agrees": None,
    }
    warnings = agreement_warnings(report)
    assert len(warnings) == 2 and warnings[0].startswith("subtask 'b': its 4 validation pairs agree at")
    assert "the picks will follow single pairs" in warnings[0] and "What helps: more validation pairs" in warnings[0]
    assert warnings[1].startswith("subtask 'c' has a single validation pair")


def test_a_run_reports_its_agreement_in_the_summary_the_report_and_explain(run, capsys):  # noqa: F811
    """On the tiny run: summary.json's numbers are recomputed from the stores, and the report and `rose-trl
    explain` show them."""
    from rose_trl.stores.store import GradientStore

    summary = json.loads((run / "selection" / "summary.json").read_text())
    report = summary["validation_agreement"]
    pairs = json.loads((run / "rose" / "checkpoints.json").read_text())["checkpoints"]
    eta = np.array([c["learning_rate"] for c in pairs])
    import pandas as pd

    subtasks = pd.read_parquet(run / "selection" / "pairs.parquet")["subtask"].to_numpy()
    for name, s in report.items():
        values = [
            brute_agreement(
                GradientStore.open(run / "rose" / "val_dpo" / c["name"])
                .read_all()
                .astype(np.float64)[subtasks == name]
            )
            for c in pairs
        ]
        assert math.isclose(s["agreement"], float(np.dot(eta / eta.sum(), values)), rel_tol=1e-6, abs_tol=1e-9)
        assert s["pairs"] == int((subtasks == name).sum()) and s["threshold"] == RELIABILITY_THRESHOLD
    assert summary["agreement_warnings"] == agreement_warnings(report)

    from rose_trl.outputs.report import write_report

    page = write_report(run).read_text()
    assert "Do the validation pairs agree?" in page and "agreement (mean gradient cosine)" in page
    for warning in summary["agreement_warnings"]:
        assert warning.split(":")[0] in page

    scores = pd.read_parquet(run / "selection" / "scores.parquet")
    best = int(scores.loc[scores["score"].idxmax(), "pool_index"])
    owner = scores.set_index("pool_index").loc[best, "selected_for"]
    assert main(["explain", str(run), str(best)]) == 0
    out = capsys.readouterr().out
    s = report[owner]
    assert f"validation pairs of {owner!r}: {s['pairs']}, agreement {s['agreement']:+.3f}" in out
    assert ("warning: the pairs do not agree" in out) == (not s["agrees"])


@pytest.mark.parametrize("a, k, agrees", [(0.3, 10, True), (0.01, 10, False)])
def test_the_threshold_decides(a, k, agrees):
    unit = np.eye(k + 1)[:k]  # k orthonormal directions, mixed with a shared one to reach agreement a
    vectors = math.sqrt(1 - a) * unit + math.sqrt(a) * np.eye(k + 1)[k]
    report = validation_agreement([vectors], [1.0], ["x"] * k)
    assert math.isclose(report["x"]["agreement"], a) and report["x"]["agrees"] is agrees


def test_across_subtasks_gives_the_between_agreement_and_the_merged_subtask():
    rng = np.random.default_rng(2)
    shared = rng.normal(size=32)
    vectors = np.stack([shared + 0.5 * rng.normal(size=32) for _ in range(6)])
    vectors[5] = 0.0  # a zero-gradient pair: left out of everything
    subtasks = ["a", "a", "b", "c", "d", "d"]
    usable = np.array([True, True, True, True, True, False])
    across = across_subtasks([vectors, 2 * vectors], [1.0, 3.0], subtasks, usable)
    units = [v / np.linalg.norm(v) for v in vectors[:5]]
    labels = subtasks[:5]
    brute_between = np.mean(
        [units[i] @ units[j] for i in range(5) for j in range(5) if i != j and labels[i] != labels[j]]
    )
    assert math.isclose(across["between"], brute_between)
    assert math.isclose(across["merged"]["agreement"], brute_agreement(vectors[:5]))
    assert across["merged"]["pairs"] == 5 and across["subtasks"] == 4
    assert math.isclose(across["merged"]["reliability"], reliability(across["merged"]["agreement"], 5))
    assert across["single_pair_subtasks"] == ["b", "c", "d"]  # d's second pair is not usable
    assert between_agreement(vectors[:2], ["a", "a"]) is None  # one subtask: no pair of different subtasks


def one_pair_subtasks(n, a, seed=0):
    """n unit vectors whose pairwise cosines are all a (a shared direction and orthogonal particulars)."""
    particular = np.eye(n + 1)[:n]
    return math.sqrt(1 - a) * particular + math.sqrt(a) * np.eye(n + 1)[n]


def test_one_pair_subtasks_get_one_warning_with_the_across_and_merged_figures():
    """The paper's HH design, 1 pair a subtask: 10 one-pair subtasks whose pairs all express one preference got 10
    "cannot be measured" warnings; now one sentence says how they agree across subtasks and what merging gives."""
    names = [f"s{i}" for i in range(10)]
    vectors = [one_pair_subtasks(10, 0.3)]
    report = validation_agreement(vectors, [1.0], names)
    assert all(s["agrees"] is None for s in report.values())
    assert len(agreement_warnings(report)) == 10  # without the across figures: one per subtask, as before
    across = across_subtasks(vectors, [1.0], names)
    assert math.isclose(across["between"], 0.3) and math.isclose(across["merged"]["agreement"], 0.3)
    warnings = agreement_warnings(report, across)
    assert len(warnings) == 1
    (text,) = warnings
    assert text.startswith("10 subtasks hold a single validation pair each ('s0', 's1'")
    assert "and 4 more" in text and "across subtasks the pairs agree at +0.300" in text
    merged = reliability(0.3, 10)
    assert f"merged into one subtask of 10 pairs they would agree at +0.300, a reliability of {merged:.2f}" in text
    assert "at or over the threshold" in text and "give the pairs one subtask" in text
    # Pairs that disagree across subtasks (half of them prefer the opposite): the merged subtask falls short too.
    split = one_pair_subtasks(10, 0.3)
    split[5:, 10] *= -1
    opposed = [split]
    text = agreement_warnings(validation_agreement(opposed, [1.0], names), across_subtasks(opposed, [1.0], names))
    assert len(text) == 1 and "agree at -0.033" in text[0] and "under the threshold" in text[0]
    assert "no number of such pairs reaches it" in text[0] and "What helps: more validation pairs" in text[0]
    # Next to subtasks of several pairs, those keep their own sentence.
    mixed = np.vstack([one_pair_subtasks(3, 0.3), np.eye(4)[:2, :4] @ np.eye(4, 4)])
    labels = ["x", "y", "z", "w", "w"]
    out = agreement_warnings(validation_agreement([mixed], [1.0], labels), across_subtasks([mixed], [1.0], labels))
    assert len(out) == 2 and out[0].startswith("3 subtasks hold a single validation pair each")
    assert out[1].startswith("subtask 'w': its 2 validation pairs agree at")
