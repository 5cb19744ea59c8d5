"""Memory the gradient path adds per row, on top of a plain forward+backward of the same batch (CPU).

    python benchmarks/memory/extraction_memory.py [--layers 1 4 --rows 1 4 16 --seq-len 128 --paths fused dense]
    python benchmarks/memory/extraction_memory.py --model smollm2-135m --paths fused fused_plain_loss backbone
    python benchmarks/memory/extraction_memory.py --model smollm2-135m --estimates  # estimates vs measured peaks
    python benchmarks/memory/extraction_memory.py --model smollm2-135m --saved      # what a layer saves, by tensor

Model: Llama-2-7B's shape (hidden 4096, intermediate 11008, 32 heads, vocab 32000) with random float32
weights, truncated to L decoder layers, with LESS's adapter: LoRA r=128, alpha 512 on q,k,v,o. For each L
and rows per pass, at --seq-len tokens a row:
- plain: the same forward and per-row SFT loss, backward w.r.t. the LoRA weights (what training on that
  loss does): what is left, extra, is the gradient path's own cost;
- fused: this engine's pass, per-layer Adam preconditioning and sjlt projection inside the backward
  (`per_example_projected_gradients`);
- dense: the whole-row path that the fused one replaced (`per_example_gradients` + `project`).
Memory is real allocation: every allocation and free of the pass, read from torch's profiler
(`profile_memory=True`), peak live bytes above what was allocated before the pass. extra = peak(path) -
peak(plain) of the same batch; extra per row = least-squares slope of extra over the rows settings (the
Adam state, the projector's plan and the adapter's summed gradient are paid once a pass, not per row).
- fused_plain_loss: the fused pass with the loss's logits unbounded (`LOSS_CHUNK_ELEMENTS` off): what the
  fused path cost before the chunked loss, where the chunked loss applies (49k words at 4 rows of 256 tokens);
- backbone: the decoder's forward and backward alone (the sum of the final hidden states at the labelled
  positions as the loss, no LM head): what the activations cost without any logits.
--model smollm2-135m: SmolLM2-135M's shape (30 layers, hidden 576, vocab 49152, tied embeddings), LoRA r=8
(alpha 4r) on q,k,v,o, 256 tokens, rows 1 2 4 by default.
The last line is `extra_mb_per_row_L<l>=<MB> ...` for the fused path, for every L.
--estimates [kinds]: for each pass kind (gradient, evaluation, validation, reference, training;
  rose_trl.resources.memory's docstring says what each runs), the estimate of what the pass adds
  (`estimate_pass(...).transient`) against the peak of live bytes its real code path allocates, and how far
  the same pass raises the process's RSS (the CPU heap's slack, rose_trl.resources.budget.HEAP_SLACK); the last
  line is `worst_relative_error=<e> heap=<mode> largest_rss_rise_over_estimate=<r>`.
  --compact-heap: the same with glibc's heap made compact first.
--saved: the tensors autograd saves for the backward in one decoder layer, tensor by tensor (no mask, padding mask,
  train mode with LoRA dropout), against `rose_trl.resources.memory.layer_bytes`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import SHAPES, build_model
from torch.profiler import ProfilerActivity, profile

from rose_trl.gradients import sft_loss
from rose_trl.gradients.capture import (
    AdamState,
    per_example_gradients,
    per_example_projected_gradients,
    trainable_parameters,
)
from rose_trl.gradients.projection import build_projector
from rose_trl.gradients.sft_loss import model_inputs, sft_per_example_loss


def batch_of(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, seq_len), generator=g)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def peak_bytes(fn) -> int:
    """Peak live bytes that `fn()` allocates above what is allocated when it starts, from the profiler's
    allocation events (every allocation and free of torch's CPU allocator, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    ):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def passes(model, projector, adam: AdamState) -> dict:
    params = [p for _, p in trainable_parameters(model)]

    def plain(batch):
        inputs, positions = model_inputs(model, batch)
        return torch.autograd.grad(
            sft_per_example_loss(model(**inputs).logits, batch["labels"], positions).sum(), params
        )

    def fused_plain_loss(batch):
        bound, sft_loss.LOSS_CHUNK_ELEMENTS = sft_loss.LOSS_CHUNK_ELEMENTS, 2**62
        try:
            return per_example_projected_gradients(model, batch, projector, adam)
        finally:
            sft_loss.LOSS_CHUNK_ELEMENTS = bound

    def backbone(batch):
        inputs, positions = model_inputs(model, batch)
        inputs.pop("logits_to_keep", None)
        hidden = sft_loss._chunkable_head(model)[0](**inputs).last_hidden_state
        return torch.autograd.grad(hidden[:, positions].sum() if positions is not None else hidden.sum(), params)

    return {
        "plain": plain,
        "fused": lambda b: per_example_projected_gradients(model, b, projector, adam),
        "dense": lambda b: projector.project(per_example_gradients(model, b, adam_state=adam)),
        "fused_plain_loss": fused_plain_loss,
        "backbone": backbone,
    }


def measure(
    shape: str, layers: int, rows_list: list[int], seq_len: int, lora_r: int, dim: int, paths: list[str], log=print
) -> dict:
    """{path: {rows: extra bytes over plain}} for one depth, plus the plain peaks under "plain"."""
    model = build_model(shape, layers, lora_r)
    vocab = SHAPES[shape]["vocab_size"]
    n = sum(p.numel() for _, p in trainable_parameters(model))
    g = torch.Generator().manual_seed(1)
    adam = AdamState(torch.randn(n, generator=g) * 1e-4, torch.rand(n, generator=g) * 1e-8, 0.9, 0.999, 1e-8)
    projector = build_projector("sjlt", n, dim, seed=0)
    runs = passes(model, projector, adam)
    warm = batch_of(1, seq_len, vocab)
    for path in ["plain", *paths]:  # the projector's plan and lazy inits are paid before measuring
        runs[path](warm)
    result = {path: {} for path in ["plain", *paths]}
    for rows in rows_list:
        batch = batch_of(rows, seq_len, vocab, seed=rows)
        for path in ["plain", *paths]:
            start = time.perf_counter()
            result[path][rows] = peak_bytes(functools.partial(runs[path], batch))
            log(
                f"  L={layers} rows={rows:3d} {path:6s} peak {result[path][rows] / 1e6:10.1f} MB "
                f"({time.perf_counter() - start:.1f} s)"
            )
    del model
    return result


def per_row_slope(rows_list: list[int], extra: list[float]) -> float:
    return float(np.polyfit(np.asarray(rows_list, dtype=float), np.asarray(extra, dtype=float), 1)[0])


def run(
    shape: str,
    layers_list: list[int],
    rows_list: list[int],
    seq_len: int,
    lora_r: int,
    dim: int,
    paths: list[str],
    log=print,
) -> dict:
    """{(path, L): extra MB per row}, with the table printed through `log`."""
    table, slopes, peaks = [], {}, {}
    for layers in layers_list:
        result = measure(shape, layers, rows_list, seq_len, lora_r, dim, paths, log)
        for path in ["plain", *paths]:
            peaks[(path, layers)] = per_row_slope(rows_list, [result[path][r] / 1e6 for r in rows_list])
        for path in paths:
            extra = [(result[path][r] - result["plain"][r]) / 1e6 for r in rows_list]
            slopes[(path, layers)] = per_row_slope(rows_list, extra)
            for r, e in zip(rows_list, extra, strict=True):
                table.append((path, layers, r, result["plain"][r] / 1e6, result[path][r] / 1e6, e))
    log(f"{'path':6s} {'L':>2s} {'rows':>4s} {'plain MB':>10s} {'path MB':>10s} {'extra MB':>10s}")
    for path, layers, r, plain, peak, extra in table:
        log(f"{path:6s} {layers:2d} {r:4d} {plain:10.1f} {peak:10.1f} {extra:10.1f}")
    for (path, layers), slope in peaks.items():
        log(
            f"{path:6s} L={layers}: peak {slope:.2f} MB per row"
            + (f", extra {slopes[(path, layers)]:.2f} MB per row" if (path, layers) in slopes else "")
        )
    return slopes


# ---- estimates (rose_trl.resources.memory) against measured peaks, pass by pass -------------------------------


def dpo_trainer(model, vocab: int, tmp: str):
    """A ROSEDPOTrainer around `model` (its tokenizer a word-level one of a few words: the measured batches are
    random token ids of the model's vocabulary, fed to TRL's loss directly)."""
    from datasets import Dataset

    from rose_trl.models.tiny import build_tokenizer
    from rose_trl.stores.validation import ROSEDPOTrainer, validation_dpo_config

    tokenizer = build_tokenizer(["a b c d e f g h"])
    pairs = Dataset.from_list([{"prompt": "a b", "chosen": " c d", "rejected": " e f"}])
    return ROSEDPOTrainer(model, validation_dpo_config(tmp, batch_size=1, use_cpu=True), pairs, tokenizer)


def dpo_batch(pairs: int, width: int, vocab: int, seed: int = 0) -> dict:
    """[chosen..., rejected...] rows of `width` tokens (the last rejected rows a quarter shorter, padded), a
    quarter of each prompt; the reference's log-probs precomputed (zeros), as the validation passes run."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * pairs, width), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, width - width // 4 :] = 0
    completion = mask.clone()
    completion[:, : width // 4] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "completion_mask": completion,
        "ref_chosen_logps": torch.zeros(pairs),
        "ref_rejected_logps": torch.zeros(pairs),
    }


def rss_rise(fn) -> int:
    """How far `fn()` raises the process's peak resident memory above its RSS when it starts (Linux: the peak is
    reset through /proc/self/clear_refs, and freed heap pages returned first, as budget.resident_bytes does)."""
    import gc
    import re

    from rose_trl.resources.budget import resident_bytes

    gc.collect()
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    return peak - before


def _run_pass(kind: str, model, featurizer, adam, trainer, rows: int, batch: dict):
    """One pass of `kind` over `batch` (`rows` rows, or pairs for the DPO kinds), as the pipeline runs it."""
    if kind == "gradient":
        return featurizer(model, batch, adam)
    if kind == "validation":
        pairs = rows
        return featurizer(
            model,
            batch,
            loss=lambda b: trainer.compute_loss(trainer.model, b) * pairs,
            combine=lambda r: r[:pairs] + r[pairs:],
        )
    if kind == "reference":
        return trainer.compute_ref_log_probs(trainer.model, batch)
    if kind == "evaluation":
        from rose_trl.evaluation.metrics import response_logps

        return response_logps(model, batch)
    model.train()
    try:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            fused_lm_head=True,
        )
        out.loss.backward()
        for p in model.parameters():
            p.grad = None
    finally:
        model.eval()


def _pass_batch(kind: str, rows: int, width: int, vocab: int, seed: int) -> dict:
    if kind in ("validation", "reference"):
        return dpo_batch(rows, width, vocab, seed)
    return batch_of(rows, width, vocab, seed)


def estimate_passes(
    shape_name: str, layers: int, rows_list: list[int], width: int, lora_r: int, dim: int, kinds: list[str], log=print
) -> list[tuple]:
    """(kind, layers, rows, estimated MB, measured MB, RSS rise MB) of each pass kind: the estimate's transient
    part (what the pass adds to the resident weights, adapter and optimizer state) against the pass's measured
    peak of live bytes, and how far the same pass, run again without the profiler, raised the process's RSS."""
    import gc
    import tempfile

    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.resources.memory import LoraShape, ModelShape, estimate_pass

    rows_out, model, trainer = [], None, None
    for kind in kinds:
        if model is None or kind == "training":  # one model for the eval-mode passes; training's has LoRA dropout
            model = trainer = None
            gc.collect()
            model = build_model(shape_name, layers, lora_r, lora_dropout=0.1 if kind == "training" else 0.0)
        vocab = model.config.vocab_size
        shape, lora = ModelShape.from_model(model), LoraShape.from_model(model)
        n = sum(p.numel() for _, p in trainable_parameters(model))
        g = torch.Generator().manual_seed(1)
        adam = AdamState(torch.randn(n, generator=g) * 1e-4, torch.rand(n, generator=g) * 1e-8, 0.9, 0.999, 1e-8)
        featurizer = Featurizer(build_projector("sjlt", n, dim, seed=0))
        tmp = tempfile.mkdtemp()
        if trainer is None and kind in ("validation", "reference"):
            trainer = dpo_trainer(model, vocab, tmp)
        if kind == "training":  # TRL's SFT loss: its fused LM head (SFTTrainer's outputs) on the base model
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))

        run = functools.partial(_run_pass, kind, model, featurizer, adam, trainer)
        run(1, _pass_batch(kind, 1, width, vocab, 0))  # lazy inits, the projection plan
        for rows in rows_list:
            est = estimate_pass(kind, shape, lora, "float32", rows, width, labelled_fraction=0.75, dim=dim)
            batch = _pass_batch(kind, rows, width, vocab, rows)
            measured = peak_bytes(functools.partial(run, rows, batch))
            rise = rss_rise(functools.partial(run, rows, batch))
            rows_out.append((kind, layers, rows, est.transient / 1e6, measured / 1e6, rise / 1e6))
            log(
                f"  {kind:10s} L={layers} rows={rows:3d} estimate {est.transient / 1e6:9.1f} MB "
                f"measured {measured / 1e6:9.1f} MB, RSS rise {rise / 1e6:9.1f} MB  ({est.describe()})"
            )
    model = trainer = None
    gc.collect()
    return rows_out


