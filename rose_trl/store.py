"""Resumable, memory-mapped store of projected gradient rows.

Layout of a store directory:
    meta.json            what produced the rows (model, checkpoint, projection, dtype, gradient type,
                         pool fingerprint, number of rows, shard size); written last, atomically
    shard_00000.npy ...  [rows_in_shard, dim] arrays (fp16 by default), opened with np.memmap
    done_00000.npy ...   [rows_in_shard] uint8 done-mask

Rows are flushed before their done flags, so a crash leaves at worst some finished rows marked
undone (recomputed on resume), never an undone row marked done. Only .npy and .json: no pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

FORMAT_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32}
# Keys that must agree for two stores (or a store and a request) to describe the same rows.
IDENTITY_KEYS = ("model", "checkpoint", "projection", "dtype", "gradient_type", "pool_fingerprint", "num_rows")


class StoreMismatchError(ValueError):
    """A store on disk was produced by something other than what is asked for now."""


class CorruptStoreError(ValueError):
    """A store's files are missing, truncated or inconsistent with its metadata."""


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def describe_mismatch(found: dict, wanted: dict, keys=IDENTITY_KEYS) -> list[str]:
    return [f"{k}: store has {found.get(k)!r}, asked for {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)]


class GradientStore:
    """Rows of projected gradients for one (checkpoint, gradient type) over one pool."""

    def __init__(self, path: str | Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.num_rows = int(meta["num_rows"])
        self.dim = int(meta["projection"]["dim"])
        self.shard_size = int(meta["shard_size"])
        self.dtype = DTYPES[meta["dtype"]]
        self.num_shards = max(1, -(-self.num_rows // self.shard_size))
        self._data: dict[int, np.memmap] = {}
        self._done: dict[int, np.memmap] = {}

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        *,
        model: str,
        checkpoint: str,
        projection: dict,
        gradient_type: str,
        pool_fingerprint: str,
        num_rows: int,
        dtype: str = "float16",
        shard_size: int = 65536,
        extra: dict | None = None,
    ) -> "GradientStore":
        """Open the store at `path` if it holds these rows (resuming), create it if absent.

        Refuses, naming each differing field, a store made by another model, checkpoint, projection,
        pool, dtype or gradient type.
        """
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if num_rows < 1:
            raise ValueError("a gradient store needs at least one row")
        wanted = {
            "format_version": FORMAT_VERSION, "model": model, "checkpoint": checkpoint, "projection": projection,
            "gradient_type": gradient_type, "pool_fingerprint": pool_fingerprint, "num_rows": int(num_rows),
            "dtype": dtype, "shard_size": int(shard_size), **(extra or {}),
        }
        path = Path(path)
        if (path / "meta.json").exists():
            store = cls.open(path)
            diff = describe_mismatch(store.meta, wanted)
            if diff:
                raise StoreMismatchError(f"gradient store {path} was made for other inputs:\n  " + "\n  ".join(diff))
            return store
        path.mkdir(parents=True, exist_ok=True)
        store = cls(path, wanted)
        for shard in range(store.num_shards):
            rows = store._rows_in(shard)
            np.lib.format.open_memmap(path / f"shard_{shard:05d}.npy", mode="w+", dtype=store.dtype, shape=(rows, store.dim)).flush()
            np.lib.format.open_memmap(path / f"done_{shard:05d}.npy", mode="w+", dtype=np.uint8, shape=(rows,)).flush()
        _atomic_write_json(path / "meta.json", wanted)  # last: a store without meta.json is not a store
        return store

    @classmethod
    def open(cls, path: str | Path) -> "GradientStore":
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise CorruptStoreError(f"{path} is not a gradient store (no meta.json)") from None
        except json.JSONDecodeError as e:
            raise CorruptStoreError(f"{path}/meta.json is not valid JSON: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CorruptStoreError(f"{path}: store format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}")
        store = cls(path, meta)
        for shard in range(store.num_shards):
            store._shard(shard)  # validates every shard's presence and shape up front
        return store

    def _rows_in(self, shard: int) -> int:
        return min(self.shard_size, self.num_rows - shard * self.shard_size)

    def _shard(self, shard: int) -> tuple[np.memmap, np.memmap]:
        if shard not in self._data:
            rows = self._rows_in(shard)
            for kind, store, dtype, shape in (("shard", self._data, self.dtype, (rows, self.dim)), ("done", self._done, np.uint8, (rows,))):
                file = self.path / f"{kind}_{shard:05d}.npy"
                try:
                    arr = np.load(file, mmap_mode="r+", allow_pickle=False)
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise CorruptStoreError(f"gradient store file {file} is missing or unreadable: {e}") from None
                if arr.shape != shape or arr.dtype != dtype:
                    raise CorruptStoreError(f"{file} has shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}")
                store[shard] = arr
        return self._data[shard], self._done[shard]

    # ---- writing -------------------------------------------------------------------------------
    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write `values[i]` to row `rows[i]`, then mark those rows done (data flushed first)."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.asarray(values)
        if values.shape != (len(rows), self.dim):
            raise ValueError(f"expected values of shape {(len(rows), self.dim)}, got {values.shape}")
        if not np.isfinite(values).all():
            bad = rows[~np.isfinite(values).all(axis=1)].tolist()
            raise FloatingPointError(f"non-finite (NaN/inf) gradient rows for pool indices {bad[:10]}: not stored")
        touched = set()
        for shard in np.unique(rows // self.shard_size):
            sel = rows // self.shard_size == shard
            data, _ = self._shard(int(shard))
            data[rows[sel] - shard * self.shard_size] = values[sel].astype(self.dtype)
            touched.add(int(shard))
        for shard in touched:
            self._data[shard].flush()
        for shard in touched:
            sel = rows // self.shard_size == shard
            _, done = self._shard(shard)
            done[rows[sel] - shard * self.shard_size] = 1
            done.flush()

    # ---- reading -------------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        return np.concatenate([np.asarray(self._shard(s)[1]) for s in range(self.num_shards)]).astype(bool)

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.done_mask())

    @property
    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def iter_chunks(self, chunk_rows: int = 16384) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [n, dim]) chunks in row order; memory stays at one chunk."""
        if not self.is_complete:
            raise CorruptStoreError(f"gradient store {self.path} is incomplete: {len(self.missing_rows())} rows not computed")
        for shard in range(self.num_shards):
            data, _ = self._shard(shard)
            base = shard * self.shard_size
            for start in range(0, data.shape[0], chunk_rows):
                yield base + start, np.asarray(data[start : start + chunk_rows], dtype=np.float32)

    def read_all(self) -> np.ndarray:
        return np.concatenate([chunk for _, chunk in self.iter_chunks()], axis=0)
