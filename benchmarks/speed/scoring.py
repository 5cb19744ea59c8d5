"""Scoring at scale: peak memory must not grow with the pool, and speed is compared with a raw read.

    python benchmarks/speed/scoring.py [--sizes 50000 400000 --dim 2048 --checkpoints 4 --dtype float16]

For each pool size, fills one gradient store per checkpoint with random rows (the store's own
`write`, so done-masks and metadata are real), then scores them in a fresh subprocess per size with
`rose_trl.scoring.scores.score_checkpoints` and reports its peak RSS (getrusage ru_maxrss) and wall time,
next to `cat <the same files> > /dev/null`. Each is run twice: "cold", after asking the kernel to
drop these files from the page cache (fsync + posix_fadvise DONTNEED, for our files only; best
effort: check that the cold cat is slower than the warm one), and "warm", straight after.
The last line is `rss_ratio=<peak RSS at the largest size / at the smallest> max_peak_rss_mb=<MB>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
from common import drop_from_page_cache, fill, peak_rss_kib, store_dirs

from rose_trl.stores.store import GradientStore


def cat_seconds(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run("cat " + " ".join(f"'{f}'" for f in files) + " > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


def score_child(root: Path, checkpoints: int, via_mmap: bool = False) -> None:
    """Runs in a fresh interpreter: open the stores, score them, report time and peak RSS."""
    import torch  # noqa: F401  (loaded in any real run; the store converts chunks with it)

    if via_mmap:  # the previous reader, for comparison: slices of the memory map
        import rose_trl.stores.store

        rose_trl.stores.store._read_rows = lambda arr, start, stop: np.array(arr[start:stop])

    from rose_trl.scoring.scores import CheckpointGradients, score_checkpoints

    stores = [GradientStore.open(d) for d in store_dirs(root, checkpoints)]
    rng = np.random.default_rng(1)
    ckpts = []
    for i, s in enumerate(stores):
        targets = rng.standard_normal((2, s.dim)).astype(np.float32)
        ckpts.append(
            CheckpointGradients(
                s.path.name, s, targets / np.linalg.norm(targets, axis=1, keepdims=True), 1.0 / (i + 1)
            )
        )
    start = time.perf_counter()
    table = score_checkpoints(ckpts, ["a", "b"])
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": peak_rss_kib() / 1024,
                "rows": len(table["score"]),
                "checksum": float(np.sum(table["score"])),
            }
        )
    )


def score_in_subprocess(root: Path, checkpoints: int, via_mmap: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(root), "--checkpoints", str(checkpoints)]
        + (["--via-mmap"] if via_mmap else []),
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 400_000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "int8"])
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder, removed)")
    parser.add_argument("--via-mmap", action="store_true", help="score with the previous reader (memory-map slices)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return score_child(Path(args.child), args.checkpoints, args.via_mmap)

    base = Path(args.dir or f"/tmp/rose-scoring-bench-{os.getpid()}")
    peaks = []
    print(
        f"dim={args.dim} checkpoints={args.checkpoints} dtype={args.dtype} cpus={os.cpu_count()}"
        + (" reader=mmap slices (previous)" if args.via_mmap else "")
    )
    print(
        "| pool | store GB | cat cold GB/s | score cold s (GB/s) | cat warm GB/s | score warm s (GB/s) | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    try:
        for n in args.sizes:
            root = base / f"n{n}"
            shutil.rmtree(root, ignore_errors=True)
            files = fill(root, n, args.dim, args.checkpoints, args.dtype)
            gb = sum(f.stat().st_size for f in files) / 1e9
            drop_from_page_cache(files)
            cat_cold = cat_seconds(files)
            drop_from_page_cache(files)
            cold = score_in_subprocess(root, args.checkpoints, args.via_mmap)
            cat_warm = cat_seconds(files)
            warm = score_in_subprocess(root, args.checkpoints, args.via_mmap)
            peaks.append(max(cold["peak_rss_mb"], warm["peak_rss_mb"]))
            print(
                f"| {n:,} | {gb:.2f} | {gb / cat_cold:.2f} | {cold['seconds']:.1f} ({gb / cold['seconds']:.2f}) | "
                f"{gb / cat_warm:.2f} | {warm['seconds']:.1f} ({gb / warm['seconds']:.2f}) | {peaks[-1]:.0f} |",
                flush=True,
            )
            shutil.rmtree(root)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"rss_ratio={peaks[-1] / peaks[0]:.3f} max_peak_rss_mb={max(peaks):.0f}")


if __name__ == "__main__":
    main()
