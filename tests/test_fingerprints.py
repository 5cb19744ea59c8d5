"""Reusing an output_dir with other inputs is refused, naming what differs, or recomputed on request."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from rose_trl.config import ROSEConfig
from rose_trl.models.tiny import build_tiny_llama
from rose_trl.run.selector import ROSESelector
from rose_trl.stores.store import GradientStore, StoreMismatchError


CONFIG = dict(projection_dim=256, gradient_type="sgd", selection_fraction=0.25, gradient_batch_size=8)


def lora_model(tokenizer, seed=0, name="tiny-a"):
    base = build_tiny_llama(tokenizer, hidden=32, layers=1, seed=0)
    base.config._name_or_path = name
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture
def data(planted):
    pool, validation, tokenizer, _ = planted
    return pool.select(range(16)), validation, tokenizer, pool


def run(out, data, model=None, pool=None, validation=None, **config):
    p, v, tok, _ = data
    selector = ROSESelector(
        pool if pool is not None else p,
        validation if validation is not None else v,
        tok,
        ROSEConfig(**{**CONFIG, **config}),
        out,
        max_length=64,
        progress=False,
    )
    selector.add_checkpoint(model if model is not None else lora_model(tok), "checkpoint-1", 1e-3)
    return selector.finalize()


@pytest.fixture
def first_run(tmp_path, data):
    return tmp_path, run(tmp_path, data)


def test_outputs_record_what_produced_them(first_run):
    out, selection = first_run
    config = json.loads((selection / "config.json").read_text())
    meta = json.loads((out / "rose/train/checkpoint-1/meta.json").read_text())
    assert config["pool_fingerprint"] == meta["pool_fingerprint"] and len(config["validation_fingerprint"]) == 32
    assert config["projection"] == meta["projection"] and meta["model"] == "tiny-a"
    assert meta["checkpoint"].startswith("checkpoint-1@")  # name and adapter hash
    run_json = json.loads((out / "rose/run.json").read_text())
    assert run_json["pool_fingerprint"] == meta["pool_fingerprint"] and run_json["projection_dim"] == 256


@pytest.mark.parametrize(
    "change,named",
    [
        (lambda d: {"model": lora_model(d[2], name="tiny-b")}, ["model: store has 'tiny-a', asked for 'tiny-b'"]),
        (lambda d: {"model": lora_model(d[2], seed=1)}, ["checkpoint: store has 'checkpoint-1@"]),
        (lambda d: {"pool": d[3].select(range(1, 17))}, ["pool_fingerprint: found"]),
        (lambda d: {"validation": d[1].select(range(1, len(d[1])))}, ["validation_fingerprint: found"]),
        (lambda d: {"projection_seed": 1}, ["projection_seed: found 0, asked for 1"]),
        (lambda d: {"projection_dim": 128}, ["projection_dim: found 256, asked for 128"]),
        (lambda d: {"store_dtype": "float32"}, ["store_dtype: found 'float16', asked for 'float32'"]),
    ],
    ids=["model", "checkpoint", "pool", "validation", "projection_seed", "projection_dim", "dtype"],
)
def test_other_inputs_are_refused_naming_the_difference(first_run, data, change, named):
    out, selection = first_run
    before = pd.read_parquet(selection / "scores.parquet")
    with pytest.raises(StoreMismatchError) as e:
        run(out, data, **change(data))
    for text in named:
        assert text in str(e.value)
    assert "overwrite_stores" in str(e.value)
    pd.testing.assert_frame_equal(pd.read_parquet(selection / "scores.parquet"), before)  # outputs untouched


def test_overwrite_stores_recomputes(first_run, data):
    out, selection = first_run
    before = pd.read_parquet(selection / "scores.parquet")
    run(out, data, projection_seed=1, overwrite_stores=True)
    assert GradientStore.open(out / "rose/train/checkpoint-1").meta["projection"]["seed"] == 1
    after = pd.read_parquet(selection / "scores.parquet")
    assert not np.allclose(after["score"], before["score"])
    # Other weights under the same checkpoint name: both stale stores are replaced, not mixed in.
    old = GradientStore.open(out / "rose/train/checkpoint-1").meta["checkpoint"]
    run(out, data, model=lora_model(data[2], seed=1), projection_seed=1, overwrite_stores=True)
    new = {GradientStore.open(out / f"rose/{kind}/checkpoint-1").meta["checkpoint"] for kind in ("train", "val_dpo")}
    assert len(new) == 1 and old not in new
    again = pd.read_parquet(selection / "scores.parquet")
    assert not np.allclose(again["score"], after["score"])


def test_same_inputs_resume_without_recomputing(first_run, data):
    out, selection = first_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "rose").rglob("shard_*.npy")}
    before = pd.read_parquet(selection / "scores.parquet")
    run(out, data)
    assert {p: p.stat().st_mtime_ns for p in (out / "rose").rglob("shard_*.npy")} == stamps
    pd.testing.assert_frame_equal(pd.read_parquet(selection / "scores.parquet"), before, check_exact=True)
