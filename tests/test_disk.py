"""Disk space: the stores' bytes known before they are written, the free space checked when they are created
and before a run's first step, blocks allocated at creation so that a full disk is a Python error naming the
file (never a SIGBUS), and a resume after space is freed giving the lone run's selection.

Two ways: a stub of the free-space call and of fallocate (always), and a real small filesystem (a tmpfs,
mounted when this user may mount: root here; skipped otherwise).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rose_trl.resources import disk
from rose_trl.resources.disk import DiskSpaceError
from rose_trl.stores.store import GradientStore, store_bytes


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def make_store(path, rows=40, dim=256, dtype="float16"):
    return GradientStore.open_or_create(
        path,
        model="m",
        checkpoint="c",
        projection={"dim": dim, "kind": "test"},
        gradient_type="sgd",
        pool_fingerprint="p",
        num_rows=rows,
        dtype=dtype,
        shard_size=16,
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_store_bytes_are_known_before_the_store_is_written(tmp_path, dtype):
    store = make_store(tmp_path / "s", rows=40, dim=256, dtype=dtype)
    on_disk = sum(f.stat().st_size for f in store.path.iterdir())
    planned = store_bytes(40, 256, dtype, shard_size=16)
    assert on_disk <= planned <= on_disk + 8192  # the files' exact sizes, plus meta.json and the folder at most
    data = sum(f.stat().st_size for f in store.path.glob("shard_*.npy"))
    assert data >= 40 * 256 * np.dtype(dtype).itemsize
    # Every block is allocated when the store is created: no sparse file for a map to fault on.
    for f in store.path.glob("*.npy"):
        assert f.stat().st_blocks * 512 >= f.stat().st_size


def test_a_store_that_does_not_fit_is_refused_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10_000)
    with pytest.raises(DiskSpaceError) as e:
        make_store(tmp_path / "rose" / "s")
    needed = store_bytes(40, 256, "float16", shard_size=16)
    message = str(e.value)
    assert (
        str(tmp_path / "rose") in message and f"needs {needed:,} bytes" in message and "10,000 bytes free" in message
    )
    assert e.value.errno == errno.ENOSPC
    assert not any((tmp_path / "rose").iterdir())


def test_a_disk_that_fills_at_allocation_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskSpaceError, match=r"disk full: cannot allocate .* for .*shard_00000\.npy"):
        make_store(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []  # no store, no temporary folder


def test_an_older_sparse_store_is_allocated_before_its_first_write(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    calls = []
    monkeypatch.setattr(disk, "allocate", lambda f, new: calls.append((Path(f).name, new)))
    monkeypatch.setattr("rose_trl.stores.store.allocate", disk.allocate)
    resumed = GradientStore.open(store.path)
    resumed.write(np.array([0, 1]), np.ones((2, 256), dtype=np.float32))
    resumed.write(np.array([2, 17]), np.ones((2, 256), dtype=np.float32))
    assert calls == [
        ("shard_00000.npy", False),
        ("done_00000.npy", False),
        ("shard_00001.npy", False),
        ("done_00001.npy", False),
    ]  # once per shard, before writing


# ---- the whole run ----------------------------------------------------------------------------------


def run_configs(configs, assets, out, **rose):
    return configs(assets, out, sft=dict(num_train_epochs=2, per_device_train_batch_size=4, disable_tqdm=True), **rose)


def test_a_run_refuses_before_its_first_step_when_its_stores_do_not_fit(assets, configs, tmp_path, monkeypatch):
    from rose_trl.run.pipeline import run

    free = store_bytes(120, 8192) + 10_000  # one pool store: two checkpoints need two, and their validation stores
    monkeypatch.setattr(disk, "free_bytes", lambda path: free)
    with pytest.raises(DiskSpaceError, match=r"for the gradient stores of 2 checkpoint\(s\) \(120 pool rows") as e:
        run(*run_configs(configs, assets, tmp_path, projection_dim=8192, selection_fraction=0.1))
    assert f"{free:,} bytes free" in str(e.value) and str(tmp_path) in str(e.value)
    assert not list((tmp_path / "warmup").glob("checkpoint-*")) and not (tmp_path / "rose" / "train").exists()
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10 * store_bytes(120, 8192))
    run(*run_configs(configs, assets, tmp_path, projection_dim=8192, selection_fraction=0.1))  # room enough: it runs
    assert (tmp_path / "selection" / "scores.parquet").exists()


# ---- a real small filesystem --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 3 MB at tmp_path/disk (resizable with `.resize(mb)`), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root): the stubbed tests cover the same code")

    class Disk:
        path = mount

        @staticmethod
        def resize(mb: int):
            subprocess.run(["mount", "-o", f"remount,size={mb}m", str(mount)], check=True)

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_small_filesystem_raises_an_error_naming_the_file(small_disk, monkeypatch):
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10**12)  # the check blinded: the disk fills "later"
    with pytest.raises(DiskSpaceError, match=r"disk full: cannot allocate .* for .*/\.s\.tmp-\d+/shard_0000\d\.npy"):
        make_store(small_disk.path / "s", rows=64, dim=65536)  # 8 MB of float16 on a 3 MB disk
    assert list(small_disk.path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(DiskSpaceError, match=r"needs [\d,]+ bytes .*, [\d,]+ bytes free"):
        make_store(small_disk.path / "s", rows=64, dim=65536)  # and the check itself sees the real disk
    small_disk.resize(16)
    store = make_store(small_disk.path / "s", rows=64, dim=65536)
    store.write(np.arange(64), np.ones((64, 65536), dtype=np.float32))
    assert store.is_complete


RECIPE = textwrap.dedent("""
    import sys
    from trl import ModelConfig, SFTConfig, TrlParser
    from rose_trl.resources import disk
    from rose_trl.config import ROSEConfig
    from rose_trl.run.pipeline import run
    if sys.argv.pop(1) == "blind":  # the free-space check sees a large disk: the real one fills later
        disk.free_bytes = lambda path: 10**12
    rose, sft, model = TrlParser((ROSEConfig, SFTConfig, ModelConfig)).parse_args_and_config()
    print("selection:", run(rose, sft, model)["selection"], flush=True)
