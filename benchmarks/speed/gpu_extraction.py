"""Training-gradient extraction at 7B scale on one GPU: LESS-style loop vs this engine vs the floor.

    python benchmarks/speed/gpu_extraction.py                       # GPU: Llama-2-7B shape, bf16, LoRA r=128
    python benchmarks/speed/gpu_extraction.py --model llama-3.1-8b  # Llama-3.1-8B's shape (128k vocabulary)
    python benchmarks/speed/gpu_extraction.py --device cpu --tiny   # the same script in seconds (the tests run it)

Model: Llama-2-7B's shape with random bf16 weights (no download), LoRA r=128, alpha 512 on q,k,v,o (134M
parameters). Pool: instruction-like lengths, log-normal between 64 and 2048 tokens, median ~400.
Measured, in ms per example (each after a warm-up pass):
(a) LESS-style: batch size 1, the model's own loss, LESS's Adam formula, rows kept in fp16 and projected
    16 at a time with trak's CudaProjector when fast_jl imports, else with sjlt (labelled);
(b) this engine end to end: `extract_gradients` (length-sorted batches under --max-batch-tokens, fused
    per-layer Adam + sjlt projection, writes to a store);
(c) the floor: a plain forward+backward (the model's loss, w.r.t. the LoRA weights) of (b)'s batches.
Also: peak GPU memory of each, the largest rows per pass that fit at 512 and 2048 tokens, and the
projector checks left open for trak's fast_jl CudaProjector: the same rows projected twice (is it
deterministic?), P(1e4 x) against 1e4 P(x), and the Spearman correlation of projected scores with exact
cosine scores (ROSE's scoring: unit train rows against the mean unit validation row) for trak_cuda, trak
(BasicProjector) and sjlt, on real per-example gradients of the model (their first --check-params
coordinates). One JSON line per measurement; the last line is
`engine_over_floor=<b/c> less_over_engine=<a/b>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import SHAPES, build_model, instruction_lengths, random_pool, spearman

from rose_trl.data.sft import collate
from rose_trl.gradients.capture import AdamState, per_example_gradients, trainable_parameters
from rose_trl.gradients.projection import SparseJLProjector, build_projector
from rose_trl.stores.extraction import extract_gradients, plan_batches
from rose_trl.stores.store import GradientStore


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def floor(model, pool, batches, device):
    params = [p for _, p in trainable_parameters(model)]
    for rows in batches:
        batch = to(collate([pool[int(i)] for i in rows], 0), device)
        torch.autograd.grad(model(**batch).loss, params)


def engine(model, pool, projector, adam, batch_size, max_batch_tokens, store_dir):
    store = GradientStore.open_or_create(
        store_dir,
        model="bench",
        checkpoint="c",
        projection=projector.describe(),
        gradient_type="adam",
        pool_fingerprint="bench",
        num_rows=len(pool),
    )
    extract_gradients(
        model,
        pool,
        store,
        projector,
        0,
        adam_state=adam,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        progress=False,
    )
    return store


def less_projector(n, dim, device):
    """LESS's GPU projector when fast_jl is there (fp16 rows, as LESS feeds it), else sjlt."""
    if device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None:
        from trak.projectors import CudaProjector, ProjectionType

        impl = CudaProjector(
            grad_dim=n, proj_dim=dim, seed=0, proj_type=ProjectionType.rademacher, device=device, max_batch_size=16
        )
        return "trak CudaProjector (fast_jl)", lambda rows: impl.project(rows, model_id=0)
    sjlt = SparseJLProjector(n, dim, seed=0)
    return "sjlt (fast_jl not installed)", lambda rows: sjlt.project(rows)


