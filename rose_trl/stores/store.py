"""Resumable, memory-mapped store of projected gradient rows.

Layout of a store directory:
    meta.json            what produced the rows (model, checkpoint, projection, dtype, gradient type,
                         pool fingerprint, number of rows, shard size); written last, atomically
    shard_00000.npy ...  [rows_in_shard, dim] arrays (fp16 by default), opened with np.memmap
    scale_00000.npy ...  int8 stores only: [rows_in_shard] float32 per-row scales (row = int8 * scale)
    done_00000.npy ...   [rows_in_shard] uint8 done-mask

A store is created under a temporary name and renamed into place once its files and meta.json exist,
so a directory at the store's path is always a whole store. Its size is known before it is written
(`store_bytes`): creation checks the free space first, then allocates every file's blocks (disk.py), so a
full disk is a DiskSpaceError naming the path, never a SIGBUS in a memory-mapped write. Rows (and scales) are
flushed before their done flags, so a crash leaves at worst some finished rows marked undone (recomputed on
resume), never an undone row marked done. Only .npy and .json: no pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rose_trl.resources.disk import DiskSpaceError, allocate, require_free_space
from rose_trl.utils.errors import UserError
from rose_trl.utils.files import atomic_write_json, remove_tree
from rose_trl.utils.timing import stage


FORMAT_VERSION = 1
# int8 rows carry a float32 scale each: half the disk of float16, scores nearly unchanged (docs/results/scoring.md).
DTYPES = {"float16": np.float16, "float32": np.float32, "int8": np.int8}
# Keys that must agree for two stores (or a store and a request) to describe the same rows.
IDENTITY_KEYS = ("model", "checkpoint", "projection", "dtype", "gradient_type", "pool_fingerprint", "num_rows")


class StoreMismatchError(UserError, ValueError):
    """A store on disk was produced by something other than what is asked for now."""


class CorruptStoreError(UserError, ValueError):
    """A store's files are missing, truncated or inconsistent with its metadata."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temporaries(path: Path) -> None:
    """Temporary folders of creations killed part-way (their process is gone) are garbage."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _read_rows(arr: np.memmap, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a memory-mapped .npy, read with plain file reads. Reading through the map
    would leave every touched page resident in this process (its RSS would grow with the pool); file
    reads go through the page cache only, so streaming a store holds one chunk."""
    out = np.empty((stop - start, *arr.shape[1:]), dtype=arr.dtype)
    with open(arr.filename, "rb") as f:
        f.seek(arr.offset + start * (out.nbytes // max(len(out), 1)))
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise CorruptStoreError(f"{arr.filename} is truncated: rows {start}..{stop} are not all there")
    return out


def _read_row_runs(arr: np.memmap, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Rows [starts[r], stops[r]) of a memory-mapped .npy, run after run, from one open file (as _read_rows)."""
    out = np.empty((int((stops - starts).sum()), *arr.shape[1:]), dtype=arr.dtype)
    row_bytes = out.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    view = memoryview(out).cast("B")
    at = 0
    with open(arr.filename, "rb", buffering=0) as f:
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            f.seek(arr.offset + start * row_bytes)
            end = at + (stop - start) * row_bytes
            while at < end:  # a single read returns at most ~2 GB
                got = f.readinto(view[at:end])
                if not got:
                    raise CorruptStoreError(f"{arr.filename} is truncated: rows {start}..{stop} are not all there")
                at += got
    return out


def _to_float32(raw: np.ndarray, into: np.ndarray | None = None) -> np.ndarray:
    # torch converts float16/int8 to float32 about 3x faster than numpy's astype on CPU.
    import torch

    if into is None:
        return torch.from_numpy(raw).float().numpy()
    torch.from_numpy(into).copy_(torch.from_numpy(raw))
    return into


# meta.json and the folder itself, at most (a filesystem block each).
_STORE_OVERHEAD = 8192


def _file_bytes(dtype, shape: tuple) -> int:
    """Bytes of a .npy file of `shape` and `dtype`: its header, as numpy writes it, and its data."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    )
    return len(header.getvalue()) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def store_bytes(num_rows: int, dim: int, dtype: str = "float16", shard_size: int = 65536) -> int:
    """Disk bytes of a store of `num_rows` rows of `dim` values: its shards, done-masks, int8 scales and meta."""
    shape = {"num_rows": num_rows, "projection": {"dim": dim}, "shard_size": shard_size, "dtype": dtype}
    blank = GradientStore(".", shape)
    return _STORE_OVERHEAD + sum(
        _file_bytes(file_dtype, file_shape)
        for shard in range(blank.num_shards)
        for _, file_dtype, file_shape in blank._files(blank._rows_in(shard))
    )


def describe_mismatch(found: dict, wanted: dict, keys=IDENTITY_KEYS) -> list[str]:
    return [
        f"{k}: store has {found.get(k)!r}, asked for {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)
    ]


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
        self.quantized = meta["dtype"] == "int8"
        self._data: dict[int, np.memmap] = {}
        self._done: dict[int, np.memmap] = {}
        self._scale: dict[int, np.memmap] = {}
        self._allocated: set[int] = set()

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
        overwrite: bool = False,
    ) -> GradientStore:
        """Open the store at `path` if it holds these rows (resuming), create it if absent.

        Refuses, naming each differing field, a store made by another model, checkpoint, projection,
        pool, dtype or gradient type; with `overwrite=True` such a store is deleted and recomputed.
        """
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if num_rows < 1:
            raise ValueError("a gradient store needs at least one row")
        wanted = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "checkpoint": checkpoint,
            "projection": projection,
            "gradient_type": gradient_type,
            "pool_fingerprint": pool_fingerprint,
            "num_rows": int(num_rows),
            "dtype": dtype,
            "shard_size": int(shard_size),
            **(extra or {}),
        }
        path = Path(path)
        if (path / "meta.json").exists():
            store = cls._open_matching(path, wanted, overwrite)
            if store is not None:
                return store
        elif path.exists() and any(path.iterdir()):
            raise CorruptStoreError(
                f"{path} exists but is not a gradient store (no meta.json); remove it or choose another output_dir"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(path)
        needed = store_bytes(num_rows, projection["dim"], dtype, shard_size)
        require_free_space(path.parent, needed, f"the gradient store {path.name} ({num_rows} rows)")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        blank = cls(tmp, wanted)
        try:
            for shard in range(blank.num_shards):
                rows = blank._rows_in(shard)
                for kind, dtype, shape in blank._files(rows):
                    file = tmp / f"{kind}_{shard:05d}.npy"
                    np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape).flush()
                    allocate(file, new=True)  # its blocks now: a full disk is an error here, not a SIGBUS later
            atomic_write_json(tmp / "meta.json", wanted)
        except (DiskSpaceError, OSError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists() and not any(path.iterdir()):
            path.rmdir()
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process (a sharded extraction) published the same store first: use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "meta.json").exists():
                raise
            return cls._open_matching(path, wanted, overwrite=False)
        return cls.open(path)

    @classmethod
    def _open_matching(cls, path: Path, wanted: dict, overwrite: bool) -> GradientStore | None:
        """The store at `path` if it matches `wanted`; None after deleting it when it does not and
        `overwrite` is set; otherwise StoreMismatchError naming the differing fields."""
        try:
            store = cls.open(path)
        except CorruptStoreError:
            if not overwrite:
                raise
            remove_tree(path)
            return None
        diff = describe_mismatch(store.meta, wanted, keys=sorted(wanted))  # extras (e.g. DPO beta) count too
        if not diff:
            return store
        if overwrite:
            remove_tree(path)
            return None
        raise StoreMismatchError(
            f"gradient store {path} was made for other inputs:\n  "
            + "\n  ".join(diff)
            + "\n(use another output_dir, or set overwrite_stores: true to recompute it)"
        )

    @classmethod
    def open(cls, path: str | Path) -> GradientStore:
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            raise CorruptStoreError(f"{path} is not a gradient store (no meta.json)") from None
        except json.JSONDecodeError as e:
            raise CorruptStoreError(f"{path}/meta.json is not valid JSON: {e}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CorruptStoreError(
                f"{path}: store format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}"
            )
        if meta.get("dtype") not in DTYPES:
            raise CorruptStoreError(f"{path}/meta.json: unknown store dtype {meta.get('dtype')!r}")
        store = cls(path, meta)
        for shard in range(store.num_shards):
            store._shard(shard)  # validates every shard's presence and shape up front
        return store

    def _rows_in(self, shard: int) -> int:
        return min(self.shard_size, self.num_rows - shard * self.shard_size)

    def _files(self, rows: int) -> list[tuple[str, type, tuple]]:
        files = [("shard", self.dtype, (rows, self.dim)), ("done", np.uint8, (rows,))]
        return files + ([("scale", np.float32, (rows,))] if self.quantized else [])

    def _shard(self, shard: int) -> tuple[np.memmap, np.memmap]:
        if shard not in self._data:
            rows = self._rows_in(shard)
            holders = {"shard": self._data, "done": self._done, "scale": self._scale}
            for kind, dtype, shape in self._files(rows):
                store = holders[kind]
                file = self.path / f"{kind}_{shard:05d}.npy"
                try:
                    arr = np.load(file, mmap_mode="r+", allow_pickle=False)
                except (FileNotFoundError, ValueError, OSError) as e:
                    raise CorruptStoreError(f"gradient store file {file} is missing or unreadable: {e}") from None
                if arr.shape != shape or arr.dtype != dtype:
                    raise CorruptStoreError(
                        f"{file} has shape {arr.shape} {arr.dtype}, expected {shape} {np.dtype(dtype)}"
                    )
                store[shard] = arr
        return self._data[shard], self._done[shard]

    # ---- writing -------------------------------------------------------------------------------
    def _allocate(self, shard: int) -> None:
        """The shard's files' blocks, before this process first writes into them: stores created by this version
        have them already (a no-op), older sparse ones get them now, or a DiskSpaceError naming the file."""
        if shard not in self._allocated:
            for kind, _, _ in self._files(self._rows_in(shard)):
                allocate(self.path / f"{kind}_{shard:05d}.npy", new=False)
            self._allocated.add(shard)

    @stage("gradient store writes")
    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write `values[i]` to row `rows[i]`, then mark those rows done (data flushed first)."""
        rows = np.asarray(rows, dtype=np.int64)
        values = np.asarray(values)
        if values.shape != (len(rows), self.dim):
            raise ValueError(f"expected values of shape {(len(rows), self.dim)}, got {values.shape}")
        if not np.isfinite(values).all():
            bad = rows[~np.isfinite(values).all(axis=1)].tolist()
            raise FloatingPointError(f"non-finite (NaN/inf) gradient rows for pool indices {bad[:10]}: not stored")
        for shard in np.unique(rows // self.shard_size).tolist():
            self._allocate(shard)
        scales = None
        if self.quantized:
            # Per-row symmetric quantization: row ~= int8 * scale, scale = max|row| / 127.
            values = values.astype(np.float32)
            scales = np.abs(values).max(axis=1) / 127.0
            scales[scales == 0] = 1.0
            values = np.clip(np.rint(values / scales[:, None]), -127, 127)
        touched = set()
        for shard in np.unique(rows // self.shard_size):
            sel = rows // self.shard_size == shard
            data, _ = self._shard(int(shard))
            data[rows[sel] - shard * self.shard_size] = values[sel].astype(self.dtype)
            if scales is not None:
                self._scale[int(shard)][rows[sel] - shard * self.shard_size] = scales[sel]
            touched.add(int(shard))
        for shard in touched:
            self._data[shard].flush()
            if self.quantized:
                self._scale[shard].flush()
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
            raise CorruptStoreError(
                f"gradient store {self.path} is incomplete: {len(self.missing_rows())} rows not computed"
            )
        for shard in range(self.num_shards):
            data, _ = self._shard(shard)
            base = shard * self.shard_size
            for start in range(0, data.shape[0], chunk_rows):
                stop = min(start + chunk_rows, data.shape[0])
                chunk = _to_float32(_read_rows(data, start, stop))
                if self.quantized:
                    chunk *= _read_rows(self._scale[shard], start, stop)[:, None]
                yield base + start, chunk

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim] of the given rows (sorted, distinct): one file read per run of
        consecutive rows, so a scattered subset costs its own bytes, not a pass over the store."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.num_rows or (np.diff(rows) <= 0).any()):
            raise ValueError(f"rows must be sorted, distinct and in [0, {self.num_rows})")
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        bounds = np.searchsorted(rows, np.arange(self.num_shards + 1) * self.shard_size)
        for shard in range(self.num_shards):
            first, last = bounds[shard], bounds[shard + 1]
            if first == last:
                continue
            data, done = self._shard(shard)
            local = rows[first:last] - shard * self.shard_size
            undone = ~np.asarray(done)[local].astype(bool)
            if undone.any():
                raise CorruptStoreError(
                    f"gradient store {self.path}: rows {rows[first:last][undone][:10].tolist()} are not computed"
                )
            breaks = np.flatnonzero(np.diff(local) != 1) + 1
            starts, stops = local[np.r_[0, breaks]], local[np.r_[breaks - 1, len(local) - 1]] + 1
            chunk = out[first:last]
            _to_float32(_read_row_runs(data, starts, stops), into=chunk)
            if self.quantized:
                chunk *= _read_row_runs(self._scale[shard], starts, stops)[:, None]
        return out

    def read_all(self) -> np.ndarray:
        return np.concatenate([chunk for _, chunk in self.iter_chunks()], axis=0)
