"""The callback in a plain SFTTrainer script, the offline mode, and the planted-signal check."""

import json

import numpy as np
import pandas as pd
import pytest
from datasets import load_from_disk
from peft import LoraConfig
from scipy.stats import spearmanr
from trl import SFTConfig, SFTTrainer

from rose_trl.config import ROSEConfig
from rose_trl.models.tiny import build_tiny_llama
from rose_trl.run.callback import ROSECallback
from rose_trl.run.offline import select_from_checkpoints
from rose_trl.run.pipeline import sft_training_dataset, warmup_indices
from rose_trl.run.selector import ROSESelector


LORA = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def sft_args(out, **kw):
    return SFTConfig(
        output_dir=str(out),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="epoch",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        max_length=256,
        disable_tqdm=True,
        seed=0,
        **kw,
    )


@pytest.fixture(scope="module")
def callback_run(tmp_path_factory, planted):
    """A user's own SFT script with ROSECallback added: nothing else changes."""
    pool, validation, tokenizer, _ = planted
    out = tmp_path_factory.mktemp("run")
    warm = sft_training_dataset(pool.select(warmup_indices(len(pool), 0.2, 0)), tokenizer, 256, "warm-up")
    callback = ROSECallback(
        pool, validation, tokenizer, ROSEConfig(projection_dim=2048, selection_fraction=0.1), max_length=256
    )
    trainer = SFTTrainer(
        build_tiny_llama(tokenizer),
        args=sft_args(out),
        train_dataset=warm,
        processing_class=tokenizer,
        peft_config=LORA,
        callbacks=[callback],
    )
    trainer.train()
    return out, callback


def test_callback_writes_the_selection_layout(callback_run, planted):
    out, callback = callback_run
    pool = planted[0]
    sel = out / "selection"
    assert callback.selection_dir == sel
    scores = pd.read_parquet(sel / "scores.parquet")
    assert list(scores.columns[:4]) == ["pool_index", "score", "score_polite", "score_safe"]
    assert {"score_ckpt0", "score_ckpt1", "score_ckpt2", "selected"} <= set(scores.columns)
    assert scores["selected"].sum() == 30 and len(scores) == len(pool)
    selected = load_from_disk(str(sel / "selected"))
    assert set(pool.column_names) | {"pool_index", "score"} == set(selected.column_names)
    assert list(selected["score"]) == sorted(selected["score"], reverse=True)
    assert selected[0]["prompt"] == pool[selected[0]["pool_index"]]["prompt"]
    config = json.loads((sel / "config.json").read_text())
    assert config["selection_method"] == "rose" and len(config["checkpoints"]) == 3
    lrs = [c["learning_rate"] for c in config["checkpoints"]]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # linear decay: each epoch's mean LR is lower
    summary = json.loads((sel / "summary.json").read_text())
    assert summary["num_selected"] == 30 and summary["subtasks"] == ["polite", "safe"]


def test_planted_signal_preferred_feature_ranks_above_dispreferred(callback_run, planted):
    out, _ = callback_run
    features = np.array([r["feature"] for r in planted[3]])
    scores = pd.read_parquet(out / "selection" / "scores.parquet")
    for subtask in ("polite", "safe"):
        good = scores[f"score_{subtask}"][features == f"{subtask}_good"]
        bad = scores[f"score_{subtask}"][features == f"{subtask}_bad"]
        # whatever their topic, rows with the chosen-side phrase outrank rows with the rejected-side one
        assert good.mean() > bad.mean(), subtask
        assert (good.values[:, None] > bad.values[None, :]).mean() > 0.8, subtask
    picked = features[scores["selected"].values]
    assert not any(f.endswith("_bad") for f in picked)
    assert np.mean([f.endswith("_good") for f in picked]) >= 0.8