def saved_tensors(shape_name: str, width: int, lora_r: int, masked: bool, training: bool, log=print) -> int:
    """The tensors autograd saves for the backward in one decoder layer (the second of two), one row of `width`
    tokens: what rose_trl.resources.memory.layer_bytes counts. Returns their bytes per token."""
    model = build_model(shape_name, 2, lora_r, lora_dropout=0.1 if training else 0.0)
    model.train(training)
    base = model.get_base_model()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = ["outside"], {}
    layer = base.model.layers[1]
    for name, module in layer.named_modules():
        module.register_forward_pre_hook(lambda m, a, n=name or "layer": where.append(n))
        module.register_forward_hook(lambda m, a, o: (where.pop(), None)[1])

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen and where[-1] != "outside":
            seen[key] = (where[-1], tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    ids = torch.randint(3, model.config.vocab_size, (1, width))
    mask = torch.ones_like(ids)
    if masked:
        mask[0, -1] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.model(input_ids=ids, attention_mask=mask if masked else None, use_cache=False)
    for module, tensor_shape, dtype, nbytes in seen.values():
        log(f"  {module:40s} {str(tensor_shape):24s} {str(dtype):14s} {nbytes / width:10.1f} bytes a token")
    total = sum(v[3] for v in seen.values()) / width
    log(f"  saved in one layer: {total:.1f} bytes a token")
    return total


MODEL_DEFAULTS = {
    "llama-2-7b": dict(layers=[1, 4], rows=[1, 4, 16], seq_len=128, lora_r=128),
    "smollm2-135m": dict(layers=[30], rows=[1, 2, 4], seq_len=256, lora_r=8),
    "tiny-recipe": dict(layers=[2], rows=[1, 4, 16], seq_len=256, lora_r=8),
}
NAMES = {"llama-2-7b": "Llama-2-7B", "smollm2-135m": "SmolLM2-135M", "tiny": "tiny", "tiny-recipe": "tiny recipe"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", choices=list(MODEL_DEFAULTS))
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default 1 4 (llama-2-7b), 30 (smollm2-135m)")
    p.add_argument(
        "--rows", type=int, nargs="+", default=None, help="default 1 4 16 (llama-2-7b), 1 2 4 (smollm2-135m)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (llama-2-7b), 256 (smollm2-135m)")
    p.add_argument("--lora-r", type=int, default=None, help="default 128 (llama-2-7b), 8 (smollm2-135m)")
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument(
        "--paths",
        nargs="+",
        default=["fused"],
        choices=["fused", "dense", "fused_plain_loss", "backbone"],
        help="dense (the whole-row path) costs ~67 MB per layer per row at r=128 and minutes more",
    )
    p.add_argument("--tiny", action="store_true", help="a small model shape (seconds; what the tests run)")
    p.add_argument(
        "--compact-heap",
        action="store_true",
        help="with --estimates: glibc's heap made compact first (rose_trl.resources.budget.compact_heap)",
    )
    p.add_argument(
        "--saved",
        action="store_true",
        help="instead: list the tensors autograd saves in one decoder layer, against memory.layer_bytes",
    )
    p.add_argument(
        "--estimates",
        nargs="*",
        default=None,
        choices=["gradient", "validation", "reference", "evaluation", "training"],
        help="instead: each pass kind's estimate (rose_trl.resources.memory) against its measured peak "
        "(all kinds when given alone)",
    )
    args = p.parse_args()
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    shape = "tiny" if args.tiny else args.model
    if args.saved:
        from rose_trl.resources.memory import LoraShape, ModelShape, layer_bytes

        for masked, training in ((False, False), (True, False), (True, True)):
            print(f"{'padding mask' if masked else 'no mask'}, {'train' if training else 'eval'} mode:")
            measured = saved_tensors(shape, args.seq_len, args.lora_r, masked, training)
            model = build_model(shape, 2, args.lora_r, lora_dropout=0.1 if training else 0.0)
            counted = layer_bytes(ModelShape.from_model(model), LoraShape.from_model(model), 4, masked, training)
            print(f"  rose_trl.resources.memory.layer_bytes: {counted} bytes a token ({counted / measured:.3f}x)")
        return
    if args.estimates is not None:
        from rose_trl.resources.budget import _heap as budget_heap
        from rose_trl.resources.budget import compact_heap

        if args.compact_heap:
            compact_heap()
        kinds = args.estimates or ["gradient", "evaluation", "validation", "reference", "training"]
        table = []
        for layers in args.layers:
            table += estimate_passes(
                shape,
                layers,
                args.rows,
                args.seq_len,
                args.lora_r,
                args.dim,
                kinds,
                log=lambda s: print(s, flush=True),
            )
        print(
            f"{'pass':10s} {'L':>2s} {'rows':>4s} {'estimate MB':>12s} {'measured MB':>12s} {'ratio':>6s} "
            f"{'RSS rise MB':>12s} {'rise/est':>8s}"
        )
        for kind, layers, rows, est, measured, rise in table:
            print(
                f"{kind:10s} {layers:2d} {rows:4d} {est:12.1f} {measured:12.1f} {est / measured:6.2f} "
                f"{rise:12.1f} {rise / est:8.2f}"
            )
        worst = max(abs(est / measured - 1) for _, _, _, est, measured, _ in table)
        print(
            f"worst_relative_error={worst:.3f} heap={budget_heap['mode']} "
            f"largest_rss_rise_over_estimate={max(rise / est for *_, est, _, rise in table):.2f}"
        )
        return
    print(
        f"model: {NAMES[shape]} shape, LoRA r={args.lora_r} on q,k,v,o, {args.seq_len} tokens "
        f"a row, sjlt -> {args.dim} dims, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    slopes = run(
        shape,
        args.layers,
        args.rows,
        args.seq_len,
        args.lora_r,
        args.dim,
        args.paths,
        log=lambda s: print(s, flush=True),
    )
    print(
        " ".join(
            f"extra_mb_per_row_L{layers}={slopes[('fused', layers)]:.2f}"
            for layers in args.layers
            if ("fused", layers) in slopes
        )
    )


if __name__ == "__main__":
    main()