def less_style(model, pool, adam, project, device):
    """LESS's collect_grad_reps restated: one example at a time, fp16 rows projected every 16."""
    params = [p for _, p in trainable_parameters(model)]
    m, v = adam.exp_avg.to(device), adam.exp_avg_sq.to(device)
    pending = []
    for ex in pool:
        loss = model(**to(collate([ex], 0), device)).loss
        g = torch.cat([x.reshape(-1).float() for x in torch.autograd.grad(loss, params)])
        pending.append(((0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)).half())
        if len(pending) == 16:
            project(torch.stack(pending))
            pending = []
    if pending:
        project(torch.stack(pending))


def timed(device, fn, *args):
    reset_peak(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, out


def largest_rows_that_fit(model, projector, adam, vocab, length, device, limit):
    """Doubling rows per pass at `length` tokens until a pass runs out of memory."""
    from rose_trl.gradients.capture import per_example_projected_gradients

    fits, rows = 0, 1
    while rows <= limit:
        try:
            batch = to(collate(random_pool([length] * rows, vocab, seed=rows), 0), device)
            per_example_projected_gradients(model, batch, projector, adam)
            sync(device)
            fits = rows
            rows *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            batch = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


def project_rows(projector, x):
    # trak's CudaProjector takes batches of 8, 16 or 32 rows.
    return torch.cat([projector.project(x[i : i + 8]) for i in range(0, len(x), 8)])


def rose_scores(train, val):
    t = torch.nn.functional.normalize(train.float(), dim=1)
    v = torch.nn.functional.normalize(val.float(), dim=1).mean(0)
    return (t @ v).cpu().numpy()


def projector_checks(model, pool, device, dim, check_params, seeds, log):
    """Determinism, scale and ranking quality of trak_cuda, trak and sjlt on the model's real gradients."""
    rows = [to(collate(pool[i : i + 8], 0), device) for i in range(0, min(len(pool), 48), 8)]
    grads = torch.cat([per_example_gradients(model, b)[:, :check_params] for b in rows])
    train, val = grads[8:], grads[:8]
    exact = rose_scores(train, val)
    kinds = ["sjlt", "trak"] + (["trak_cuda"] if device.type == "cuda" and importlib.util.find_spec("fast_jl") else [])
    for kind in kinds:
        quality = []
        for seed in range(seeds):
            projector = build_projector(kind, train.shape[1], dim, seed=seed, device=device)
            quality.append(spearman(exact, rose_scores(project_rows(projector, train), project_rows(projector, val))))
        projector = build_projector(kind, train.shape[1], dim, seed=0, device=device)
        x = train[:16]
        once, twice = project_rows(projector, x), project_rows(projector, x)
        scaled = project_rows(projector, x * 1e4)
        log(
            {
                "check": "projector",
                "projection": kind,
                "implementation": projector.implementation,
                "input_dim": int(train.shape[1]),
                "dim": dim,
                "deterministic": bool(torch.equal(once, twice)),
                "scale_rel_error": float(((scaled - 1e4 * once).norm() / (1e4 * once).norm()).item()),
                "spearman_vs_exact_mean": round(float(np.mean(quality)), 4),
                "spearman_vs_exact_min": round(float(np.min(quality)), 4),
                "seeds": seeds,
            }
        )
    if "trak_cuda" not in kinds:
        log({"check": "projector", "projection": "trak_cuda", "skipped": "needs a CUDA device and fast_jl"})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="llama-2-7b", choices=[s for s in SHAPES if s != "tiny"])
    p.add_argument("--tiny", action="store_true", help="tiny model, short rows, float32: seconds, any device")
    p.add_argument("--examples", type=int, default=None, help="pool rows for (b) and (c) (default 96; tiny 24)")
    p.add_argument("--less-examples", type=int, default=None, help="rows for the slow (a) (default 32; tiny 8)")
    p.add_argument("--lora-r", type=int, default=None, help="default 128 (tiny: 8)")
    p.add_argument("--dim", type=int, default=None, help="projection dims (default 8192; tiny 512)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per pass at most")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="default 16384 (tiny 512)")
    p.add_argument(
        "--check-params",
        type=int,
        default=None,
        help="gradient coordinates for the projector checks (default 2^22; tiny: all)",
    )
    p.add_argument("--check-seeds", type=int, default=5)
    p.add_argument("--attn", default="sdpa")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    tiny = args.tiny
    shape = "tiny" if tiny else args.model
    dtype = torch.float32 if tiny or device.type == "cpu" else torch.bfloat16
    examples = args.examples or (24 if tiny else 96)
    less_examples = args.less_examples or (8 if tiny else 32)
    lora_r = args.lora_r or (8 if tiny else 128)
    dim = args.dim or (512 if tiny else 8192)
    max_tokens = args.max_batch_tokens or (512 if tiny else 16384)
    check_params = args.check_params or (None if tiny else 1 << 22)
    vocab = SHAPES[shape]["vocab_size"]
    results = []

    def log(record):
        results.append(record)
        print(json.dumps(record), flush=True)

    model = build_model(shape, lora_r=lora_r, dtype=dtype, device=str(device), attn=args.attn)
    n = sum(p.numel() for _, p in trainable_parameters(model))
    g = torch.Generator().manual_seed(1)
    adam = AdamState(torch.randn(n, generator=g) * 1e-4, torch.rand(n, generator=g) * 1e-8, 0.9, 0.999, 1e-8).to(
        device
    )
    projector = build_projector("sjlt", n, dim, seed=0, device=device)
    lengths = instruction_lengths(
        examples, low=8 if tiny else 64, high=64 if tiny else 2048, median=24 if tiny else 400
    )
    pool = random_pool(lengths, vocab)
    log(
        {
            "model": shape,
            "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "lora_params": n,
            "examples": examples,
            "tokens": int(lengths.sum()),
            "median_length": float(np.median(lengths)),
            "weights_gb": peak_gb(device),
            "projection": projector.implementation,
        }
    )

    batches = plan_batches(lengths, np.arange(len(pool)), args.batch_size, max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: kernels, the projector's plan, the allocator.
        floor(model, pool, batches[-1:], device)
        engine(model, pool[:2], projector, adam, args.batch_size, max_tokens, f"{tmp}/warm")
        t_floor, _ = timed(device, floor, model, pool, batches, device)
        log(
            {
                "path": "(c) floor",
                "ms_per_example": round(1000 * t_floor / examples, 2),
                "peak_gb": peak_gb(device),
                "passes": len(batches),
            }
        )
        t_engine, _ = timed(device, engine, model, pool, projector, adam, args.batch_size, max_tokens, f"{tmp}/store")
        log(
            {
                "path": "(b) engine",
                "ms_per_example": round(1000 * t_engine / examples, 2),
                "peak_gb": peak_gb(device),
                "max_batch_tokens": max_tokens,
            }
        )
    label, project = less_projector(n, dim, device)
    less_style(model, pool[:1], adam, project, device)
    t_less, _ = timed(device, less_style, model, pool[:less_examples], adam, project, device)
    log(
        {
            "path": "(a) LESS-style",
            "projector": label,
            "ms_per_example": round(1000 * t_less / less_examples, 2),
            "peak_gb": peak_gb(device),
            "examples": less_examples,
        }
    )
    for length in [32, 64] if tiny else [512, 2048]:
        log(
            {
                "check": "largest rows per pass",
                "tokens": length,
                "rows": largest_rows_that_fit(
                    model, projector, adam, vocab, length, device, limit=16 if tiny else 256
                ),
            }
        )
    projector_checks(model, pool, device, dim, check_params or n, args.check_seeds, log)
    b_over_c = t_engine / t_floor
    a_over_b = (t_less / less_examples) / (t_engine / examples)
    print(f"engine_over_floor={b_over_c:.3f} less_over_engine={a_over_b:.2f}")
    return results


if __name__ == "__main__":
    main()
