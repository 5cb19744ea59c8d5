"""Does ROSE's training-gradient pass fit one GPU for a 7B model with LoRA r=128? (GPU only)

    python benchmarks/gpu_memory.py [--model llama-2-7b --lora-r 128 --budgets 8 16 32 --max-batch-tokens 16384]

A Llama-2-7B-shaped model (random weights, bf16; no download) gets LESS's adapter: LoRA r=128,
alpha 512 on q,k,v,o = 134M float32 parameters. For each `gradient_memory_gb` budget the pool's
gradients (lengths 256..2048 tokens, as LESS's max_seq_length) are extracted exactly as the callback
does it: batched per-example gradients, Adam preconditioning (m, v of the adapter's size), projection
(--projection, default sjlt), writes to a store. Prints
one JSON line per budget: rows per pass, peak GPU memory (torch.cuda.max_memory_allocated), ms per
example; an out-of-memory is reported as such rather than raised.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from rose_trl.extraction import extract_gradients, rows_for_budget
from rose_trl.gradients import AdamState, num_trainable_parameters
from rose_trl.projection import build_projector
from rose_trl.store import GradientStore

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000),
}


def build(args):
    config = LlamaConfig(**SHAPES[args.model], max_position_embeddings=4096, pad_token_id=0)
    with torch.device("cuda"):
        base = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation=args.attn)
    model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=4 * args.lora_r, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; a trained adapter does not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.eval()
    return model


def pool_of(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    pool = []
    for length in rng.integers(256, 2049, n):
        prompt = int(length) // 3
        pool.append({"input_ids": rng.integers(3, vocab, int(length)).tolist(),
                     "completion_mask": [0] * prompt + [1] * (int(length) - prompt)})
    return pool


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--budgets", type=float, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=32, help="upper bound on rows per pass")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--projection", default="sjlt", choices=["sjlt", "trak", "trak_cuda"])
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    args = parser.parse_args()

    model = build(args)
    n = num_trainable_parameters(model)
    adam = AdamState(torch.randn(n, device="cuda") * 1e-4, torch.rand(n, device="cuda") * 1e-8, 0.9, 0.999, 1e-8)
    projector = build_projector(args.projection, n, args.dim, seed=0, device="cuda")
    pool = pool_of(args.examples, SHAPES[args.model]["vocab_size"])
    print(json.dumps({"model": args.model, "lora_params": n, "gpu": torch.cuda.get_device_name(),
                      "weights_gb": round(torch.cuda.memory_allocated() / 1e9, 2), "projector": projector.implementation,
                      "attn": model.config._attn_implementation,
                      "tokens": sum(len(p["input_ids"]) for p in pool)}), flush=True)
    for budget in args.budgets:
        rows = rows_for_budget(n, args.batch_size, budget)
        with tempfile.TemporaryDirectory() as tmp:
            store = GradientStore.open_or_create(tmp + "/s", model=args.model, checkpoint="c", projection=projector.describe(),
                                                 gradient_type="adam", pool_fingerprint="bench", num_rows=len(pool))
            # Warm up kernels (and the projector's cached plan) on two examples, then measure.
            extract_gradients(model, pool, store, projector, 0, adam, batch_size=rows, missing=np.arange(2),
                              max_batch_tokens=args.max_batch_tokens, progress=False)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = {"gradient_memory_gb": budget, "rows_per_pass": rows, "max_batch_tokens": args.max_batch_tokens}
            try:
                done = extract_gradients(model, pool, store, projector, 0, adam, batch_size=rows,
                                         max_batch_tokens=args.max_batch_tokens, progress=False)
                torch.cuda.synchronize()
                result.update(ms_per_example=round(1000 * (time.perf_counter() - start) / done, 1),
                              complete=bool(store.is_complete))
            except torch.cuda.OutOfMemoryError:
                result["oom"] = True
            except RuntimeError as e:  # a CUDA error out of a kernel launch, etc.: reported, not raised
                result["error"] = str(e)[:300]
            result["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            result["total_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        print(json.dumps(result), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
