"""Does ROSE follow a preference the model can learn? Property targets on real text, in both directions.

    python benchmarks/quality/property_targets.py --model outputs/smollm2/model --quick    # < 20 min on 2 cores
    python benchmarks/quality/property_targets.py --model outputs/smollm2/model            # < 2 h on 2 cores

The targets (`rose_trl.data.properties`): one visible property of real answers (an SE answer that links, that
uses code markup; an HH reply that ends on a question), shown as minimal pairs (the real answer and the same
answer with only the property removed), in both directions: prefer the property, or prefer its absence. All
targets share one pool of real answers to other prompts (labelled) and other-task rows, so one warm-up and one
pool gradient store serve every property and direction. The pairs are real text, the preference a constructed
one: this tests the mechanism, not the paper's benchmark.

Per property, in this order (nothing is chosen after reading a later stage):
1. the oracle: LoRA SFT on the pool's rows with the property, and on as many of its task's rows without it;
   both are evaluated on the held-out test pairs, and the property passes when the paired difference of the
   implicit-reward margins (with - without) has a 95% interval above 0; a property that fails is reported and
   dropped (the grid takes the first --grid-max properties that pass, in --properties order);
2. for a passing property, in each direction: rose, less, random (seeds), bm25 and rds select at every budget
   (AUC of the score for the preferred rows over the other rows of the task, pick shares); at the training
   budgets each selection gets the same LoRA SFT and is evaluated on the test pairs (accuracy and margin of the
   implicit reward against the base model, paired differences to random's seeds);
3. the shots sweep (`property_sweep.py`, from the stores): k validation pairs drawn from the property's
   n_validation, their agreement, and what ROSE's selection does with them; and the released SE and HH few-shot
   pairs' agreement on the same warm-up, to place them on that curve.
Every unit (warm-up, selection, adapter, evaluation) is cached under --out by its settings and written
atomically: a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
import torch
from common import key_of, log, read_json, release_root, write_json
from datasets import Dataset
from property_report import paired, print_report
from property_sweep import run_sweep
from real_model import Bench, selected_from
from real_model_report import composition

from rose_trl.baselines import BASELINES
from rose_trl.config import ROSEConfig
from rose_trl.data.properties import (
    DEFAULT_PROPERTIES,
    DIRECTIONS,
    PROPERTIES,
    PropertyTask,
    property_counts,
    property_suite,
)
from rose_trl.evaluation.metrics import bootstrap_interval
from rose_trl.run.offline import select_from_checkpoints
from rose_trl.run.selector import ROSESelector
from rose_trl.scoring.scores import selection_size, top_fraction


RELEASE = release_root()
# The release's folder where a copy with its test answers is present, else None (the slice's held-out pairs).
DEFAULT_RELEASE = RELEASE if (RELEASE / "test").is_dir() else None
FULL = dict(
    properties=["se_link", "se_code", "hh_question", "se_emphasis"],
    grid_max=4,
    budgets=[0.05, 0.1, 0.2],
    train_budgets=[0.1],
    seeds=[0, 1, 2, 3, 4],
    methods=["rose", "less", "random", "bm25", "rds"],
    k=10,
    pool_se=130,
    pool_hh=70,
    pool_min=30,
    n_validation=50,
    heldout_dev=40,
    heldout_test=80,
    warmup_fraction=0.1,
    warmup_epochs=2,
    final_epochs=2,
    shots=[1, 2, 3, 5, 10, 20, 30, 40, 50],
    draws=20,
    released={"se": 5, "hh": 10},
)
QUICK = dict(
    properties=["se_link", "hh_question"],
    grid_max=2,
    budgets=[0.2],
    train_budgets=[0.2],
    seeds=[0, 1],
    methods=["rose", "less", "random", "bm25"],
    k=5,
    pool_se=24,
    pool_hh=16,
    pool_min=8,
    n_validation=8,
    heldout_dev=4,
    heldout_test=16,
    warmup_fraction=0.2,
    warmup_epochs=1,
    final_epochs=1,
    shots=[1, 2, 4, 8],
    draws=5,
    released={"se": 2},
)
TEXT = dict(max_chars=1000, window_chars=250, task_seed=0)  # the answers' size cap, the pairs' window, the draw
SCORED = ("rose", "less", "random", "bm25", "rds")  # random: its scores are its random draws (AUC about 0.5)


def suite_options(args) -> dict:
    """property_suite's options from this benchmark's arguments (the suite every target of a run shares)."""
    return dict(
        pool_sizes={"se": args.pool_se, "hh": args.pool_hh},
        pool_min=args.pool_min,
        n_validation=args.n_validation,
        heldout_dev=args.heldout_dev,
        heldout_test=args.heldout_test,
        max_chars=args.max_chars,
        window_chars=args.window_chars,
        seed=args.task_seed,
        test_root=args.release,
    )


def target_task(
    prop: str,
    direction: str = "prefer",
    k: int | None = None,
    quick: bool = False,
    release: Path | None = DEFAULT_RELEASE,
    **overrides,
) -> PropertyTask:
    """One target exactly as this benchmark builds it (its full or --quick suite: the same pool, validation and
    held-out pairs), for another script; `overrides` replace the settings (pool_se=..., k=...).
    `rose_trl.data.realtext.write_real_task(target_task("se_code", "avoid"), "tasks/se_code_avoid")` writes
    its pool.jsonl, validation.jsonl and heldout.jsonl."""
    settings = {**(QUICK if quick else FULL), **TEXT, "release": release, **overrides}
    args = argparse.Namespace(**settings)
    return property_suite(DEFAULT_PROPERTIES, **suite_options(args)).task(prop, direction, k or args.k)


def oriented(summary: dict, direction: str) -> dict:
    """Per-pair wins and margins of an evaluation on the prefer-oriented pairs, read in `direction` (the avoid
    pairs are the same pairs with chosen and rejected swapped: margins change sign, wins w become 1 - w)."""
    wins, margins = np.asarray(summary["wins"]), np.asarray(summary["margins"])
    if direction == "avoid":
        wins, margins = 1.0 - wins, -margins
    return {
        "wins": wins.tolist(),
        "margins": margins.tolist(),
        "accuracy": float(wins.mean()),
        "accuracy_ci": bootstrap_interval(wins),
        "reward_margin": float(margins.mean()),
        "reward_margin_ci": bootstrap_interval(margins),
    }


class PropertyBench:
    def __init__(self, args):
        self.args = args
        a = args
        # real_model.Bench holds the model, the final SFT, the cached adapters and evaluations.
        self.bench = Bench(
            argparse.Namespace(
                model=a.model,
                out=a.out,
                lora_r=a.lora_r,
                lr=a.lr,
                final_epochs=a.final_epochs,
                batch_size=a.batch_size,
                max_length=a.max_length,
                warmup_lora_r=a.lora_r,
                warmup_fraction=a.warmup_fraction,
                warmup_epochs=a.warmup_epochs,
                projection_dim=a.projection_dim,
                progress=a.progress,
            )
        )
        self.suite_options = suite_options(a)
        self.suite = property_suite(DEFAULT_PROPERTIES, **self.suite_options)
        self.suite_key = key_of(
            self.suite.pool["prompt"],
            self.suite.pool["completion"],
            {p: self.suite.validation[p] for p in self.suite.properties},
            {p: self.suite.heldout[p] for p in self.suite.properties},
        )
        self.folder = a.out / f"suite_{self.suite_key}"
        self.warm_dir = self.folder / f"warmup_r{a.lora_r}_w{a.warmup_fraction:g}_e{a.warmup_epochs}"
        self.gradient_settings = (
            self.bench.model_key,
            a.max_length,
            a.lora_r,
            a.warmup_fraction,
            a.warmup_epochs,
            a.lr,
            a.projection_dim,
        )

    @property
    def pool(self) -> Dataset:
        return self.suite.pool

    def warmup(self) -> Path:
        return self.bench.warmup(self.pool, self.warm_dir / "warmup")

    def test_pairs(self, prop: str) -> Dataset:
        """The property's test half, prefer-oriented (the avoid direction is read off the same evaluation)."""
        return self.suite.task(prop, "prefer", 1).heldout.filter(lambda r: r["half"] == "test")

    # ---- selections ------------------------------------------------------------------------------------
    def selector(self, method: str, validation: Dataset, name: str, budget: float) -> ROSESelector:
        """A ROSESelector whose pool gradient stores are the suite's shared ones (a link)."""
        a = self.args
        out = self.warm_dir / f"sel_{name}_p{a.projection_dim}"
        shared = self.warm_dir / f"pool_train_p{a.projection_dim}"
        shared.mkdir(parents=True, exist_ok=True)
        (out / "rose").mkdir(parents=True, exist_ok=True)
        if not (out / "rose" / "train").exists():
            os.symlink(shared.resolve(), out / "rose" / "train")
        config = ROSEConfig(
            selection_method=method, selection_fraction=budget, projection_dim=a.projection_dim, gradient_batch_size=8
        )
        return ROSESelector(
            self.pool,
            validation,
            self.bench.tokenizer,
            config,
            out,
            max_length=a.max_length,
            use_cpu=True,
            progress=a.progress,
        )

    def gradient_picks(self, method: str, validation: Dataset, name: str, budgets: list[float]) -> dict:
        """{budget: (picks best first, every row's score)} of rose/less with `validation`, all budgets from one
        set of stores."""
        selector = self.selector(method, validation, name, budgets[0])
        picks = {}
        for i, budget in enumerate(budgets):
            folder = f"selection_{method}_{round(budget * 100)}"
            if i == 0:
                path = select_from_checkpoints(self.warmup(), self.bench.base(), selector, folder=folder)
            else:
                selector.config = dataclasses.replace(selector.config, selection_fraction=budget)
                path = selector.finalize(folder)
            picks[budget] = selected_from(path)
        return picks

    def select(self, method: str, prop: str, direction: str, seed: int = 0) -> dict[float, dict]:
        """{budget: {"picks", "scores"}} of one method on one target, cached per settings. random does not read
        the target: its picks are the same for every target of the suite."""
        a = self.args
        target = f"{prop}_{direction}"
        reads_target = method != "random"
        key = key_of(
            method,
            target if reads_target else "",
            a.k if reads_target else 0,
            self.suite_key,
            seed,
            self.gradient_settings if method in ("rose", "less") else (self.bench.model_key, a.max_length),
            a.budgets,
        )
        path = self.folder / "selections" / f"{method}_{target if reads_target else 'any'}_s{seed}_{key}.json"
        cached = read_json(path)
        if cached is not None:
            return {float(b): v for b, v in cached.items()}
        t0 = time.time()
        task = self.suite.task(prop, direction, a.k)
        if method in ("rose", "less"):
            picks = self.gradient_picks(method, task.validation, f"{target}_k{a.k}", a.budgets)
        else:
            extra = {"model": self.bench.base(), "max_length": a.max_length} if method == "rds" else {}
            table = BASELINES[method](self.pool, task.validation, seed=seed, tokenizer=self.bench.tokenizer, **extra)
            scores = np.asarray(table["score"], dtype=np.float64)
            picks = {b: (top_fraction(scores, b), scores) for b in a.budgets}
        result = {
            b: {"picks": [int(i) for i in chosen], "scores": None if scores is None else np.asarray(scores).tolist()}
            for b, (chosen, scores) in picks.items()
        }
        write_json(path, {str(b): v for b, v in result.items()})
        self.bench.counts["selected"] += 1
        log(
            f"selected {method} {target if reads_target else ''}{f' seed {seed}' if method == 'random' else ''} "
            f"({time.time() - t0:.0f}s)"
        )
        return result

    def oracle_picks(self, prop: str, side: str, budget: float, seed: int = 0) -> list[int]:
        """`side` = with | without: selection_size(pool, budget) rows of the property's task that have the
        property, or that do not."""
        task = PROPERTIES[prop].task
        rows = [
            i
            for i, (t, has) in enumerate(zip(self.pool["task"], self.pool[f"has_{prop}"], strict=True))
            if t == task and has == (side == "with")
        ]
        n = selection_size(len(self.pool), budget)
        if len(rows) < n:
            raise ValueError(f"{prop}: the oracle needs {n} pool rows {side} the property, the pool has {len(rows)}")
        return [int(i) for i in np.random.default_rng(seed).permutation(rows)[:n]]

    # ---- training and evaluation -----------------------------------------------------------------------
    def evaluate(self, prop: str, picks: list[int]) -> dict:
        """The adapter trained on `picks` (shared by every target that picks the same rows), evaluated on the
        property's test pairs (prefer-oriented, cached)."""
        folder = self.bench.adapter("props", self.suite_key, self.pool, picks)
        return self.bench.evaluate(prop, f"{self.suite_key}_{prop}", self.test_pairs(prop), "test", folder)

    def base(self, prop: str) -> dict:
        return self.bench.evaluate(prop, f"{self.suite_key}_{prop}", self.test_pairs(prop), "test", None)


