"""Validation time per checkpoint with the reference's log-probs computed once per run (now) and in every pass of
every checkpoint (before): the same validation stores, the same gradients.

    python benchmarks/speed/validation_reference.py --model outputs/smollm2/model \\
        --pairs outputs/smollm2/se/validation.jsonl

SmolLM2-135M-Instruct (or any causal LM folder) with a LoRA adapter (r=8 on q,k,v,o); each "checkpoint" moves the
adapter's weights (the reference, the base model, does not move); ValidationGradients.store computes the
checkpoint's validation store through the run's featurizer. Both modes run alternately, `--repeats` times each;
the last line is `before_s_per_checkpoint=<s> after_s_per_checkpoint=<s> speedup=<x> max_abs_diff=<d>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True, help="preference pairs (prompt/chosen/rejected)")
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--pairs-per-pass", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rose_trl.config import ROSEConfig
    from rose_trl.data import load_preferences
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.validation import ROSEDPOTrainer, ValidationGradients

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    model.eval()
    validation = load_preferences(args.pairs)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    featurizer = Featurizer(build_projector("sjlt", n, 8192, 0))
    adapters = []
    g = torch.Generator().manual_seed(1)
    for _ in range(args.checkpoints):  # the adapter of each "checkpoint"
        adapters.append(
            {name: torch.randn(p.shape, generator=g) * 0.02 for name, p in model.named_parameters() if p.requires_grad}
        )
    print(
        f"{len(validation)} pairs, {args.checkpoints} checkpoints, {args.pairs_per_pass} pair(s) a pass, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    def run(reuse: bool) -> tuple[list[float], list[np.ndarray]]:
        real = ROSEDPOTrainer.pair_gradients
        ROSEDPOTrainer.pair_gradients = lambda self, f, reuse_reference=True: real(self, f, reuse_reference=reuse)
        try:
            config = ROSEConfig(validation_batch_size=args.pairs_per_pass)
            stores = ValidationGradients(
                validation, tokenizer, config, Path(tempfile.mkdtemp()) / "rose", "fp", args.max_length, use_cpu=True
            )
            identity = dict(model="m", projection=featurizer.projector.describe(), dtype="float32")
            times, rows = [], []
            for i, adapter in enumerate(adapters):
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name in adapter:
                            p.copy_(adapter[name])
                start = time.perf_counter()
                store = stores.store(model, f"checkpoint-{i}", featurizer, {**identity, "checkpoint": f"c{i}"})
                times.append(time.perf_counter() - start)
                rows.append(store.read_all())
            return times, rows
        finally:
            ROSEDPOTrainer.pair_gradients = real

    before, after = [], []
    for repeat in range(args.repeats):
        t_before, rows_before = run(reuse=False)
        t_after, rows_after = run(reuse=True)
        before.append(t_before)
        after.append(t_after)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(rows_before, rows_after, strict=True))
        print(
            f"repeat {repeat}: before {' '.join(f'{t:.1f}' for t in t_before)} s, "
            f"after {' '.join(f'{t:.1f}' for t in t_after)} s (per checkpoint), max |diff| {diff:.3g}",
            flush=True,
        )
    b, a = np.median(np.mean(before, axis=1)), np.median(np.mean(after, axis=1))
    print(
        f"before_s_per_checkpoint={b:.2f} after_s_per_checkpoint={a:.2f} speedup={b / a:.3f} max_abs_diff={diff:.3g}"
    )


if __name__ == "__main__":
    main()
