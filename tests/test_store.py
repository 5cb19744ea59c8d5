import json

import numpy as np
import pytest

from rose_trl.store import CorruptStoreError, GradientStore, StoreMismatchError

META = dict(model="m", checkpoint="checkpoint-1", projection={"type": "sjlt", "dim": 8, "seed": 0},
            gradient_type="adam", pool_fingerprint="abc", num_rows=10, shard_size=4)


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
        np.load(f, allow_pickle=False) is not None for f in (tmp_path / "s").glob("*.npy"))


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
    s = GradientStore.open_or_create(tmp_path / "s", **META)
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
    assert names == ["done_00000.npy", "done_00001.npy", "done_00002.npy", "meta.json",
                     "shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["dtype"] == "float16"
