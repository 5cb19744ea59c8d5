"""What a selection costs, through the recipe's pipeline on the tiny task: `gradient_layers` (stores and fingerprints
record it), `selection_checkpoints` (left-out checkpoints get no stores; another subset re-scores from the stores
with no gradient pass) and `prefilter_fraction` (the full features of the first pass's candidates only)."""

import json

import numpy as np
import pandas as pd
import pytest

from rose_trl.config import ROSEConfig
from rose_trl.outputs.explain import explain_row
from rose_trl.resources.cost import FORWARD_SHARE, SelectionWork, pass_cost
from rose_trl.run.ledger import RunLedger, resolve_checkpoints
from rose_trl.run.pipeline import run
from rose_trl.scoring.scores import normalized_weights, unit_dots
from rose_trl.stores.store import GradientStore, StoreMismatchError
from tests.helpers import counting_gradient_passes


EPOCHS = {"num_train_epochs": 3}  # three checkpoints
COMMON = dict(projection_dim=512, selection_fraction=0.1, warmup_fraction=0.25)


def scores(out, folder="selection") -> pd.DataFrame:
    return pd.read_parquet(out / folder / "scores.parquet")


def ledger(out) -> list[dict]:
    return json.loads((out / "rose" / "checkpoints.json").read_text())["checkpoints"]


def manual_scores(out, names: list[str], rows=None) -> np.ndarray:
    """score = sum over `names` of eta_i (renormalized over them) * cos(mean unit validation gradient, row), one
    subtask at a time, max over subtasks: written out from the stores."""
    entries = {c["name"]: c["learning_rate"] for c in ledger(out)}
    eta = normalized_weights([entries[n] for n in names])
    subtasks = json.loads((out / "selection" / "summary.json").read_text())["subtasks"]
    labels = np.asarray([json.loads(line)["subtask"] for line in open(out.parent / "assets" / "validation.jsonl")])
    total = 0
    for weight, name in zip(eta, names, strict=True):
        train = GradientStore.open(out / "rose" / "train" / name)
        values = train.read_all() if rows is None else train.read_rows(rows)
        val = GradientStore.open(out / "rose" / "val_dpo" / name).read_all()
        unit = val / np.linalg.norm(val, axis=1, keepdims=True)
        targets = np.stack([unit[labels == s].mean(axis=0) for s in subtasks], axis=1)
        total = total + weight * unit_dots(values, targets)
    return total.max(axis=1)


@pytest.fixture(scope="module")
def full_run(assets, configs, tmp_path_factory):
    """Every checkpoint, every layer: the full method, once."""
    root = tmp_path_factory.mktemp("cost")
    (root / "assets").symlink_to(assets)
    out = root / "full"
    run(*configs(assets, out, sft=EPOCHS, **COMMON))
    return out


def test_resolve_checkpoints_python_style_and_errors():
    assert resolve_checkpoints(None, 3) == [0, 1, 2]
    assert resolve_checkpoints([-1], 3) == [2]
    assert resolve_checkpoints([-1, 0], 3) == [0, 2]
    with pytest.raises(
        ValueError, match=r"selection_checkpoints \[3\]: 3 is out of range: the warm-up has 3 checkpoints"
    ):
        resolve_checkpoints([3], 3)
    with pytest.raises(ValueError, match="names a checkpoint twice"):
        resolve_checkpoints([0, -3], 3)
    with pytest.raises(ValueError, match="prefilter_fraction"):
        ROSEConfig(prefilter_fraction=0.05, selection_fraction=0.1)
    with pytest.raises(ValueError, match="gradient_layers"):
        ROSEConfig(gradient_layers=0)


def test_selection_work_counts_the_passes_the_options_leave():
    full = SelectionWork(pool_rows=200, checkpoints=2, chosen=2, layers=None, total_layers=30)
    assert full.share == 1.0 and full.row_passes == 400
    assert pass_cost(30, 30) == 1.0 and pass_cost(0, 30) == FORWARD_SHARE
    last = SelectionWork(pool_rows=200, checkpoints=2, chosen=1, layers=6, total_layers=30)
    assert last.share == pytest.approx((FORWARD_SHARE + (1 - FORWARD_SHARE) * 0.2) / 2)
    first = SelectionWork(200, 2, 2, None, 30, prefilter_fraction=0.2, prefilter_layers=3)
    assert first.candidates == 40
    assert first.row_passes == pytest.approx(200 * pass_cost(3, 30) + 40 * 2)
    text = first.describe()
    assert "a first pass over 200 rows (3 of 30 layers) at 1 checkpoint; the 40 rows it keeps at 2 of 2" in text
    assert f"about {first.share:.2f} of the full method's pool gradient work (400 row passes" in text


def test_another_checkpoint_subset_rescores_from_the_stores_with_no_gradient_pass(
    full_run, assets, configs, monkeypatch
):
    names = [c["name"] for c in ledger(full_run)]
    assert len(names) == 3 and all(c["stores"] for c in ledger(full_run))
    full = scores(full_run)["score"].to_numpy()
    np.testing.assert_allclose(full, manual_scores(full_run, names), atol=1e-6)
    writes = []
    monkeypatch.setattr(GradientStore, "write", lambda self, rows, values: writes.append(self.path))
    for subset, chosen in (([-1], [2]), ([0, -1], [0, 2])):
        with counting_gradient_passes() as counter:
            run(*configs(assets, full_run, sft=EPOCHS, selection_checkpoints=subset, **COMMON))
        assert counter["passes"] == 0 and writes == []
        table = scores(full_run)
        assert [c for c in table.columns if c.startswith("score_ckpt")] == [
            f"score_ckpt{i}" for i in range(len(chosen))
        ]
        np.testing.assert_allclose(table["score"], manual_scores(full_run, [names[i] for i in chosen]), atol=1e-6)
        config = json.loads((full_run / "selection" / "config.json").read_text())
        assert config["selection_checkpoints"] == subset
        assert [c["name"] for c in config["checkpoints"]] == [names[i] for i in chosen]
    with pytest.raises(
        ValueError, match=r"selection_checkpoints \[5\]: 5 is out of range: the warm-up has 3 checkpoints"
    ):
        run(*configs(assets, full_run, sft=EPOCHS, selection_checkpoints=[5], **COMMON))


