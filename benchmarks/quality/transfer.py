"""ROSE-T on a CPU (the paper's Table 8 setting, at 2 cores' scale): select with one model, train another.

SmolLM2-135M-Instruct selects (ROSE-T, LESS-T), Gemma-3-270M (base) is trained on the picks, and both are compared
with ROSE and LESS selecting with Gemma itself (Table 8's same-model columns), random (seeds) and the right and the
wrong selection (target_chosen, target_rejected), on the real-text targets of benchmarks/quality/real_model.py
(se, hh) and on the property targets of benchmarks/quality/property_targets.py (`<property>_<direction>`, e.g.
se_link_prefer: one property of real answers as minimal pairs, rose_trl.data.properties; held-out pairs from the
paper's test answers where a copy of the release is found):

    rose-trl smollm2-assets outputs/smollm2 && rose-trl gemma3-assets outputs/gemma3  # once
    # SmolLM2's warm-up, stores and picks; then Gemma's own; then every pick trained on Gemma, and the tables
    python benchmarks/quality/transfer.py --stage select --selector select --targets se
    python benchmarks/quality/transfer.py --stage select --selector final --targets se
    python benchmarks/quality/transfer.py --stage train --targets se hh

A stage is one process per selecting model and target, so that its CPU seconds and peak memory are that model's
(written to <out>/costs/; run it under /usr/bin/time -v for the same figures from outside). The train stage
selects whatever the select stages left undone. Every unit (warm-up, stores, selection, adapter, evaluation) is
cached under --out by real_model.py's Bench, one folder per selecting model: a killed run continues.

Reported per target and budget, on the held-out test pairs: each selection's composition and held-out accuracy
and margin of Gemma trained on it, with 95% intervals and paired differences against random's seeds (the same
pairs); the overlap between the two models' picks (and its chance level) and the rank correlation of their scores;
the cost of selecting with each model.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
from common import key_of, log, read_json, spearman, write_json
from property_targets import RELEASE
from real_model import Bench
from real_model_report import HEADER, composition, fmt_diff, method_rows, paired_difference, pool_shares

from rose_trl.data.properties import DIRECTIONS, PROPERTIES, property_suite, target_name
from rose_trl.data.realtext import SLICE_FILES


# Picks made with the selecting model (-T) and with the final model itself; named as in the paper's Table 8.
GRADIENT = {
    "ROSE-T": ("select", "rose"),
    "LESS-T": ("select", "less"),
    "ROSE": ("final", "rose"),
    "LESS": ("final", "less"),
}
SEEDED = ("random", "target_chosen", "target_rejected")
PROPERTY_TARGETS = {target_name(p, d): (p, d) for p in PROPERTIES for d in DIRECTIONS}
_TASKS: dict = {}


def target_task(bench: Bench, target: str, args):
    """(task, k, task_key) of a target: se/hh as real_model.py builds them (its k), or a property target of a
    one-property suite (property_suite, the suite's pool, its first --property-k validation pairs, every held-out
    pair a test pair). The same for both models' benches: the key names the data, not the model."""
    if target in SLICE_FILES:
        return _slice_task(bench, target, SLICE_FILES[target][0])
    names = (
        "property_pool_se",
        "property_pool_hh",
        "property_pool_min",
        "property_k",
        "property_test",
        "task_seed",
        "release",
    )
    cached = (target, *(getattr(args, n) for n in names))
    if cached not in _TASKS:
        prop, direction = PROPERTY_TARGETS[target]
        suite = property_suite(
            (prop,),
            pool_sizes={"se": args.property_pool_se, "hh": args.property_pool_hh},
            pool_min=args.property_pool_min,
            n_validation=args.property_k,
            heldout_dev=0,
            heldout_test=args.property_test,
            seed=args.task_seed,
            test_root=args.release,
        )
        task = suite.task(prop, direction, min(args.property_k, len(suite.validation[prop])))
        _TASKS[cached] = (task, task.k, key_of(target, task.k, suite.settings))
    return _TASKS[cached]


def _slice_task(bench: Bench, target: str, k: int):
    task, task_key = bench.task(target, k)
    return task, k, task_key


def bench_for(args, which: str) -> Bench:
    """The selecting model's bench (`select`) or the final model's (`final`): each its own folder under --out (the
    warm-up folders of real_model.py do not name the model)."""
    model = args.select_model if which == "select" else args.final_model
    tag = model.parent.name if model.name == "model" else model.name  # outputs/gemma3/model -> gemma3
    return Bench(
        argparse.Namespace(
            **{
                **vars(args),
                "model": model,
                "out": args.out / f"by_{tag}",
                "warmup_lora_r": args.lora_r,
                "test_variants": [],
            }
        )
    )


def usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": r.ru_utime + r.ru_stime, "peak_rss_gb": r.ru_maxrss / 2**20}


