"""Per-pair contributions on a real tiny run: the exact decomposition of the scores, the files, `rose-trl explain`."""

import dataclasses
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from trl import SFTTrainer

from rose_trl.cli import main
from rose_trl.config import ROSEConfig
from rose_trl.models.tiny import build_tiny_llama
from rose_trl.outputs.explain import top_contributor_counts, top_pairs
from rose_trl.outputs.selection import write_selection
from rose_trl.run.callback import ROSECallback
from rose_trl.run.pipeline import sft_training_dataset, warmup_indices
from rose_trl.run.selector import ROSESelector
from rose_trl.scoring.scores import contribution_chunks
from rose_trl.stores.store import GradientStore
from tests.test_rose_end_to_end import LORA, sft_args


CONFIG = dict(projection_dim=512, selection_fraction=0.1)


@pytest.fixture(scope="module")
def run(tmp_path_factory, planted):
    pool, validation, tokenizer, _ = planted
    out = tmp_path_factory.mktemp("explain_run")
    warm = sft_training_dataset(pool.select(warmup_indices(len(pool), 0.2, 0)), tokenizer, 256, "warm-up")
    callback = ROSECallback(pool, validation, tokenizer, ROSEConfig(**CONFIG), max_length=256)
    SFTTrainer(
        build_tiny_llama(tokenizer),
        args=dataclasses.replace(sft_args(out), num_train_epochs=2),
        train_dataset=warm,
        processing_class=tokenizer,
        peft_config=LORA,
        callbacks=[callback],
    ).train()
    return out


def refinalize(out, planted, folder, **config):
    """Another selection from the run's stores (no gradient pass: every store is complete)."""
    pool, validation, tokenizer, _ = planted
    selector = ROSESelector(
        pool, validation, tokenizer, ROSEConfig(**CONFIG, **config), out, max_length=256, use_cpu=True, progress=False
    )
    return selector.finalize(folder)


def plain_contributions(out, subtasks, rows, mode):
    """c(z, p) from the definition, on the stores read whole: sum_i eta_i <v_ip, unit(train_iz)>."""
    manifest = json.loads((out / "rose" / "checkpoints.json").read_text())["checkpoints"]
    eta = np.array([c["learning_rate"] for c in manifest])
    eta /= eta.sum()
    total = 0
    for i, c in enumerate(manifest):
        train = GradientStore.open(out / "rose" / "train" / c["name"]).read_all()[rows].astype(np.float64)
        val = GradientStore.open(out / "rose" / "val_dpo" / c["name"]).read_all().astype(np.float64)
        v = val / np.linalg.norm(val, axis=1, keepdims=True)
        if mode == "eq6":  # the pair's raw gradient over the norm of its subtask's mean gradient
            for s in set(subtasks):
                v[subtasks == s] = val[subtasks == s] / np.linalg.norm(val[subtasks == s].mean(0))
        total = total + eta[i] * (train / np.linalg.norm(train, axis=1, keepdims=True)) @ v.T
    return total


@pytest.mark.parametrize("mode", ["normalized_mean", "eq6"])
def test_contributions_decompose_the_scores_exactly(run, planted, mode):
    sel = (
        run / "selection"
        if mode == "normalized_mean"
        else refinalize(run, planted, "selection_eq6", validation_aggregation=mode)
    )
    scores = pd.read_parquet(sel / "scores.parquet")
    contrib = pd.read_parquet(sel / "contributions.parquet")
    chosen = np.sort(scores.loc[scores["selected"], "pool_index"].to_numpy())
    n_pairs = len(planted[1])
    assert len(contrib) == len(chosen) * n_pairs and sorted(contrib["pool_index"].unique()) == chosen.tolist()
    # score_<j>(z) = mean over the pairs p of j of c(z, p), to 1e-5
    means = contrib.groupby(["pool_index", "subtask"])["contribution"].mean().unstack()
    for subtask in ("polite", "safe"):
        np.testing.assert_allclose(
            means[subtask].to_numpy(),
            scores.set_index("pool_index").loc[chosen, f"score_{subtask}"],
            atol=1e-5,
            rtol=0,
        )
    # and each c(z, p) is the definition's value
    subtasks = np.asarray(planted[1]["subtask"])
    wide = contrib.pivot(index="pool_index", columns="pair_index", values="contribution").loc[chosen]
    np.testing.assert_allclose(wide.to_numpy(), plain_contributions(run, subtasks, chosen, mode), atol=2e-5, rtol=0)
    pairs = pd.read_parquet(sel / "pairs.parquet")
    assert pairs["pair_index"].tolist() == list(range(n_pairs)) and pairs["usable"].all()
    assert pairs.loc[0, "chosen"] == planted[1][0]["chosen"]