def test_left_out_checkpoints_get_no_stores_and_the_same_scores(full_run, assets, configs):
    """A live warm-up with selection_checkpoints [-1] computes the last checkpoint's stores only, and selects what
    the full run re-scored with [-1] selects (the same warm-up, seeded)."""
    out = full_run.parent / "last"
    run(*configs(assets, out, sft=EPOCHS, selection_checkpoints=[-1], **COMMON))
    entries = ledger(out)
    assert [c["stores"] for c in entries] == [False, False, True]
    assert [c["name"] for c in entries] == [c["name"] for c in ledger(full_run)]
    assert sorted(p.name for p in (out / "rose" / "train").iterdir()) == [entries[-1]["name"]]
    assert sorted(p.name for p in (out / "rose" / "val_dpo").iterdir()) == [entries[-1]["name"]]
    last = scores(out)
    np.testing.assert_allclose(last["score"], manual_scores(full_run, [entries[-1]["name"]]), atol=1e-6)
    # scoring every checkpoint now needs the stores that were left out: said, with what to do
    with pytest.raises(ValueError, match="no gradient stores"):
        RunLedger(out / "rose").scoring_learning_rates(None, None)


def test_gradient_layers_are_recorded_and_a_store_of_other_layers_is_refused(full_run, assets, configs):
    out = full_run.parent / "layers"
    run(*configs(assets, out, sft={"num_train_epochs": 1}, gradient_layers=1, **COMMON))
    name = ledger(out)[0]["name"]
    for folder in ("train", "val_dpo"):
        assert GradientStore.open(out / "rose" / folder / name).meta["gradient_layers"] == 1
    assert json.loads((out / "rose" / "run.json").read_text())["gradient_layers"] == 1
    with pytest.raises(StoreMismatchError, match="gradient_layers"):
        run(*configs(assets, out, sft={"num_train_epochs": 1}, **COMMON))


def test_prefilter_computes_the_candidates_only_and_selects_among_them(full_run, assets, configs, caplog):
    """On the full run's output_dir (its stores complete): the first pass (1 layer at the first checkpoint) ranks
    the pool, the selection is the full scores' top rows among its candidates, and explain says why a row was
    left out. A fresh run computes the full features of the candidates only."""
    options = dict(prefilter_fraction=0.3, prefilter_layers=1, **COMMON)
    run(*configs(assets, full_run, sft=EPOCHS, **options))
    table = scores(full_run)
    summary = json.loads((full_run / "selection" / "summary.json").read_text())
    kept = ~table["prefiltered_out"].to_numpy()
    assert kept.sum() == summary["prefilter"]["candidates"] == 36  # ceil(0.3 * 120)
    # candidates: the first pass's top 30%; the full scores of the candidates are the full run's
    first = table["prefilter_score"].to_numpy()
    assert first[kept].min() >= first[~kept].max()
    names = [c["name"] for c in ledger(full_run)]
    np.testing.assert_allclose(table["score"].to_numpy()[kept], manual_scores(full_run, names)[kept], atol=1e-6)
    assert table.loc[~kept, "score"].isna().all()
    picked = table["selected"].to_numpy()
    assert picked.sum() == 12 and not (picked & ~kept).any()
    threshold = table.loc[picked, "score"].min()
    assert (table.loc[kept & ~picked, "score"] <= threshold).all()
    # the first pass's scores are those of a run with gradient_layers 1 at the first checkpoint
    one = full_run.parent / "one_layer_first_checkpoint"
    run(*configs(assets, one, sft=EPOCHS, gradient_layers=1, selection_checkpoints=[0], **COMMON))
    np.testing.assert_allclose(first, scores(one)["score"], atol=1e-6)
    # explain: a selected row pair by pair, a row the first pass left out said so
    text, problem = explain_row(full_run, int(table.index[picked][0]))
    assert problem is None and "top" in text
    text, problem = explain_row(full_run, int(np.flatnonzero(~kept)[0]))
    assert "left out by the first pass" in text and problem is not None
    # a fresh run: full features for the candidates only, at every checkpoint
    fresh = full_run.parent / "prefilter"
    caplog.clear()
    with caplog.at_level("WARNING"):
        run(*configs(assets, fresh, sft=EPOCHS, **options))
    plans = [r.getMessage() for r in caplog.records if "memory plan:" in r.getMessage()]
    assert (
        len(plans) == 1 and "selection passes: a first pass over 120 rows (1 of 2 layers) at 1 checkpoint" in plans[0]
    )
    assert "the 36 rows it keeps at 3 of 3 checkpoints (2 of 2 layers)" in plans[0]
    fresh_table = scores(fresh)
    candidates = np.flatnonzero(~fresh_table["prefiltered_out"].to_numpy())
    for name in names:
        done = GradientStore.open(fresh / "rose" / "train" / name).done_mask()
        assert np.array_equal(np.flatnonzero(done), candidates)
    assert GradientStore.open(fresh / "rose" / "prefilter_l1" / "train" / names[0]).is_complete
    np.testing.assert_array_equal(fresh_table["selected"], table["selected"])