def gradient_picks(bench: Bench, method: str, target: str, options: dict) -> tuple[dict, dict]:
    """{budget: picks} of rose/less with `bench`'s model, and what making them cost (when they were made now)."""
    task, k, task_key = target_task(bench, target, bench.args)
    t0, before = time.time(), usage()
    warm_dir = bench.target_dir(target, task_key) / "warmup"
    warm = bench.warmup(task.pool, warm_dir)
    picks = bench.select(method, 0, target, k, task, task_key, warm, options=options)
    after = usage()
    cost = {
        "wall_s": time.time() - t0,
        "cpu_s": after["cpu_s"] - before["cpu_s"],
        "process_peak_rss_gb": after["peak_rss_gb"],
        "warmup_s": (read_json(warm_dir / "done.json") or {}).get("seconds"),
    }
    return picks, cost


def select_stage(args) -> None:
    """Both gradient methods with one model, one target per process call (costs per model and target)."""
    bench = bench_for(args, args.selector)
    for target in args.targets:
        path = args.out / "costs" / f"{args.selector}_{target}.json"
        costs = read_json(path) or {"model": str(bench.args.model)}
        for method in ("rose", "less"):
            made_before = bench.counts["selected"]
            _, cost = gradient_picks(bench, method, target, memory_options(args, args.selector))
            if bench.counts["selected"] > made_before:  # made now: its cost is this process's
                costs[method] = cost
                log(
                    f"{args.selector} {target} {method}: {cost['wall_s']:.0f}s wall, {cost['cpu_s']:.0f} CPU-s, "
                    f"process "
                    f"peak {cost['process_peak_rss_gb']:.2f} GB"
                )
        write_json(path, costs)


def memory_options(args, which: str) -> dict:
    """ROSEConfig options bounding a gradient pass (Gemma's logits are 1 MB a token in float32)."""
    tokens = args.select_max_batch_tokens if which == "select" else args.final_max_batch_tokens
    return {"max_batch_tokens": tokens, "validation_batch_size": args.validation_batch_size} if tokens else {}


