"""Gradient-extraction speed: a LESS-style reference vs this engine vs a plain forward+backward floor.

    python benchmarks/speed/extraction.py [--examples 256 --seq-len 128 --dim 8192 --batch-size 16]
    python benchmarks/speed/extraction.py --model smollm2-135m [--examples 32 --less-examples 8 --batch-size 4]
    python benchmarks/speed/extraction.py --model smollm2-135m --skip-less --gradient-layers 8 4 2 1  # truncated

--model tiny (default): a tiny Llama (hidden 256, 4 layers, vocab 8000; --hidden/--layers/--heads/--vocab).
--model smollm2-135m: SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, intermediate 1536,
    vocab 49152, tied embeddings) with random weights, 256 tokens a row by default. (a) is slow there (a
    batch-size-1 loop and trak regenerating a 921,600 x 8192 matrix per call), so it runs on the first
    --less-examples rows only and is compared per example.

(a) LESS-style: batch-size-1 loop with the model's own loss, LESS's Adam formula, trak BasicProjector
    (block_size 128) projecting every 16 examples, as LESS's collect_grad_reps does.
(b) this engine end to end: batched per-example gradients + Adam preconditioning + projection
    (--projection, sjlt by default) + writes to a memory-mapped store.
(c) floor: plain batched forward+backward of the same examples (the model's mean loss, full logits).
(c') with --model smollm2-135m also: the same with logits only at labelled positions, as (b) computes them.
(b), (c) (and (c')) are timed --repeats times, alternately, and their medians used.
--gradient-layers N [N ...] also times, for each N (ROSEConfig.gradient_layers: features from the LoRA modules of
the last N decoder layers, the backward stopped below them):
(b_N) this engine with gradient_layers N, and
(c_N) the floor of that pass: the same forward and the same truncated backward (to the kept layers' LoRA weights);
each line gives (b_N) against the full floor (c) and against (c_N).
The last line is `speedup_vs_less=<a/b> overhead_vs_fwd_bwd=<b/c>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import SHAPES, truncated_grad
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rose_trl.data.sft import collate
from rose_trl.gradients.capture import AdamState, GradientLayers, trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.projection import build_projector
from rose_trl.gradients.sft_loss import model_inputs
from rose_trl.stores.extraction import extract_gradients
from rose_trl.stores.store import GradientStore


def build(args):
    torch.manual_seed(0)
    if args.model == "tiny":
        shape = dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
        )
    else:
        shape = dict(SHAPES[args.model])
        args.vocab = shape["vocab_size"]
    config = LlamaConfig(**shape, max_position_embeddings=max(512, args.seq_len), pad_token_id=0)
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    )
    g = torch.Generator().manual_seed(1)
    pool = []
    for _ in range(args.examples):
        ids = torch.randint(3, args.vocab, (args.seq_len,), generator=g).tolist()
        prompt = args.seq_len // 4
        pool.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (args.seq_len - prompt)})
    # A few AdamW steps so that m and v are real (over the pool again where it holds fewer than 12 rows).
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(3):
        batch = collate([pool[(step * 4 + i) % len(pool)] for i in range(4)], 0)
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    opt.zero_grad()
    model.eval()
    return model, pool, opt


def less_style(model, pool, opt, dim):
    """LESS collect_grad_reps, restated: bs=1 loop, hard-coded Adam formula, trak BasicProjector per 16."""
    from trak.projectors import BasicProjector, ProjectionType

    params = [p for _, p in trainable_parameters(model)]
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params])
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    projector = BasicProjector(
        grad_dim=m.numel(),
        proj_dim=dim,
        seed=0,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        block_size=128,
        dtype=torch.float32,
    )
    out, pending = [], []
    for ex in pool:
        batch = collate([ex], 0)
        loss = model(**batch).loss
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
        pending.append((0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8))
        if len(pending) == 16:
            out.append(projector.project(torch.stack(pending), model_id=0))
            pending = []
    if pending:
        out.append(projector.project(torch.stack(pending), model_id=0))
    return torch.cat(out)


def engine(model, pool, opt, dim, projection, batch_size, gradient_layers=None):
    params = trainable_parameters(model)
    projector = build_projector(projection, sum(p.numel() for _, p in params), dim, seed=0)
    featurizer = Featurizer(projector, gradient_layers=gradient_layers)
    with tempfile.TemporaryDirectory() as tmp:
        store = GradientStore.open_or_create(
            tmp,
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
            featurizer,
            pad_token_id=0,
            adam_state=AdamState.from_optimizer(opt, params),
            batch_size=batch_size,
            progress=False,
        )
        return store.read_all()


def floor(model, pool, batch_size):
    params = [p for _, p in trainable_parameters(model)]
    for i in range(0, len(pool), batch_size):
        loss = model(**collate(pool[i : i + batch_size], 0)).loss
        torch.autograd.grad(loss, params)


def floor_truncated(model, pool, batch_size, layers: GradientLayers):
    """(c_N): the floor's forward, and its backward stopped below the last N layers (to their LoRA weights only)."""
    for i in range(0, len(pool), batch_size):
        truncated_grad(model, collate(pool[i : i + batch_size], 0), layers)


