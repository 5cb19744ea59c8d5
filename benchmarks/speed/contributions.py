"""Cost of the per-pair contributions (rose_trl/outputs/explain.py) at the paper's scale, from synthetic stores.

    python benchmarks/speed/contributions.py [--pool 270000 --fraction 0.05 --pairs 100 --subtasks 18
        --checkpoints 4 --dim 8192 --dir /somewhere/with/18GB]

Fills one float16 gradient store per checkpoint with random rows (benchmarks/speed/scoring.py's `fill`: the
store's own `write`, real done-masks and metadata), picks a random `fraction` of the pool as the
selection, and writes contributions.parquet + pairs.parquet for it with `write_contributions` in a fresh
subprocess, reporting its wall time and peak RSS (VmHWM). Run twice: "cold" after asking the kernel
to drop the store files from the page cache (our files only), "warm" straight after. For scale, the
same subprocess then times `score_checkpoints` over the whole stores (`--no-scoring` skips it).
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


def child(root: Path, args) -> None:
    """Runs in a fresh interpreter: contributions of the selection, then (optionally) the whole scoring."""
    import torch  # noqa: F401  (loaded in any real run)
    from datasets import Dataset

    from rose_trl.outputs.explain import write_contributions
    from rose_trl.scoring.scores import CheckpointGradients, ValidationTargets, score_checkpoints, validation_targets
    from rose_trl.stores.store import GradientStore

    rng = np.random.default_rng(1)
    subtasks = [f"subtask{j % args.subtasks}" for j in range(args.pairs)]
    grads = {
        d.name: rng.standard_normal((args.pairs, args.dim)).astype(np.float32)
        for d in store_dirs(root, args.checkpoints)
    }
    targets: ValidationTargets = validation_targets(grads, subtasks)
    checkpoints = [
        CheckpointGradients(
            d.name, GradientStore.open(d), targets.targets[i], 1.0 / (i + 1), pair_vectors=targets.vectors[i]
        )
        for i, d in enumerate(store_dirs(root, args.checkpoints))
    ]
    validation = Dataset.from_dict(
        {
            "prompt": [f"prompt {j}" for j in range(args.pairs)],
            "chosen": ["yes"] * args.pairs,
            "rejected": ["no"] * args.pairs,
            "subtask": subtasks,
        }
    )
    chosen = np.sort(rng.choice(args.pool, size=int(np.ceil(args.fraction * args.pool)), replace=False))
    out = root / "selection"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    start = time.perf_counter()
    write_contributions(out, checkpoints, chosen, validation, targets.usable)
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_kib() / 1024,
        "rows": len(chosen),
        "file_mb": (out / "contributions.parquet").stat().st_size / 1e6,
    }
    if not args.no_scoring:
        start = time.perf_counter()
        score_checkpoints(checkpoints, targets.subtasks)
        result["scoring_seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def run_child(root: Path, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(root), *argv], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=270_000)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--subtasks", type=int, default=18)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--no-scoring", action="store_true", help="skip timing the whole scoring for comparison")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the stores under --dir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child), args)

    root = Path(args.dir or f"/tmp/rose-contributions-bench-{os.getpid()}")
    argv = [f"--{k}={getattr(args, k)}" for k in ("pool", "fraction", "pairs", "subtasks", "checkpoints", "dim")]
    argv += ["--no-scoring"] if args.no_scoring else []
    try:
        if not all((d / "meta.json").exists() for d in store_dirs(root, args.checkpoints)):
            start = time.perf_counter()
            fill(root, args.pool, args.dim, args.checkpoints, "float16")
            print(f"filled the stores in {time.perf_counter() - start:.0f} s", flush=True)
        files = [f for d in store_dirs(root, args.checkpoints) for f in sorted(d.glob("*.npy"))]
        gb = sum(f.stat().st_size for f in files) / 1e9
        print(
            f"pool={args.pool:,} selected={int(np.ceil(args.fraction * args.pool)):,} pairs={args.pairs} "
            f"subtasks={args.subtasks} checkpoints={args.checkpoints} dim={args.dim} stores={gb:.1f} GB "
            f"cpus={os.cpu_count()}"
        )
        print("| cache | contributions s | peak RSS MB | contributions.parquet MB | whole scoring s |")
        print("|---|---|---|---|---|")
        for cache in ("cold", "warm"):
            if cache == "cold":
                drop_from_page_cache(files)
            r = run_child(root, argv)
            print(
                f"| {cache} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['file_mb']:.0f} | "
                f"{r.get('scoring_seconds', float('nan')):.0f} |",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
