"""The recipe's pipeline in-process: baseline methods, the Hub push hook, bad options."""

import json

import pandas as pd
import pytest
from datasets import load_from_disk

from rose_trl.run.pipeline import run


@pytest.mark.parametrize("method", ["random", "bm25", "dsir", "rds", "full"])
def test_baselines_write_the_same_layout(assets, configs, tmp_path, method):
    result = run(*configs(assets, tmp_path, selection_method=method, selection_fraction=0.1))
    sel = tmp_path / f"selection_{method}"
    assert result["selection"] == str(sel) and not (tmp_path / "warmup").exists()
    scores = pd.read_parquet(sel / "scores.parquet")
    assert scores["selected"].sum() == (120 if method == "full" else 12)
    summary = json.loads((sel / "summary.json").read_text())
    assert summary["selection_method"] == method and summary["subtasks"] == ["polite", "safe"]
    assert len(load_from_disk(str(sel / "selected"))) == summary["num_selected"]


def test_push_to_hub_pushes_the_selection(assets, configs, tmp_path, monkeypatch):
    import rose_trl.outputs.hub as hub

    calls = []
    monkeypatch.setattr(hub, "push_selection", lambda *a, **kw: calls.append((a, kw)) or "https://hub/x")
    rose, sft, model = configs(
        assets, tmp_path, selection_method="random", hub_dataset_id="me/picked", hub_private=True
    )
    sft.push_to_hub = True
    assert run(rose, sft, model)["hub_url"] == "https://hub/x"
    assert calls == [((tmp_path, "me/picked"), {"private": True, "token": None, "folder": "selection_random"})]


def test_rose_without_lora_is_refused(assets, configs, tmp_path):
    rose, sft, model = configs(assets, tmp_path)
    model.use_peft = False
    with pytest.raises(ValueError, match="use_peft"):
        run(rose, sft, model)


def test_final_training_does_not_hold_the_warm_up_model(assets, configs, tmp_path, monkeypatch):
    """The warm-up's model (wrapped in LoRA by its trainer) is freed before final training loads a fresh base."""
    import gc
    import weakref

    import rose_trl.run.pipeline as pipeline

    loaded, alive_at_final = [], []
    load = pipeline.load_model_and_tokenizer

    def recording_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, tokenizer

    def final(*args):
        gc.collect()
        alive_at_final.append(loaded[0]() is not None)
        return tmp_path / "final"

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", recording_load)
    monkeypatch.setattr(pipeline, "train_final_model", final)
    rose, sft, model = configs(assets, tmp_path, projection_dim=512, selection_fraction=0.1)
    rose.final_training, sft.num_train_epochs = True, 1
    run(rose, sft, model)
    assert alive_at_final == [False]
