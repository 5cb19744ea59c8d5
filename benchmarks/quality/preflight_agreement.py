"""How well `rose-trl check-pairs` (the pairs' agreement before any warm-up) predicts the agreement a run reports
after its warm-up, on the property targets of docs/results/property_targets.md and on the released SE and HH pairs.

    python benchmarks/quality/preflight_agreement.py --model outputs/smollm2/model --out outputs/props_full
    python benchmarks/quality/preflight_agreement.py --model outputs/smollm2/model --quick --out outputs/props_quick

The warm-up is the property suite's (`property_targets.PropertyBench.warmup`: LoRA r 8 on q/k/v/o, 10% of the
suite's pool, 2 epochs, a checkpoint per epoch; reused when the benchmark left it under --out). For every
validation set, the pairs' gradient features (`rose_trl.run.preflight.pair_vectors`: the run's validation path and
projection) are computed
- after the warm-up, at each checkpoint (what the run's summary.json reports, eta-weighted), and
- before it, by each candidate (default: fresh and last_layer; --candidates for others): `fresh` (the base model
  with a fresh LoRA adapter, seed 0: what check-pairs does), `fresh_seed1` (another adapter seed: how much the
  random A alone moves the figure), `last_layer` (no adapter: the base model's own q/k/v/o weights of the last
  layer, trainable) and `all_layers` (the base weights of every layer's q/k/v/o: what a fresh adapter's B gradient
  projects).
Sets: each property's first 10 validation pairs (the property grid's; prefer: the avoid direction's pairs are the
same pairs swapped, whose unit gradients are the negated ones, so its agreement is the same by construction;
--quick computes it to show it), the released SE 2-shot file (the paper's k) and the HH 10-shot and 1-shot files of
the shipped slice (their subtasks; --quick: SE 2-shot and HH 1-shot).
Measures, per candidate: per subtask, the agreement and reliability before and after, and whether the flag
(reliability under the threshold) is the same; over random draws of k pairs of each property, the same flags; the
Pearson and Spearman correlations of the agreements. Every pair-vector set is cached under --out, so that another
candidate costs only its own pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from property_sweep import released_pairs  # noqa: E402
from property_targets import PropertyBench, parse_args  # noqa: E402
from real_model import key_of, log  # noqa: E402

from rose_trl.checkpoints.schedules import read_warmup_record, recover_learning_rates  # noqa: E402
from rose_trl.config import ROSEConfig  # noqa: E402
from rose_trl.run.offline import find_checkpoints, warmup_model  # noqa: E402
from rose_trl.run.preflight import agreement_report, pair_vectors  # noqa: E402
from rose_trl.scoring.agreement import RELIABILITY_THRESHOLD, pair_agreement, reliability  # noqa: E402


PROPERTIES = ("se_link", "se_code", "se_emphasis")
PAIRS_PER_PROPERTY = 10  # the property grid's k (docs/results/property_targets.md): its first 10 pairs
RELEASED = (("se", 2), ("hh", 10), ("hh", 1))
QUICK_RELEASED = (("se", 2), ("hh", 1))
SHOTS, DRAWS = (2, 3, 5), 20


def validation_sets(pb, quick: bool) -> dict[str, Dataset]:
    """name -> pairs (prompt, chosen, rejected, subtask); a property's subtask is its name."""
    sets = {}
    for prop in [p for p in PROPERTIES if p in pb.suite.properties]:
        n = min(len(pb.suite.validation[prop]), PAIRS_PER_PROPERTY)
        sets[f"{prop}_prefer"] = pb.suite.task(prop, "prefer", n).validation
        if quick:  # the avoid direction: the same pairs swapped (its agreement is the same by construction)
            sets[f"{prop}_avoid"] = pb.suite.task(prop, "avoid", n).validation
    for task, k in QUICK_RELEASED if quick else RELEASED:
        pairs = released_pairs(task, k)
        sets[f"released_{task}_k{k}"] = pairs.map(lambda r, t=task: {"subtask": f"{t}:{r['subtask']}"})
    columns = ["prompt", "chosen", "rejected", "subtask"]
    out = {}
    for name, ds in sets.items():
        ds = ds.select_columns([c for c in columns if c in ds.column_names])
        if "subtask" not in ds.column_names:
            ds = ds.add_column("subtask", [name.rsplit("_", 1)[0]] * len(ds))
        out[name] = ds
    return out


