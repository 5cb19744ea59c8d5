"""Held-out preference metrics of a base model and of LoRA adapters trained from it, with 95% intervals.

    rose-trl evaluate --model outputs/smollm2/model --pairs outputs/smollm2/se/heldout.jsonl \
        --adapter rose=outputs/smollm2/run_se/final

The base model's log-probs are computed once and serve as every adapter's reference (the implicit reward
r = log pi - log ref, as in the selection's DPO loss). The base itself scores an implicit-reward accuracy
of 0.5 by construction; its likelihood accuracy (chosen vs rejected mean per-token log-prob) is what it
can be compared on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rose_trl.evaluation.metrics import PreferenceMetricsOptions, pair_logps, summarize_pairs
from rose_trl.utils.errors import BadInputError


def evaluate_adapters(
    base_model, tokenizer, pairs, adapters: dict[str, str], options: PreferenceMetricsOptions | None = None
) -> dict[str, dict]:
    """{"base": summary, <name>: summary for each adapter folder}; see preference_metrics for the keys."""
    from peft import PeftModel

    reference, counts = pair_logps(base_model, tokenizer, pairs, options)
    results = {"base": summarize_pairs(reference, counts, reference, pairs, options)}
    for name, folder in adapters.items():
        model = PeftModel.from_pretrained(base_model, folder)
        policy, _ = pair_logps(model, tokenizer, pairs, options)
        results[name] = summarize_pairs(policy, counts, reference, pairs, options)
        base_model = model.unload()  # the next adapter starts from the bare base again
    return results


def format_results(results: dict[str, dict]) -> str:
    def ci(pair):
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [f"{'model':<14} {'n':>4}  {'accuracy (95% CI)':<26} {'mean margin (95% CI)':<30} likelihood acc (95% CI)"]
    for name, r in results.items():
        lines.append(
            f"{name:<14} {r['n']:>4}  {r['accuracy']:.3f} {ci(r['accuracy_ci']):<20} "
            f"{r['reward_margin']:+.4f} {ci(r['reward_margin_ci']):<22} "
            f"{r['likelihood_accuracy']:.3f} {ci(r['likelihood_accuracy_ci'])}"
        )
    return "\n".join(lines)


def _evaluate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rose_trl.data.io import load_table
    from rose_trl.data.preferences import validate_preferences
    from rose_trl.models.source import resolve_model_source

    source = resolve_model_source(args.model, args.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    pairs = load_table(args.pairs)  # every column kept: `half` splits dev from test
    if args.half:
        if "half" not in pairs.column_names:
            raise BadInputError(
                f"--half {args.half}: {args.pairs} has no `half` column; leave --half out to use every pair"
            )
        pairs = pairs.filter(lambda r: r["half"] == args.half)
    validate_preferences(pairs, args.pairs)
    adapters = dict(a.split("=", 1) if "=" in a else (Path(a).name, a) for a in args.adapter)
    options = PreferenceMetricsOptions(
        beta=args.beta, batch_size=args.batch_size, max_length=args.max_length, memory_budget_gb=args.memory_budget_gb
    )
    results = evaluate_adapters(model, tokenizer, pairs, adapters, options)
    print(f"held-out pairs: {args.pairs}" + (f" ({args.half} half)" if args.half else ""))
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="held-out preference accuracy and margin (95%% bootstrap CIs) of a "
        "base model and of LoRA adapters trained from it",
    )
    p.add_argument("--model", required=True, help="base model: folder, Hub id or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model's folder or Hub repo")
    p.add_argument("--pairs", required=True, help="held-out preference pairs (prompt/chosen/rejected[/subtask])")
    p.add_argument("--half", choices=["dev", "test"], default=None, help="only the pairs of this `half`")
    p.add_argument("--adapter", action="append", default=[], help="NAME=FOLDER of a LoRA adapter (repeatable)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=8, help="rows a pass, at most (the memory budget may lower it)")
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="memory (GB) the process may use: passes are sized to it (default, for speed: what the process "
        "holds plus 75%% of the CPU memory available, or plus 90%% of the GPU's free memory)",
    )
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=_evaluate)