def test_scores_equal_plain_formula_on_stored_gradients(callback_run, planted):
    out, _ = callback_run
    subtasks = np.array(planted[1]["subtask"])
    manifest = json.loads((out / "rose" / "checkpoints.json").read_text())["checkpoints"]
    eta = np.array([c["learning_rate"] for c in manifest])
    eta = eta / eta.sum()
    total = 0
    for i, c in enumerate(manifest):
        train = np.concatenate(
            [np.load(f).astype(np.float64) for f in sorted((out / "rose" / "train" / c["name"]).glob("shard_*.npy"))]
        )
        val = np.load(out / "rose" / "val_dpo" / c["name"] / "shard_00000.npy").astype(np.float64)
        train /= np.linalg.norm(train, axis=1, keepdims=True)
        val /= np.linalg.norm(val, axis=1, keepdims=True)
        per_task = np.stack([(train @ val[subtasks == s].T).mean(axis=1) for s in ("polite", "safe")], axis=1)
        total = total + eta[i] * per_task
    scores = pd.read_parquet(out / "selection" / "scores.parquet")
    np.testing.assert_allclose(scores["score"], total.max(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores["score_safe"], total[:, 1], rtol=1e-4, atol=1e-5)


def test_offline_mode_from_saved_checkpoints_matches_callback(callback_run, planted, tmp_path):
    out, _ = callback_run
    pool, validation, tokenizer, _ = planted
    selector = ROSESelector(
        pool,
        validation,
        tokenizer,
        ROSEConfig(projection_dim=2048, selection_fraction=0.1),
        tmp_path,
        max_length=256,
        use_cpu=True,
        progress=False,
    )
    sel = select_from_checkpoints(out, build_tiny_llama(tokenizer), selector)
    live = pd.read_parquet(out / "selection" / "scores.parquet")
    offline = pd.read_parquet(sel / "scores.parquet")
    for i in range(3):  # same weights and Adam state -> same per-checkpoint scores
        np.testing.assert_allclose(offline[f"score_ckpt{i}"], live[f"score_ckpt{i}"], atol=2e-3)
    # the LR weights come from the log history instead of the live optimizer: rankings agree
    assert spearmanr(offline["score"], live["score"]).statistic > 0.99


def test_rerun_reuses_finished_stores(callback_run, planted, monkeypatch):
    out, _ = callback_run
    pool, validation, tokenizer, _ = planted
    import rose_trl.stores.extraction as extraction

    calls = []
    monkeypatch.setattr(extraction, "extract_gradients", lambda *a, **k: calls.append(1) or 0)
    selector = ROSESelector(
        pool,
        validation,
        tokenizer,
        ROSEConfig(projection_dim=2048, selection_fraction=0.1),
        out,
        max_length=256,
        use_cpu=True,
        progress=False,
    )
    before = pd.read_parquet(out / "selection" / "scores.parquet")
    selector.finalize()
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "selection" / "scores.parquet"))
    assert calls == []


def test_less_method_reuses_training_gradients(callback_run, planted, monkeypatch):
    """Another gradient method on the same run computes validation gradients only."""
    out, _ = callback_run
    pool, validation, tokenizer, _ = planted
    import rose_trl.stores.extraction as extraction

    computed = []
    real = extraction.extract_gradients
    monkeypatch.setattr(extraction, "extract_gradients", lambda *a, **k: computed.append(real(*a, **k)))
    selector = ROSESelector(
        pool,
        validation,
        tokenizer,
        ROSEConfig(projection_dim=2048, selection_fraction=0.1, selection_method="less"),
        out,
        max_length=256,
        use_cpu=True,
        progress=False,
    )
    sel = select_from_checkpoints(out, build_tiny_llama(tokenizer), selector, folder="selection_less")
    assert computed == [0, 0, 0]  # three checkpoints, no pool row recomputed
    assert (out / "rose" / "val_sft").is_dir()
    assert json.loads((sel / "config.json").read_text())["selection_method"] == "less"
    assert (out / "selection" / "scores.parquet").exists()  # the rose selection is left alone