# ---------------------------------------------------------------------------------- stages


def run_oracle(pb: PropertyBench, prop: str) -> dict:
    """The oracle (rows with the property) against as many rows of its task without it, at each training
    budget: the prefer-direction numbers of each and their paired difference."""
    out = {}
    for budget in pb.args.train_budgets:
        sides = {
            side: oriented(pb.evaluate(prop, pb.oracle_picks(prop, side, budget)), "prefer")
            for side in ("with", "without")
        }
        diff = {key: paired([sides["with"]], [sides["without"]], key) for key in ("wins", "margins")}
        out[str(budget)] = {**sides, "difference": diff, "passes": diff["margins"]["ci"][0] > 0}
        log(
            f"oracle {prop} {budget:.0%}: with {sides['with']['accuracy']:.3f}, "
            f"without {sides['without']['accuracy']:.3f}"
            f", margin difference {diff['margins']['mean']:+.4f} [{diff['margins']['ci'][0]:+.4f}, "
            f"{diff['margins']['ci'][1]:+.4f}]"
        )
    return out


def run_property(pb: PropertyBench, prop: str) -> dict:
    """Every method in both directions: selection-level numbers at every budget, held-out numbers at the
    training budgets (random's seeds shared by both directions)."""
    a = pb.args
    res = {"directions": {}}
    for direction in a.directions:
        task = pb.suite.task(prop, direction, a.k)
        methods = {}
        for method in a.methods:
            for seed in a.seeds if method == "random" else [0]:
                picks = pb.select(method, prop, direction, seed)
                for budget in a.budgets:
                    entry = picks[budget]
                    row = {
                        "composition": composition(
                            task.pool, entry["picks"], entry["scores"] if method in SCORED else None
                        )
                    }
                    if budget in a.train_budgets:
                        row["test"] = oriented(pb.evaluate(prop, entry["picks"]), direction)
                    methods.setdefault(method, {}).setdefault(str(budget), []).append(row)
            log(f"{prop} {direction} {method}: done")
        # the oracle's two arms read in this direction: the preferred side's rows, and the other side's
        sides = ("with", "without") if direction == "prefer" else ("without", "with")
        bounds = {
            str(b): {
                name: oriented(pb.evaluate(prop, pb.oracle_picks(prop, side, b)), direction)
                for name, side in zip(("oracle", "anti-oracle"), sides, strict=True)
            }
            for b in a.train_budgets
        }
        res["directions"][direction] = {
            "methods": methods,
            "bounds": bounds,
            "pool": {x: float(np.mean(np.asarray(task.pool["answer"]) == x)) for x in ("chosen", "rejected", "other")},
        }
    return res


