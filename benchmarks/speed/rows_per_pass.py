"""Seconds a row of a pool gradient pass and of a validation pass take, against the rows a pass: what a larger
memory budget buys (the budget sizes the passes: rose_trl/resources/budget.py).

    python benchmarks/speed/rows_per_pass.py --model smollm2-135m                 # rows 1 2 4 8 16, 256 tokens
    python benchmarks/speed/rows_per_pass.py --model smollm2-135m --compact-heap  # glibc's heap made compact first
    python benchmarks/speed/rows_per_pass.py --model llama-2-7b --layers 2 --rows 1 2 4 8 --seq-len 256

Model: a random-weight model of the shape (benchmarks/common.py; LoRA on q,k,v,o), truncated to --layers decoder
layers, float32, on the CPU. Each pass runs the project's own code path, as the memory benchmark does
(benchmarks/memory/extraction_memory.py --estimates): a gradient pass is the run's featurizer (per-row gradients
of the SFT loss, Adam-preconditioned, projected to --dim by sjlt); a validation pass is TRL's DPO loss through
`ROSEDPOTrainer.compute_loss` under the featurizer (pairs of a chosen and a rejected row, the reference's
log-probs precomputed, TRL's fused head on the labelled positions as the run's passes score them). For each rows
setting the same --total rows are run (passes of that many rows), after one pass to warm up; the seconds and the
CPU-seconds (user + system, this process) are per row, the best of --repeats.
Beside each: the budget that gives passes of that many rows (rose_trl.resources.memory's estimate of the pass at
the model's full depth, times the heap's slack, on top of what this process holds: `needs`).
The last line: `seconds_per_row_<kind>_r<rows>=<s> ...` for every kind and rows setting.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "memory"))  # the memory benchmark's batches
from common import SHAPES, build_model  # noqa: E402
from extraction_memory import batch_of, dpo_batch, dpo_trainer  # noqa: E402

from rose_trl.gradients.capture import AdamState, trainable_parameters  # noqa: E402
from rose_trl.gradients.featurizer import Featurizer  # noqa: E402
from rose_trl.gradients.projection import build_projector  # noqa: E402
from rose_trl.stores.validation import labelled_positions_only  # noqa: E402


DEFAULTS = {
    "smollm2-135m": dict(layers=None, rows=[1, 2, 4, 8, 16], seq_len=256, lora_r=8),
    "llama-2-7b": dict(layers=2, rows=[1, 2, 4, 8], seq_len=256, lora_r=128),
    "tiny-recipe": dict(layers=None, rows=[1, 2, 4, 8, 16], seq_len=256, lora_r=8),
}


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_rows(run, make, rows: int, total: int, repeats: int) -> tuple[float, float]:
    """(seconds, CPU-seconds) a row over `total` rows in passes of `rows`, the best of `repeats`."""
    batches = [make(rows, seed) for seed in range(max(1, total // rows))]
    run(rows, batches[0])  # warm-up: lazy inits, the allocator's first blocks
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), cpu_seconds()
        for batch in batches:
            run(rows, batch)
        n = rows * len(batches)
        best = min(best, ((time.perf_counter() - wall) / n, (cpu_seconds() - cpu) / n))
    return best


def needed_gb(kind: str, full_shape, lora, rows: int, width: int, dim: int, resident: int) -> float:
    from rose_trl.resources.budget import GB, heap_slack
    from rose_trl.resources.memory import estimate_pass

    est = estimate_pass(kind, full_shape, lora, "float32", rows, width, labelled_fraction=0.75, dim=dim)
    return (resident + heap_slack("cpu") * est.transient) / GB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=list(DEFAULTS))
    p.add_argument("--layers", type=int, default=None, help="decoder layers built (default: all; llama-2-7b: 2)")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="rows a pass (validation: pairs a pass)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens a row (default 256)")
    p.add_argument("--lora-r", type=int, default=None)
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--total", type=int, default=16, help="rows (pairs) timed at each setting (default 16)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--kinds", nargs="+", default=["gradient", "validation"], choices=["gradient", "validation"])
    p.add_argument("--compact-heap", action="store_true", help="glibc's heap made compact first (budget.compact_heap)")
    args = p.parse_args()
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.manual_seed(0)
    from rose_trl.resources.budget import compact_heap, resident_bytes
    from rose_trl.resources.memory import LoraShape, ModelShape

    if args.compact_heap:
        compact_heap()
    model = build_model(args.model, args.layers, args.lora_r)
    full = dict(SHAPES[args.model])
    layers = args.layers or full["num_hidden_layers"]
    shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
    from transformers import LlamaConfig

    full_shape = ModelShape.from_config(LlamaConfig(**full))
    # What the process would hold at full depth: this one's RSS, with the weights of the layers not built added.
    resident = resident_bytes() + 4 * (full_shape.parameters - shape.parameters)
    vocab = model.config.vocab_size
    n = sum(q.numel() for _, q in trainable_parameters(model))
    g = torch.Generator().manual_seed(1)
    adam = AdamState(torch.randn(n, generator=g) * 1e-4, torch.rand(n, generator=g) * 1e-8, 0.9, 0.999, 1e-8)
    featurizer = Featurizer(build_projector("sjlt", n, args.dim, seed=0))
    trainer = dpo_trainer(model, vocab, tempfile.mkdtemp()) if "validation" in args.kinds else None
    heap = "compact" if args.compact_heap else "default"
    print(
        f"{args.model}: {layers} of {full['num_hidden_layers']} layers, LoRA r={args.lora_r}, {args.seq_len} tokens "
        f"a row, float32, glibc heap {heap}, {torch.get_num_threads()} threads; {args.total} rows timed a setting"
    )
    results = []
    for kind in args.kinds:

        def run(rows, batch, kind=kind):
            if kind == "gradient":
                return featurizer(model, batch, adam)
            with labelled_positions_only():  # as the run's validation passes
                return featurizer(
                    model,
                    batch,
                    loss=lambda b: trainer.compute_loss(trainer.model, b) * rows,
                    combine=lambda r: r[:rows] + r[rows:],
                )

        def make(rows, seed, kind=kind):
            if kind == "gradient":
                return batch_of(rows, args.seq_len, vocab, seed)
            return dpo_batch(rows, args.seq_len, vocab, seed)

        unit = "pair" if kind == "validation" else "row"
        for rows in args.rows:
            seconds, cpu = time_rows(run, make, rows, max(args.total, rows), args.repeats)
            needs = needed_gb(kind, full_shape, lora, rows, args.seq_len, args.dim, resident)
            results.append((kind, rows, seconds))
            print(
                f"  {kind:10s} {rows:3d} {unit}s a pass: {seconds:7.3f} s a {unit} ({cpu:7.3f} CPU-s) at {layers} "
                f"layers; at full depth the pass needs a budget of {needs:6.2f} GB (heap {heap})",
                flush=True,
            )
    print(" ".join(f"seconds_per_row_{k}_r{r}={s:.4f}" for k, r, s in results))


if __name__ == "__main__":
    main()
