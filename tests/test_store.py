import json

import numpy as np
import pytest

from rose_trl.stores.store import CorruptStoreError, GradientStore, StoreMismatchError


META = dict(
    model="m",
    checkpoint="checkpoint-1",
    projection={"type": "sjlt", "dim": 8, "seed": 0},
    gradient_type="adam",
    pool_fingerprint="abc",
    num_rows=10,
    shard_size=4,
)


def test_write_resume_and_read(tmp_path):
    s = GradientStore.open_or_create(tmp_path / "s", **META)
    assert s.num_shards == 3 and list(s.missing_rows()) == list(range(10))
    vals = np.arange(80, dtype=np.float32).reshape(10, 8) / 10
    s.write(np.array([9, 0, 5]), vals[[9, 0, 5]])
    again = GradientStore.open_or_create(tmp_path / "s", **META)  # resume: same metadata
    assert list(again.missing_rows()) == [1, 2, 3, 4, 6, 7, 8]
    with pytest.raises(CorruptStoreError, match="incomplete"):
        again.read_all()
    again.write(again.missing_rows(), vals[again.missing_rows()])
    assert again.is_complete
    np.testing.assert_allclose(again.read_all(), vals.astype(np.float16).astype(np.float32))
    chunks = list(again.iter_chunks(chunk_rows=3))
    assert [start for start, _ in chunks] == [0, 3, 4, 7, 8]
    assert not list(tmp_path.glob("s/*.npy")) or all(
        np.load(f, allow_pickle=False) is not None for f in (tmp_path / "s").glob("*.npy")
    )


def test_mismatched_store_is_refused_naming_the_fields(tmp_path):
    GradientStore.open_or_create(tmp_path / "s", **META)
    other = {**META, "pool_fingerprint": "xyz", "projection": {"type": "trak_basic", "dim": 8, "seed": 0}}
    with pytest.raises(StoreMismatchError) as e:
        GradientStore.open_or_create(tmp_path / "s", **other)
    assert "pool_fingerprint" in str(e.value) and "projection" in str(e.value) and "model" not in str(e.value)


def test_nonfinite_rows_are_refused(tmp_path):
    s = GradientStore.open_or_create(tmp_path / "s", **META)
    bad = np.zeros((2, 8), dtype=np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(FloatingPointError, match=r"\[7\]"):
        s.write(np.array([6, 7]), bad)
    assert len(s.missing_rows()) == 10


def test_truncated_or_missing_files_are_reported(tmp_path):
    GradientStore.open_or_create(tmp_path / "s", **META)
    shard = tmp_path / "s" / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorruptStoreError, match="shard_00001"):
        GradientStore.open(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        GradientStore.open(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match="no meta.json"):
        GradientStore.open(tmp_path / "nothing")


def test_store_files_are_plain_npy_and_json(tmp_path):
    GradientStore.open_or_create(tmp_path / "s", **META)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [
        "done_00000.npy",
        "done_00001.npy",
        "done_00002.npy",
        "meta.json",
        "shard_00000.npy",
        "shard_00001.npy",
        "shard_00002.npy",
    ]
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["dtype"] == "float16"


def test_int8_rows_round_trip_with_per_row_scales(tmp_path):
    s = GradientStore.open_or_create(tmp_path / "s", **{**META, "dtype": "int8"})
    vals = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32) * np.arange(1, 11)[:, None]
    vals[4] = 0  # an all-zero row keeps scale 1 and reads back as zeros
    s.write(np.arange(10), vals)
    back = GradientStore.open(tmp_path / "s").read_all()
    # Symmetric rounding: each value within half a step (max|row| / 127 / 2) of the original.
    step = np.abs(vals).max(axis=1, keepdims=True) / 127
    assert (np.abs(back - vals) <= step / 2 + 1e-7).all() and (back[4] == 0).all()
    assert sorted(p.name for p in (tmp_path / "s").glob("scale_*.npy")) == [
        "scale_00000.npy",
        "scale_00001.npy",
        "scale_00002.npy",
    ]


def test_int8_store_halves_disk_and_keeps_the_ranking(tmp_path, planted):
    """Real LoRA gradients of the planted pool, stored as fp16 and int8, scored against the same targets."""
    from peft import LoraConfig, get_peft_model
    from scipy.stats import spearmanr

    from rose_trl.data.sft import tokenize_pool
    from rose_trl.gradients.capture import trainable_parameters
    from rose_trl.gradients.projection import build_projector
    from rose_trl.models.tiny import build_tiny_llama
    from rose_trl.scoring.scores import CheckpointGradients, score_checkpoints
    from rose_trl.stores.extraction import extract_gradients

    pool, _, tok, _ = planted
    rows = tokenize_pool(pool, tok, 128).select_columns(["input_ids", "completion_mask"])
    model = get_peft_model(
        build_tiny_llama(tok, hidden=32, layers=1), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    n = sum(p.numel() for _, p in trainable_parameters(model))
    projector = build_projector("sjlt", n, 1024, 0)
    stores = {}
    for dtype in ("float16", "int8"):
        stores[dtype] = GradientStore.open_or_create(
            tmp_path / dtype,
            model="m",
            checkpoint="c",
            projection=projector.describe(),
            gradient_type="sgd",
            pool_fingerprint="p",
            num_rows=len(rows),
            dtype=dtype,
        )
        extract_gradients(model, rows, stores[dtype], projector, tok.pad_token_id, batch_size=32, progress=False)
    grads = stores["float16"].read_all()
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    targets = np.stack([unit[:10].mean(0), unit[10:20].mean(0)])  # task-like directions within the data
    scores = {
        d: score_checkpoints([CheckpointGradients("c", s, targets, 1.0)], ["a", "b"])["score"]
        for d, s in stores.items()
    }
    assert spearmanr(scores["float16"], scores["int8"]).statistic >= 0.99
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.npy")) for d in stores}
    assert size["int8"] < 0.52 * size["float16"]


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_read_rows_equals_the_whole_store_rows(tmp_path, dtype):
    """Scattered rows across shards (shard_size 4), runs of consecutive rows read together."""
    s = GradientStore.open_or_create(tmp_path / "s", **{**META, "dtype": dtype})
    vals = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    s.write(np.arange(10), vals)
    rows = np.array([0, 2, 3, 4, 5, 9])
    np.testing.assert_array_equal(s.read_rows(rows), s.read_all()[rows])
    assert s.read_rows(np.array([], dtype=np.int64)).shape == (0, 8)
    with pytest.raises(ValueError, match="sorted, distinct"):
        s.read_rows(np.array([3, 2]))
    partial = GradientStore.open_or_create(tmp_path / "p", **META)
    partial.write(np.array([0]), vals[:1])
    with pytest.raises(CorruptStoreError, match=r"rows \[1\] are not computed"):
        partial.read_rows(np.array([0, 1]))