def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's settings (--quick's or the full run's defaults filled in), e.g. for a PropertyBench built
    from code over a finished run's cache."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("outputs/smollm2/model"))
    p.add_argument("--out", type=Path, default=Path("outputs/bench_properties"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="two properties, a 40-row pool, one warm-up checkpoint, one "
        "budget (20%%), 2 random seeds, 16 test pairs: a smoke run",
    )
    p.add_argument("--properties", nargs="+", default=None, choices=list(PROPERTIES))
    p.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--train-budgets", type=float, nargs="+", default=None, help="budgets whose selections are trained")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="random's seeds")
    p.add_argument("--k", type=int, default=None, help="validation pairs per target")
    for name in ("pool_se", "pool_hh", "pool_min", "n_validation", "heldout_dev", "heldout_test"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--max-chars", type=int, default=TEXT["max_chars"])
    p.add_argument("--window-chars", type=int, default=TEXT["window_chars"])
    p.add_argument(
        "--release",
        type=Path,
        default=DEFAULT_RELEASE,
        help="a copy of the paper's release: held-out pairs from its test answers (default: "
        f"{RELEASE} where present, else the slice)",
    )
    p.add_argument("--no-release", action="store_true", help="held-out pairs from the slice only")
    p.add_argument("--task-seed", type=int, default=TEXT["task_seed"])
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-fraction", type=float, default=None)
    p.add_argument("--warmup-epochs", type=int, default=None)
    p.add_argument("--final-epochs", type=int, default=None)
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--shots", type=int, nargs="+", default=None, help="the sweep's numbers of validation pairs")
    p.add_argument("--draws", type=int, default=None, help="random draws of k pairs per shot count")
    p.add_argument(
        "--released",
        nargs="*",
        default=None,
        metavar="TASK:K",
        help="released few-shot files placed on the sweep (default se:5 hh:10; quick: se:2)",
    )
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument(
        "--grid-max",
        type=int,
        default=None,
        help="the grid (and the sweep) run on the first this many properties that pass the oracle, in "
        "--properties order (full: 4)",
    )
    p.add_argument(
        "--grid-all",
        action="store_true",
        help="run the grid on properties the oracle drops too (their rows are marked dropped)",
    )
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.no_release:
        args.release = None
    if isinstance(args.released, list):
        args.released = {t: int(k) for t, k in (x.split(":") for x in args.released)}
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.time()
    pb = PropertyBench(args)
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": property_counts(None, args.max_chars, args.window_chars, args.release),
        "suite": pb.suite.counts(),
        "pool_rows": len(pb.pool),
        "oracle": {},
        "targets": {},
        "skipped": {},
    }
    results["held_out_source"] = "the paper's test answers" if args.release else "the slice (no copy of the release)"
    stages = {}
    for prop in args.properties:
        start = time.time()
        results["oracle"][prop] = run_oracle(pb, prop)
        stages[f"oracle {prop}"] = time.time() - start
    passing = [prop for prop in args.properties if all(r["passes"] for r in results["oracle"][prop].values())]
    for prop in args.properties:
        if prop not in passing:
            results["skipped"][prop] = (
                "the oracle does not separate (its margin difference's 95% interval is not above 0)"
            )
    grid = args.properties if args.grid_all else passing[: args.grid_max]
    for prop in passing[args.grid_max :]:
        if not args.grid_all:
            results["skipped"][prop] = (
                f"the oracle separates; not in the grid: it runs on the first {args.grid_max} that do"
            )
    for prop in grid:
        start = time.time()
        results["targets"][prop] = run_property(pb, prop)
        stages[f"grid {prop}"] = time.time() - start
    if not args.skip_sweep:
        start = time.time()
        results["sweep"] = run_sweep(pb, grid)
        stages["sweep and placement"] = time.time() - start
    results["seconds"] = {**stages, "total": time.time() - t0}
    write_json(args.out / f"results_{'quick' if args.quick else 'full'}.json", results)
    counts = pb.bench.counts
    print(
        f"\nproperty_targets.py {'--quick' if args.quick else ''}: model {args.model}, pool {len(pb.pool)} rows, "
        f"max_length {args.max_length}; this invocation trained {counts['trained']} adapters, evaluated "
        f"{counts['evaluated']}, made {counts['selected']} selections in {time.time() - t0:.0f}s"
    )
    print_report(results)
    return results


if __name__ == "__main__":
    main()