def overlap(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / max(1, min(len(a), len(b)))


def train_target(sel: Bench, fin: Bench, target: str, args, results: dict) -> None:
    """Every selection of one target trained on the final model and evaluated on the test half."""
    task, k, task_key = target_task(fin, target, args)
    pool = task.pool
    test = task.heldout.filter(lambda r: r["half"] == "test")
    res = results[target] = {
        "pool": {"rows": len(pool), **pool_shares(pool)},
        "validation_pairs": len(task.validation),
        "heldout": {"test": len(test)},
        "methods": {},
        "overlap": {},
    }
    res["base"] = {"test": fin.evaluate(target, task_key, test, "test", None)}
    picks = {}
    for name, (which, method) in GRADIENT.items():
        bench = sel if which == "select" else fin
        picks[name], _ = gradient_picks(bench, method, target, memory_options(args, which))
    for method in SEEDED:
        for seed in args.seeds if method == "random" else [0]:
            picks.setdefault(method, []).append(fin.select(method, seed, target, k, task, task_key, None))
    for name in list(GRADIENT) + list(SEEDED):
        for entry in picks[name] if name in SEEDED else [picks[name]]:
            for budget in args.budgets:
                chosen = entry[budget]
                row = {"composition": composition(pool, chosen["picks"], chosen["scores"]), "picks": chosen["picks"]}
                folder = fin.adapter(target, task_key, pool, chosen["picks"])
                row["test"] = fin.evaluate(target, task_key, test, "test", folder)
                res["methods"].setdefault(name, {}).setdefault(str(budget), []).append(row)
                log(f"{target} {name} {budget:.0%}: test acc {row['test']['accuracy']:.3f}")
    for budget in args.budgets:
        b = str(budget)
        first = {name: res["methods"][name][b][0]["picks"] for name in GRADIENT}
        scores = {name: picks[name][budget]["scores"] for name in GRADIENT}
        size = len(first["ROSE"])
        res["overlap"][b] = {
            "ROSE-T vs ROSE": overlap(first["ROSE-T"], first["ROSE"]),
            "LESS-T vs LESS": overlap(first["LESS-T"], first["LESS"]),
            "ROSE-T vs LESS-T": overlap(first["ROSE-T"], first["LESS-T"]),
            "ROSE vs LESS": overlap(first["ROSE"], first["LESS"]),
            "chance": size / len(pool),
            "score spearman rose (select vs final model)": spearman(scores["ROSE-T"], scores["ROSE"]),
            "score spearman less (select vs final model)": spearman(scores["LESS-T"], scores["LESS"]),
        }


def print_transfer(results: dict, args) -> None:
    costs = {p.stem: read_json(p) for p in sorted((args.out / "costs").glob("*.json"))}
    for target, res in results.items():
        s = res["pool"]
        base = res["base"]["test"]
        print(
            f"\n### {target}: final model {args.final_model}, selecting model {args.select_model}; "
            f"pool {s['rows']} rows "
            f"(chosen {s['chosen']:.2f} / rejected {s['rejected']:.2f} / other {s['other']:.2f}), "
            f"{res['validation_pairs']} validation pairs, {res['heldout']['test']} test pairs; "
            f"base likelihood accuracy "
            f"{base['likelihood_accuracy']:.3f}, chosen NLL {base['chosen_nll']:.3f}"
        )
        print(HEADER)
        print("\n".join(method_rows(res["methods"], args.budgets, "test")))
        for b, row in res["overlap"].items():
            print(
                f"\noverlap of the picks at {float(b):.0%} (shared rows / selection size): "
                + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
            )
        for which in ("select", "final"):
            c = costs.get(f"{which}_{target}")
            if c and "rose" in c and "less" in c:
                r, s = c["rose"], c["less"]
                print(
                    f"cost of selecting with {c['model']}: rose (warm-up {r['warmup_s'] or 0:.0f}s, "
                    f"pool and validation "
                    f"gradients, scoring) {r['wall_s']:.0f}s wall, {r['cpu_s']:.0f} CPU-s; less (its validation "
                    f"gradients and scoring; warm-up and pool gradients shared) {s['wall_s']:.0f}s wall, "
                    f"{s['cpu_s']:.0f} CPU-s; "
                    f"process peak {max(r['process_peak_rss_gb'], s['process_peak_rss_gb']):.2f} GB"
                )


def summary_line(results: dict, args) -> str:
    parts = []
    for target, res in results.items():
        for budget in args.budgets:
            by = {m: res["methods"][m][str(budget)] for m in res["methods"]}
            for name in list(GRADIENT) + ["random"]:
                parts.append(
                    f"{target}@{round(budget * 100)}%.{name}={np.mean([r['test']['accuracy'] for r in by[name]]):.3f}"
                )
            d = paired_difference(by["ROSE-T"], by["random"], "test", "wins")
            parts.append(f"{target}@{round(budget * 100)}%.ROSE-T-random={fmt_diff(d)}")
    return " ".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["select", "train"], default="train")
    p.add_argument(
        "--selector",
        choices=["select", "final"],
        default="select",
        help="select stage: which model selects (the selecting model, or the final model itself)",
    )
    p.add_argument("--select-model", type=Path, default=Path("outputs/smollm2/model"))
    p.add_argument("--final-model", type=Path, default=Path("outputs/gemma3/model"))
    p.add_argument("--out", type=Path, default=Path("outputs/bench_transfer"))
    p.add_argument(
        "--targets",
        nargs="+",
        default=["se", "hh"],
        choices=["se", "hh", *PROPERTY_TARGETS],
        help="se, hh (real_model.py's tasks) or property targets <property>_<prefer|avoid>",
    )
    p.add_argument("--pool-target", type=int, default=72)
    p.add_argument("--pool-other", type=int, default=24)
    p.add_argument("--heldout", type=int, default=120, help="held-out pairs, half dev (unused here) and half test")
    p.add_argument("--task-seed", type=int, default=0)
    # Property targets (a one-property suite of rose_trl.data.properties)
    p.add_argument("--property-pool-se", type=int, default=48, help="SE answers in a property target's pool")
    p.add_argument("--property-pool-hh", type=int, default=16, help="HH answers in a property target's pool")
    p.add_argument("--property-pool-min", type=int, default=16, help="pool rows with the property, at least")
    p.add_argument("--property-k", type=int, default=10, help="validation pairs (minimal pairs) of a property target")
    p.add_argument("--property-test", type=int, default=40, help="held-out test pairs of a property target")
    p.add_argument(
        "--release",
        type=Path,
        default=RELEASE if (RELEASE / "test").is_dir() else None,
        help="a copy of the paper's release: a property target's held-out pairs from its test answers "
        f"(default: {RELEASE} where present, else the slice)",
    )
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="random's seeds")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank of every warm-up and final SFT")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=2, help="= checkpoints")
    p.add_argument("--final-epochs", type=int, default=2)
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--select-max-batch-tokens", type=int, default=None, help="max_batch_tokens of SmolLM2's passes")
    p.add_argument("--final-max-batch-tokens", type=int, default=512, help="max_batch_tokens of Gemma's passes")
    p.add_argument("--validation-batch-size", type=int, default=2)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.time()
    if args.stage == "select":
        select_stage(args)
        return {}
    sel, fin = bench_for(args, "select"), bench_for(args, "final")
    results = {}
    for target in args.targets:
        train_target(sel, fin, target, args, results)
    write_json(args.out / f"results_{'_'.join(args.targets)}.json", results)
    print(
        f"\ntransfer.py: selecting model {args.select_model}, final model {args.final_model}, max_length "
        f"{args.max_length}, LoRA r {args.lora_r}, lr {args.lr}, "
        f"warm-up {args.warmup_fraction:g} x {args.warmup_epochs} epochs, final {args.final_epochs} epochs; "
        f"this invocation trained {fin.counts['trained']} adapters, evaluated "
        f"{fin.counts['evaluated']}, made {sel.counts['selected'] + fin.counts['selected']} selections in "
        f"{time.time() - t0:.0f}s"
    )
    print_transfer(results, args)
    print(summary_line(results, args))
    return results


if __name__ == "__main__":
    main()