def floor_labelled(model, pool, batch_size):
    """(c) with the logits computed only where some row has a label (`logits_to_keep`, as the engine does):
    the same mean loss, a fairer floor where the LM head is a large part of the pass."""
    params = [p for _, p in trainable_parameters(model)]
    for i in range(0, len(pool), batch_size):
        batch = collate(pool[i : i + batch_size], 0)
        inputs, positions = model_inputs(model, batch)
        logits = model(**inputs).logits
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        labels = labels if positions is None else labels[:, positions]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        torch.autograd.grad(loss, params)


def timed(fn, *a):
    t = time.perf_counter()
    result = fn(*a)
    return time.perf_counter() - t, result


# Defaults of the real shape: a recipe's rows per pass at 256 tokens (max_batch_tokens 1024), fewer examples.
MODEL_DEFAULTS = {
    "tiny": dict(examples=256, seq_len=128, batch_size=16, less_examples=None),
    "smollm2-135m": dict(examples=32, seq_len=256, batch_size=4, less_examples=8),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(MODEL_DEFAULTS))
    p.add_argument("--examples", type=int, default=None, help="default 256 (tiny), 32 (smollm2-135m)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (tiny), 256 (smollm2-135m)")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (tiny), 4 (smollm2-135m)")
    p.add_argument(
        "--less-examples",
        type=int,
        default=None,
        help="(a) on the first N examples only, compared per example (default: all for tiny, 8 for smollm2-135m)",
    )
    p.add_argument("--projection", default="sjlt", choices=["sjlt", "trak"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--skip-less", action="store_true", help="skip (a); speedup_vs_less is then nan")
    p.add_argument(
        "--gradient-layers",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also time the engine with gradient_layers N (b_N) and the floor of that truncated pass (c_N)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="(b) and (c) are timed this many times, alternately, and their medians reported: the "
        "machine's speed drifts more between runs than the engine's overhead is",
    )
    args = p.parse_args(argv)
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    model, pool, opt = build(args)
    n_params = sum(p.numel() for _, p in trainable_parameters(model))
    if args.model != "tiny":
        print(f"model: {args.model} shape, random weights, vocab {args.vocab}")
    print(
        f"workload: {args.examples} examples x {args.seq_len} tokens, {n_params} LoRA params -> {args.dim} dims, "
        f"torch threads {torch.get_num_threads()}"
    )
    floor(model, pool[: args.batch_size], args.batch_size)  # warm-up
    engine(model, pool[: args.batch_size], opt, args.dim, args.projection, args.batch_size)
    floors, engines, labelled = [], [], []
    layered = {n: ([], [], GradientLayers(model, n)) for n in args.gradient_layers}
    for _ in range(args.repeats):
        floors.append(timed(floor, model, pool, args.batch_size)[0])
        engines.append(timed(engine, model, pool, opt, args.dim, args.projection, args.batch_size)[0])
        if args.model != "tiny":
            labelled.append(timed(floor_labelled, model, pool, args.batch_size)[0])
        for n, (engine_n, floor_n, layers) in layered.items():
            engine_n.append(timed(engine, model, pool, opt, args.dim, args.projection, args.batch_size, n)[0])
            floor_n.append(timed(floor_truncated, model, pool, args.batch_size, layers)[0])
    t_floor, t_engine = float(np.median(floors)), float(np.median(engines))
    print(f"(c) fwd+bwd floor       {t_floor:8.2f} s  {1000 * t_floor / len(pool):8.1f} ms/example")
    if labelled:
        t_labelled = float(np.median(labelled))
        print(
            f"(c') floor, labelled    {t_labelled:8.2f} s  {1000 * t_labelled / len(pool):8.1f} ms/example "
            f"(b)/(c') {t_engine / t_labelled:.3f}; per repeat: "
            + " ".join(f"{e / f:.3f}" for e, f in zip(engines, labelled, strict=True))
        )
    print(
        f"(b) rose_trl engine     {t_engine:8.2f} s  {1000 * t_engine / len(pool):8.1f} ms/example ({args.projection})"
    )
    if args.repeats > 1:
        print(
            f"    medians of {args.repeats}; per repeat (b)/(c): "
            + " ".join(f"{e / f:.3f}" for e, f in zip(engines, floors, strict=True))
        )
    for n, (engine_n, floor_n, layers) in layered.items():
        t_engine_n, t_floor_n = float(np.median(engine_n)), float(np.median(floor_n))
        print(
            f"(b_{n}) gradient_layers {n} of {layers.total}: engine {1000 * t_engine_n / len(pool):.1f} ms/example, "
            f"(c_{n}) its floor {1000 * t_floor_n / len(pool):.1f} ms/example; "
            f"layers={n} engine_over_full_floor={t_engine_n / t_floor:.3f} "
            f"engine_over_truncated_floor={t_engine_n / t_floor_n:.3f} truncated_floor_over_full_floor="
            f"{t_floor_n / t_floor:.3f}"
        )
    t_less, less_pool = float("nan"), pool[: args.less_examples]
    if not args.skip_less:
        t_less, _ = timed(less_style, model, less_pool, opt, args.dim)
        print(
            f"(a) LESS-style          {t_less:8.2f} s  {1000 * t_less / len(less_pool):8.1f} ms/example"
            + (f" (first {len(less_pool)} examples)" if len(less_pool) < len(pool) else "")
        )
    speedup = (t_less / len(less_pool)) / (t_engine / len(pool))
    print(f"speedup_vs_less={speedup:.2f} overhead_vs_fwd_bwd={t_engine / t_floor:.3f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