def base_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def candidate_model(name: str, path: Path, lora: dict):
    """The model whose pair gradients a candidate reads."""
    from peft import LoraConfig, get_peft_model

    model = base_model(path)
    if name.startswith("fresh"):
        torch.manual_seed(1 if name == "fresh_seed1" else 0)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    layers = model.model.layers if name == "all_layers" else model.model.layers[-1:]
    model.requires_grad_(False)
    for layer in layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, proj).weight.requires_grad_(True)
    return model


def vectors_for(
    model, sets: dict[str, Dataset], tokenizer, config, max_length, cache: Path, kept: dict
) -> dict[str, np.ndarray]:
    """Every set's [pairs, dim] features at `model`, one run's validation pass over all of them (cached); `kept`
    keeps the reference's log-probs (the base model's) from one model to the next, as a run does."""
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        return {name: data[name] for name in sets}
    everything = concatenate_datasets(list(sets.values()))
    t = time.time()
    vectors = pair_vectors(model, everything, tokenizer, config, max_length, use_cpu=True, kept=kept)
    log(f"{cache.name}: {len(everything)} pairs in {time.time() - t:.0f} s")
    out, start = {}, 0
    for name, ds in sets.items():
        out[name] = vectors[start : start + len(ds)]
        start += len(ds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(cache)
    return out


def eta_agreement(per_checkpoint: list[np.ndarray], eta: np.ndarray, rows: np.ndarray) -> float | None:
    values = [pair_agreement(v[rows]) for v in per_checkpoint]
    return None if any(x is None for x in values) else float(np.dot(eta, values))


def compare(before: dict, after: dict, eta: np.ndarray, sets: dict[str, Dataset], seed: int = 0) -> dict:
    """Per set and subtask: (before, after) agreement, reliability and flag; and over draws of k pairs of each
    property set. `before`/`after`: set -> list of per-checkpoint vectors."""
    rows, draws = [], []
    rng = np.random.default_rng(seed)
    for name, ds in sets.items():
        pre = agreement_report(before[name], [1.0] * len(before[name]), list(ds["subtask"]))
        post = agreement_report(after[name], list(eta), list(ds["subtask"]))
        for subtask, s in post["validation_agreement"].items():
            p = pre["validation_agreement"][subtask]
            rows.append({"set": name, "subtask": subtask, "pairs": s["pairs"], "before": p, "after": s})
        for key in ("validation_agreement_across",):
            a, p = post[key], pre[key]
            rows.append(
                {"set": name, "subtask": "(all merged)", "pairs": a["merged"]["pairs"], "before": p["merged"],
                 "after": a["merged"], "between_before": p["between"], "between_after": a["between"]}
            )  # fmt: skip
        if name.startswith("se_") and name.endswith("_prefer"):
            n = len(ds)
            for k in SHOTS:
                if k > n:
                    continue
                for _ in range(DRAWS):
                    pick = np.sort(rng.choice(n, size=k, replace=False))
                    a_pre = eta_agreement(before[name], np.ones(1), pick)
                    a_post = eta_agreement(after[name], eta, pick)
                    draws.append(
                        {"set": name, "k": k, "before": a_pre, "after": a_post,
                         "r_before": reliability(a_pre, k), "r_after": reliability(a_post, k)}
                    )  # fmt: skip
    return {"subtasks": rows, "draws": draws}


def summary(result: dict) -> dict:
    from scipy.stats import pearsonr, spearmanr

    subtasks = [
        r for r in result["subtasks"] if r["before"]["agreement"] is not None and r["subtask"] != "(all merged)"
    ]
    x = np.array([r["before"]["agreement"] for r in subtasks])
    y = np.array([r["after"]["agreement"] for r in subtasks])
    flags = [r["before"]["agrees"] == r["after"]["agrees"] for r in subtasks]
    d = [r for r in result["draws"] if r["before"] is not None and r["after"] is not None]
    flag_draws = [(r["r_before"] >= RELIABILITY_THRESHOLD) == (r["r_after"] >= RELIABILITY_THRESHOLD) for r in d]
    out = {
        "subtasks": len(subtasks),
        "pearson": float(pearsonr(x, y)[0]) if len(x) > 2 else None,
        "spearman": float(spearmanr(x, y)[0]) if len(x) > 2 else None,
        "flags_same": f"{sum(flags)} of {len(flags)}",
        "draws": len(d),
        "draw_flags_same": float(np.mean(flag_draws)) if d else None,
        "draw_pearson": float(pearsonr([r["before"] for r in d], [r["after"] for r in d])[0]) if len(d) > 2 else None,
    }
    ratio = y / np.where(np.abs(x) > 1e-12, x, np.nan)
    out["after_over_before_median"] = float(np.nanmedian(ratio)) if len(ratio) else None
    return out


def table(result: dict) -> str:
    lines = [
        "| set | subtask | pairs | agreement before | after | reliability before | after | flag before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, d: "-" if v is None else f"{v:+.{d}f}" if d == 3 else f"{v:.{d}f}"  # noqa: E731
    flag = {True: "ok", False: "flagged", None: "one pair"}
    for r in result["subtasks"]:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['set']} | {r['subtask']} | {r['pairs']} | {fmt(b['agreement'], 3)} | {fmt(a['agreement'], 3)} | "
            f"{fmt(b['reliability'], 2)} | {fmt(a['reliability'], 2)} | {flag[b['agrees']]} / {flag[a['agrees']]} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("outputs/smollm2/model"))
    p.add_argument("--out", type=Path, default=Path("outputs/bench_properties"))
    p.add_argument("--quick", action="store_true", help="the property suite's --quick settings, fresh only")
    p.add_argument("--candidates", nargs="+", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--release",
        type=Path,
        default=None,
        help="the paper's release folder (its test answers make the suite's held-out pairs), as property_targets.py",
    )
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=8.0,
        help="the passes' memory budget (the run's memory_budget_gb; the default share of a busy machine makes "
        "1-pair passes)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_args = ["--model", str(args.model), "--out", str(args.out), *(["--quick"] if args.quick else [])]
    pb = PropertyBench(parse_args(bench_args + (["--release", str(args.release)] if args.release else [])))
    a = pb.args
    sets = validation_sets(pb, args.quick)
    config = ROSEConfig(projection_dim=a.projection_dim, memory_budget_gb=args.memory_budget_gb)
    lora = dict(
        r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    key = key_of(pb.suite_key, {k: len(v) for k, v in sets.items()}, a.max_length, a.projection_dim)
    folder = pb.warm_dir / f"preflight_{key}"
    t0 = time.time()
    warm = pb.warmup()
    checkpoints = find_checkpoints(warm)
    eta = np.asarray(recover_learning_rates(read_warmup_record(checkpoints))[0], dtype=np.float64)
    eta = eta / eta.sum()
    after = {name: [] for name in sets}
    kept = {}  # the reference's log-probs of the pairs: the base model's, computed once
    base = base_model(args.model)
    model = warmup_model(checkpoints[0], base)
    from peft import set_peft_model_state_dict

    from rose_trl.run.offline import load_checkpoint_adapter

    for ckpt in checkpoints:
        set_peft_model_state_dict(model, load_checkpoint_adapter(ckpt, model))
        got = vectors_for(
            model, sets, pb.bench.tokenizer, config, a.max_length, folder / f"after_{ckpt.name}.npz", kept
        )
        for name in sets:
            after[name].append(got[name])
    del model, base
    candidates = args.candidates or (["fresh"] if args.quick else ["fresh", "last_layer"])
    results = {"eta": eta.tolist(), "checkpoints": [c.name for c in checkpoints], "candidates": {}}
    for name in candidates:
        got = vectors_for(
            candidate_model(name, args.model, lora), sets, pb.bench.tokenizer, config, a.max_length,
            folder / f"before_{name}.npz", kept,
        )  # fmt: skip
        result = compare({k: [v] for k, v in got.items()}, after, eta, sets)
        result["summary"] = summary(result)
        results["candidates"][name] = result
        log(f"{name}: {result['summary']}")
    # The checkpoints against each other: how much the figure moves within the warm-up itself.
    if len(checkpoints) > 1:
        first = {k: [v[0]] for k, v in after.items()}
        result = compare(first, after, eta, sets)
        result["summary"] = summary(result)
        results["candidates"]["(first checkpoint)"] = result
    results["seconds"] = time.time() - t0
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwarm-up {warm}; checkpoints {results['checkpoints']}, eta {np.round(eta, 3).tolist()}")
    for name, result in results["candidates"].items():
        print(f"\n#### {name}: {json.dumps(result['summary'])}\n")
        print(table(result))
    return results


if __name__ == "__main__":
    main()