def test_contributions_stream_in_bounded_chunks(run, planted):
    """Small chunks give the same numbers as one chunk: rows are read back in pieces, never all at once."""
    pool, validation, tokenizer, _ = planted
    selector = ROSESelector(
        pool, validation, tokenizer, ROSEConfig(**CONFIG), run, max_length=256, use_cpu=True, progress=False
    )
    checkpoints, _ = selector.checkpoints()
    rows = np.array([3, 4, 5, 17, 100, 101, 299])
    pairs = np.arange(len(validation))
    whole = np.concatenate([v for _, v in contribution_chunks(checkpoints, rows, pairs)])
    pieces = list(contribution_chunks(checkpoints, rows, pairs, chunk_rows=2))
    assert [c.tolist() for c, _ in pieces] == [[3, 4], [5, 17], [100, 101], [299]]
    np.testing.assert_allclose(np.concatenate([v for _, v in pieces]), whole, rtol=0, atol=1e-7)  # float32 BLAS


def test_zero_gradient_pairs_are_left_out_and_named(run, planted, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(run / "rose", out / "rose")
    manifest = json.loads((out / "rose" / "checkpoints.json").read_text())["checkpoints"]
    store = GradientStore.open(out / "rose" / "val_dpo" / manifest[1]["name"])
    store.write(np.array([1]), np.zeros((1, store.dim), dtype=np.float32))
    with caplog.at_level(logging.WARNING):
        sel = refinalize(out, planted, "selection")
    assert "validation pairs [1] have a zero gradient" in caplog.text
    summary = json.loads((sel / "summary.json").read_text())
    assert summary["left_out_pairs"] == [1] and summary["zero_gradient_pairs"] == {manifest[1]["name"]: [1]}
    contrib = pd.read_parquet(sel / "contributions.parquet")
    assert 1 not in set(contrib["pair_index"]) and not pd.read_parquet(sel / "pairs.parquet")["usable"][1]
    scores = pd.read_parquet(sel / "scores.parquet").set_index("pool_index")
    means = contrib.groupby(["pool_index", "subtask"])["contribution"].mean().unstack()
    np.testing.assert_allclose(means["polite"], scores.loc[means.index, "score_polite"], atol=1e-5, rtol=0)
    # every pair of a subtask at zero: that subtask has no direction
    safe = np.flatnonzero(np.asarray(planted[1]["subtask"]) == "safe")
    store.write(safe, np.zeros((len(safe), store.dim), dtype=np.float32))
    with pytest.raises(ValueError, match=rf"{manifest[0]['name']}: subtask 'safe' has no usable validation pair"):
        refinalize(out, planted, "selection")


def test_round_robin_on_a_run_gives_equal_counts(run, planted):
    sel = refinalize(run, planted, "selection_rr", subtask_balance="round_robin")
    summary = json.loads((sel / "summary.json").read_text())
    assert summary["subtask_balance"] == "round_robin" and summary["subtask_counts"] == {"polite": 15, "safe": 15}
    scores = pd.read_parquet(sel / "scores.parquet")
    assert scores.loc[scores["selected"], "selected_for"].value_counts().to_dict() == {"polite": 15, "safe": 15}
    base = json.loads((run / "selection" / "summary.json").read_text())
    assert base["subtask_balance"] == "max" and sum(base["subtask_counts"].values()) == 30


def test_top_pairs_and_top_contributor_counts():
    contrib = pd.DataFrame(
        {
            "pool_index": [7] * 4 + [9] * 4,
            "pair_index": [0, 1, 2, 3] * 2,
            "subtask": ["a", "a", "b", "b"] * 2,
            "contribution": [0.1, 0.3, 0.9, 0.0, 0.5, 0.2, 0.1, 0.05],
        }
    )
    owner = pd.Series({7: "a", 9: "a"})
    top = top_pairs(contrib, owner, n=1)
    assert top[["pool_index", "pair_index"]].values.tolist() == [[7, 1], [9, 0]]  # pair 2 is b's: not row 7's subtask
    counts = top_contributor_counts(contrib, owner)
    assert counts[["pair_index", "top_for", "subtask_picks"]].values.tolist() == [
        [0, 1, 2],
        [1, 1, 2],
        [2, 0, 0],
        [3, 0, 0],
    ]
    assert not counts["flagged"].any()
    counts = top_contributor_counts(contrib, pd.Series({7: "b", 9: "b"}))
    assert counts.loc[counts["pair_index"] == 2, "flagged"].item()  # top for both of b's picks


def test_explain_cli(run, planted, capsys, tmp_path):
    scores = pd.read_parquet(run / "selection" / "scores.parquet")
    best = int(scores.loc[scores["score"].idxmax(), "pool_index"])
    assert main(["explain", str(run), str(best)]) == 0
    out = capsys.readouterr().out
    owner = scores.set_index("pool_index").loc[best, "selected_for"]
    assert f"selected, for subtask {owner!r}" in out and "rank 1 of 300" in out
    assert out.count("contribution +") + out.count("contribution -") == 3 and "rejected:" in out
    assert planted[0][best]["prompt"].split()[0] in out  # the row's own text
    unselected = int(scores.loc[~scores["selected"], "pool_index"].iloc[0])
    assert main(["explain", str(run), str(unselected)]) == 1
    captured = capsys.readouterr()
    assert "per-subtask scores: polite" in captured.out
    assert "was not selected, so it has no contributions: only selected rows are explained" in captured.err
    assert main(["explain", str(run), "300"]) == 2
    assert "pool index 300 is not in" in capsys.readouterr().err
    pool = planted[0]
    write_selection(
        run,
        pool,
        {"score": np.arange(len(pool), dtype=float)},
        0.1,
        {},
        "random",
        ["polite", "safe"],
        folder="selection_random",
    )
    assert main(["explain", str(run), "299", "--folder", "selection_random"]) == 1
    assert "has no contributions.parquet: random is not a gradient method" in capsys.readouterr().err
    assert main(["explain", str(tmp_path), "0"]) == 2


def test_report_of_a_run_explains_its_rows(run, planted):
    from rose_trl.outputs.report import write_report

    page = write_report(run).read_text()
    for needle in (
        "<h2>Why these rows</h2>",
        "<h2>Pairs that drive the selection</h2>",
        "Selected rows per subtask",
        "usable pairs",
        "validation loss</td><td>sigmoid",
    ):
        assert needle in page, needle
    assert planted[1][0]["prompt"].split(" .")[0] in page  # a pair's own text next to the rows it pulled in


def test_another_validation_loss_gets_its_own_stores_and_switching_back_reuses_both(run, planted, monkeypatch):
    import rose_trl.stores.extraction as extraction
    from rose_trl.run.offline import select_from_checkpoints
    from rose_trl.stores.validation import ROSEDPOTrainer

    pool, validation, tokenizer, _ = planted
    pool_passes, dpo_passes = [], []
    real_extract, real_pairs = extraction.extract_gradients, ROSEDPOTrainer.pair_gradients
    monkeypatch.setattr(extraction, "extract_gradients", lambda *a, **k: pool_passes.append(real_extract(*a, **k)))
    monkeypatch.setattr(
        ROSEDPOTrainer,
        "pair_gradients",
        lambda self, *a, **k: dpo_passes.append(self.loss_types) or real_pairs(self, *a, **k),
    )

    def select(folder, **config):
        selector = ROSESelector(
            pool,
            validation,
            tokenizer,
            ROSEConfig(**CONFIG, **config),
            run,
            max_length=256,
            use_cpu=True,
            progress=False,
        )
        return select_from_checkpoints(run, build_tiny_llama(tokenizer), selector, folder=folder)

    sel = select("selection_ipo", validation_loss_type="ipo")
    assert pool_passes == [0, 0] and dpo_passes == [["ipo"], ["ipo"]]  # pool stores reused, new targets only
    names = [c["name"] for c in json.loads((run / "rose" / "checkpoints.json").read_text())["checkpoints"]]
    for folder, loss in (("val_dpo_ipo", ["ipo"]), ("val_dpo", ["sigmoid"])):
        meta = json.loads((run / "rose" / folder / names[0] / "meta.json").read_text())
        assert meta["validation_loss_type"] == loss and meta["validation_loss_weights"] == [1.0]
    assert json.loads((sel / "config.json").read_text())["validation_loss_type"] == ["ipo"]
    select("selection_back")  # back to sigmoid: both targets' stores are there, nothing is recomputed
    assert pool_passes == [0, 0, 0, 0] and len(dpo_passes) == 2
    np.testing.assert_allclose(
        pd.read_parquet(run / "selection_back" / "scores.parquet")["score"],
        pd.read_parquet(run / "selection" / "scores.parquet")["score"],
        atol=1e-5,
    )


def test_a_store_of_another_target_is_refused(tmp_path):
    from rose_trl.stores.store import StoreMismatchError

    common = dict(
        model="m",
        checkpoint="c",
        projection={"type": "sjlt", "dim": 4},
        gradient_type="validation_dpo",
        pool_fingerprint="v",
        num_rows=2,
    )
    GradientStore.open_or_create(tmp_path / "s", extra={"validation_loss_type": ["ipo"]}, **common)
    with pytest.raises(
        StoreMismatchError, match="validation_loss_type: store has \\['ipo'\\], asked for \\['sigmoid'\\]"
    ):
        GradientStore.open_or_create(tmp_path / "s", extra={"validation_loss_type": ["sigmoid"]}, **common)