""")


def recipe(assets, out: Path, script: Path, blind: bool = False, **popen) -> subprocess.Popen:
    args = [
        "--model_name_or_path",
        str(assets / "model"),
        "--use_peft",
        "true",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--pool_dataset",
        str(assets / "pool.jsonl"),
        "--validation_dataset",
        str(assets / "validation.jsonl"),
        "--final_training",
        "false",
        "--selection_fraction",
        "0.1",
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--max_length",
        "256",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    return subprocess.Popen(
        [sys.executable, str(script), "blind" if blind else "check", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=900)
    return process.returncode, out + err


@pytest.mark.slow
def test_the_recipe_on_a_small_filesystem_refuses_then_errors_then_resumes_to_the_same_selection(
    assets, small_disk, tmp_path
):
    """The issue's report: the tiny recipe on a small disk died with SIGBUS. Now: refused before any work; with
    the check blinded, a DiskSpaceError naming the store file; after space is freed, the same command resumes
    and gives the selection of a run that never failed."""
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    lone_code, lone_log = finish(recipe(assets, tmp_path / "lone", script))
    assert lone_code == 0, lone_log[-3000:]
    out = small_disk.path / "run"

    code, log = finish(recipe(assets, out, script))
    assert code == 1 and "DiskSpaceError" in log and f"not enough disk space under {out}" in log, log[-3000:]
    assert not list((out / "warmup").glob("checkpoint-*"))  # refused before the first step
    print(log.strip().splitlines()[-1])  # what the user sees

    code, log = finish(recipe(assets, out, script, blind=True))
    assert code != -signal.SIGBUS, "killed by SIGBUS"
    assert code == 1 and ("disk full: cannot allocate" in log or "No space left on device" in log), log[-3000:]
    print(log.strip().splitlines()[-1])  # what the user sees

    small_disk.resize(32)
    code, log = finish(recipe(assets, out, script))
    assert code == 0, log[-3000:]
    lone = pd.read_parquet(tmp_path / "lone" / "selection" / "scores.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "selection" / "scores.parquet"), lone)


@pytest.mark.slow
def test_two_runs_started_three_seconds_apart_into_one_output_dir_both_give_the_lone_selection(assets, tmp_path):
    import time

    script = tmp_path / "recipe.py"
    script.write_text(RECIPE)
    lone_code, lone_log = finish(recipe(assets, tmp_path / "lone", script))
    assert lone_code == 0, lone_log[-3000:]
    shared = tmp_path / f"shared-{uuid.uuid4().hex[:6]}"
    first = recipe(assets, shared, script)
    time.sleep(3)
    second = recipe(assets, shared, script)
    lone = pd.read_parquet(tmp_path / "lone" / "selection" / "scores.parquet")
    for process in (first, second):  # each run's selection, read as it finishes
        code, log = finish(process)
        assert code == 0, log[-3000:]
        assert f"selection: {shared / 'selection'}" in log
        pd.testing.assert_frame_equal(pd.read_parquet(shared / "selection" / "scores.parquet"), lone)
