"""What a selection costs against what it picks: gradient_layers x selection_checkpoints x prefilter_fraction.

    python benchmarks/quality/frontier.py --suites planted planted_distractor              # tiny model, minutes
    python benchmarks/quality/frontier.py --model outputs/smollm2/model --suites properties se hh
    python benchmarks/quality/frontier.py --model outputs/smollm2/model --suites properties --costs --lock /tmp/x.lock
    python benchmarks/quality/frontier.py --model outputs/smollm2/model --suites properties --train l4_call_poff
    python benchmarks/quality/frontier_figure.py                                           # the figure, from the data

Suites (each one pool, one warm-up, its targets in both directions where they have two):
- properties: docs/results/property_targets.md, SmolLM2-135M-Instruct: the three properties (se_link, se_code,
  se_emphasis), prefer and avoid, on the suite's 200-row pool (property_targets.py, its full settings: warm-up on
  10% for 2 epochs, 2 checkpoints, 160 tokens, 10 validation pairs, 10% selected);
- se, hh: the paper's released SE 2-shot and HH 1-shot pairs as targets, on a pool of target prompts answered with
  their chosen or their rejected answer plus other-task rows (`build_real_task`, section (c)): 80 SE + 40 HH rows,
  60 HH + 40 SE rows; warm-up on 10% for --released-epochs (2), 128 tokens, 10% selected;
- planted, planted_distractor: section (a)'s planted task (a1, and a2 with its distractor) on a tiny Llama of
  --tiny-layers (4) layers trained from scratch by the warm-up (10%, 4 epochs, 4 checkpoints), prefer and avoid
  (the pairs swapped), 5% selected.

For each setting (layers: all or the last N; checkpoints: all, [-1], [0] or [0, -1]; prefilter: off or a first
pass of `prefilter_layers` layers at the first checkpoint used, keeping --prefilter of the pool):
- the AUC of its score for the rows the target prefers over the rows of the other side, as (c) and (d) define it
  (a row the first pass left out ranks below every candidate, by its first-pass score);
- the overlap of its picks with the full method's (shared rows / picks).
One gradient pass per checkpoint gives every layer setting at once (layered.py: each layer's block projected once,
added to every setting that holds its layer), so the sweep costs one full selection per target; the scores,
candidates and picks of every setting are then the library's own (`score_checkpoints`, `select_rows`).
--costs times each setting on its own: a fresh ROSESelector with those options over the same warm-up, on the
suite's --cost-target (CPU-seconds of the selection, with and without the warm-up's, and wall), and checks that its
picks are the sweep's. With --lock, each timed selection holds that file's exclusive lock (and records the load).
--train SETTING... (properties only): (d)'s protocol for those settings, each target's picks trained and evaluated
on its 80 test pairs, paired against random's 5 seeds and against the full method.
Results are merged into --results (JSON; a CSV beside it); every unit is cached under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import resource
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from peft import set_peft_model_state_dict


sys.path.insert(0, str(Path(__file__).resolve().parent))
from layered import LayeredFeaturizer, subset  # noqa: E402
from real_model import key_of, log, read_json, write_json  # noqa: E402
from real_model_report import auc  # noqa: E402

from rose_trl.config import ROSEConfig  # noqa: E402
from rose_trl.gradients.capture import lora_layers, num_trainable_parameters  # noqa: E402
from rose_trl.gradients.projection import build_projector  # noqa: E402
from rose_trl.resources.cost import SelectionWork  # noqa: E402
from rose_trl.run.ledger import resolve_checkpoints  # noqa: E402
from rose_trl.run.offline import (  # noqa: E402
    find_checkpoints,
    load_checkpoint_adam,
    load_checkpoint_adapter,
    resolve_learning_rates,
    select_from_checkpoints,
    warmup_model,
)
from rose_trl.run.selector import ROSESelector, selection_work  # noqa: E402
from rose_trl.scoring.columns import PREFILTER_SCORE, PREFILTERED_OUT, SCORE  # noqa: E402
from rose_trl.scoring.scores import (  # noqa: E402
    CheckpointGradients,
    score_checkpoints,
    select_rows,
    validation_targets,
)
from rose_trl.stores.store import GradientStore  # noqa: E402


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "frontier.json"


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    layers: int | None = None  # gradient_layers (None: all)
    checkpoints: tuple[int, ...] | None = None  # selection_checkpoints (None: all)
    prefilter: float | None = None  # prefilter_fraction (None: off)

    @property
    def key(self) -> str:
        ckpts = "all" if self.checkpoints is None else ",".join(str(i) for i in self.checkpoints)
        return f"l{self.layers or 'all'}_c{ckpts}_p{self.prefilter or 'off'}"

    @classmethod
    def parse(cls, key: str) -> Setting:
        layers, ckpts, prefilter = key.split("_")
        return cls(
            None if layers == "lall" else int(layers[1:]),
            None if ckpts == "call" else tuple(int(i) for i in ckpts[1:].split(",")),
            None if prefilter == "poff" else float(prefilter[1:]),
        )

    def describe(self, total_layers: int) -> str:
        layers = f"last {self.layers} of {total_layers} layers" if self.layers else "every layer"
        ckpts = "every checkpoint" if self.checkpoints is None else f"checkpoints {list(self.checkpoints)}"
        return f"{layers}, {ckpts}" + (f", first pass keeping {self.prefilter:g}" if self.prefilter else "")

    def options(self, prefilter_layers: int) -> dict:
        """ROSEConfig options."""
        out = {}
        if self.layers:
            out["gradient_layers"] = self.layers
        if self.checkpoints is not None:
            out["selection_checkpoints"] = list(self.checkpoints)
        if self.prefilter:
            out["prefilter_fraction"] = self.prefilter
            out["prefilter_layers"] = prefilter_layers
        return out


FULL = Setting()


def grid(layers: list[int | None], checkpoints: list, prefilters: list) -> list[Setting]:
    return [Setting(n, None if c is None else tuple(c), p) for p in prefilters for c in checkpoints for n in layers]


# ---------------------------------------------------------------------------------- suites


@dataclass
class Target:
    name: str
    validation: Dataset
    positive: np.ndarray  # pool rows the target prefers
    negative: np.ndarray  # the rows of the other side


@dataclass
class Suite:
    name: str
    pool: Dataset
    targets: list[Target]
    tokenizer: object
    base: object  # () -> a fresh base model
    warmup: object  # () -> the warm-up folder (trained on first call)
    folder: Path
    max_length: int
    dim: int
    budget: float
    settings: list[Setting]
    layer_subsets: list[int]  # numbers of layers the sweep computes (all of them first)
    prefilter_layers: int
    cost_target: str
    extra: dict = field(default_factory=dict)  # the suite's own (PropertyBench for --train)
    memory: float | None = None  # memory_budget_gb of every selection (the same for every setting)


def timed_warmup(folder: Path, train) -> Path:
    """Run `train()` once (the warm-up), recording its CPU-seconds and wall in `folder`/../warmup_cost.json."""
    record = folder.parent / f"{folder.name}_cost.json"
    if read_json(record) is None:
        already = (folder / "done.json").exists() or any(folder.glob("checkpoint-*/trainer_state.json"))
        start, wall = cpu_seconds(), time.time()
        train()
        cost = {"cpu_s": cpu_seconds() - start, "wall_s": time.time() - wall, "load": os.getloadavg()}
        write_json(record, None if already else cost)
    else:
        train()
    return folder


def properties_suite(args) -> Suite:
    import property_targets as pt

    release = ["--release", str(args.release)] if args.release else ["--no-release"]
    pb = pt.PropertyBench(pt.parse_args(["--model", str(args.model), "--out", str(args.out / "properties"), *release]))
    targets = []
    for prop in args.properties:
        for direction in ("prefer", "avoid"):
            task = pb.suite.task(prop, direction, pb.args.k)
            answers = np.asarray(task.pool["answer"])
            targets.append(
                Target(
                    f"{prop}_{direction}",
                    task.validation,
                    np.flatnonzero(answers == "chosen"),
                    np.flatnonzero(answers == "rejected"),
                )
            )
    return Suite(
        "properties",
        pb.pool,
        targets,
        pb.bench.tokenizer,
        pb.bench.base,
        lambda: timed_warmup(pb.warm_dir / "warmup", pb.warmup),
        pb.warm_dir,
        pb.args.max_length,
        pb.args.projection_dim,
        0.1,
        grid([None, 8, 4, 2, 1], [None, [-1], [0]], [None, args.prefilter]),
        [30, 8, 4, 2, 1],
        2,
        "se_link_prefer",
        {"pb": pb},
    )


def released_suite(args, target: str) -> Suite:
    from real_model import Bench

    from rose_trl.data.realtext import build_real_task

    sizes = {"se": (args.se_pool, 40), "hh": (args.hh_pool, 40)}[target]
    bench = Bench(
        argparse.Namespace(
            model=args.model,
            out=args.out / "released",
            lora_r=8,
            lr=2e-4,
            final_epochs=2,
            batch_size=4,
            max_length=128,
            warmup_lora_r=8,
            warmup_fraction=0.1,
            warmup_epochs=args.released_epochs,
            projection_dim=8192,
            progress=False,
        )
    )
    k = {"se": 2, "hh": 1}[target]
    task = build_real_task(target, k=k, pool_target=sizes[0], pool_other=sizes[1], heldout=2, seed=0)
    folder = args.out / "released" / f"{target}_{key_of(target, k, sizes)}" / f"w0.1_e{args.released_epochs}"
    answers = np.asarray(task.pool["answer"])
    checkpoints = [None, [-1], [0], [0, -1]] if args.released_epochs > 2 else [None, [-1], [0]]
    return Suite(
        target,
        task.pool,
        [
            Target(
                f"{target}_k{k}",
                task.validation,
                np.flatnonzero(answers == "chosen"),
                np.flatnonzero(answers == "rejected"),
            )
        ],
        bench.tokenizer,
        bench.base,
        lambda: timed_warmup(folder / "warmup", lambda: bench.warmup(task.pool, folder / "warmup")),
        folder,
        128,
        8192,
        0.1,
        grid([None, 8, 4, 2, 1], checkpoints, [None, args.prefilter]),
        [30, 8, 4, 2, 1],
        2,
        f"{target}_k{k}",
    )


def planted_suite(args, distractor: bool) -> Suite:
    from selection_quality import sft

    from rose_trl.models.tiny import build_tiny_llama, build_tokenizer, make_planted_task
    from rose_trl.run.pipeline import warmup_indices

    seed, layers = 0, args.tiny_layers
    n_pool = args.planted_pool or (480 if distractor else 400)
    pool_rows, val_rows = make_planted_task(n_pool=n_pool, pairs_per_subtask=4, seed=seed, distractor=distractor)
    pool, validation = Dataset.from_list(pool_rows), Dataset.from_list(val_rows)
    tokenizer = build_tokenizer(
        [r["prompt"] + r["completion"] for r in pool_rows]
        + [r["prompt"] + r["chosen"] + r["rejected"] for r in val_rows]
    )

    def base():
        return build_tiny_llama(tokenizer, hidden=64, layers=layers, seed=seed)

    name = "planted_distractor" if distractor else "planted"
    folder = args.out / name / f"n{n_pool}_l{layers}_e{args.planted_epochs}"
    warm = folder / "warmup"

    def train():
        if not warm.exists():
            rows = pool.select(warmup_indices(len(pool), 0.1, seed))
            sft(base(), tokenizer, rows, warm, args.planted_epochs, 1e-3, 256, save=True)

    features = np.asarray([r["feature"] for r in pool_rows])
    good = np.flatnonzero(np.char.endswith(features.astype(str), "_good"))
    bad = np.flatnonzero(np.char.endswith(features.astype(str), "_bad"))
    swapped = validation.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]})
    subsets = sorted({layers, *(n for n in (2, 1) if n < layers)}, reverse=True)
    ckpts = [None, [-1], [0, -1]] if args.planted_epochs > 2 else [None, [-1]]
    return Suite(
        name,
        pool,
        [Target(f"{name}_prefer", validation, good, bad), Target(f"{name}_avoid", swapped, bad, good)],
        tokenizer,
        base,
        lambda: timed_warmup(warm, train),
        folder,
        256,
        args.planted_dim,
        0.05,
        grid([None] + subsets[1:], ckpts, [None, args.prefilter]),
        subsets,
        1,
        f"{name}_prefer",
    )


def build_suite(args, name: str) -> Suite:
    if name == "properties":
        return properties_suite(args)
    if name in ("se", "hh"):
        return released_suite(args, name)
    return planted_suite(args, name == "planted_distractor")


# ---------------------------------------------------------------------------------- the layered sweep


class LayeredSelector(ROSESelector):
    """A ROSESelector whose features are every layer subset's side by side (layered.py)."""

    subsets: list[int] = []

    def prepare_featurizer(self, model):
        if self._featurizer is None:
            c = self.config
            device = next(p for p in model.parameters() if p.requires_grad).device
            projector = build_projector(
                c.projection_type, num_trainable_parameters(model), c.projection_dim, c.projection_seed, device=device
            )
            self._featurizer = LayeredFeaturizer(projector, self.subsets)
            self.plan = self.memory_plan(model, self._featurizer)
            self.validation_stores.size_passes(self.plan)
        return self._featurizer


def layered_features(suite: Suite, target: Target) -> dict:
    """{"names", "learning_rates", "train": {name: [rows, S*dim]}, "val": {name: [pairs, S*dim]}} of `target`, every
    checkpoint, from the layered stores (the pool's shared by the suite's targets)."""
    warm = suite.warmup()
    out = suite.folder / "layered" / target.name
    shared = suite.folder / "layered" / "pool_train"
    shared.mkdir(parents=True, exist_ok=True)
    (out / "rose").mkdir(parents=True, exist_ok=True)
    if not (out / "rose" / "train").exists():
        os.symlink(shared.resolve(), out / "rose" / "train")
    config = ROSEConfig(
        projection_dim=suite.dim, selection_fraction=suite.budget, gradient_batch_size=8, memory_budget_gb=suite.memory
    )
    selector = LayeredSelector(
        suite.pool,
        target.validation,
        suite.tokenizer,
        config,
        out,
        max_length=suite.max_length,
        use_cpu=True,
        progress=False,
    )
    selector.subsets = suite.layer_subsets
    checkpoints = find_checkpoints(warm)
    done = selector.ledger.checkpoints()
    if [c["name"] for c in done] != [c.name for c in checkpoints]:
        t0 = time.time()
        model = warmup_model(checkpoints[0], suite.base())
        rates = resolve_learning_rates(checkpoints, model, selector)
        for ckpt, lr in zip(checkpoints, rates, strict=True):
            set_peft_model_state_dict(model, load_checkpoint_adapter(ckpt, model))
            selector.add_checkpoint(model, ckpt.name, lr, load_checkpoint_adam(ckpt, model))
        log(
            f"{suite.name} {target.name}: layered features of {len(checkpoints)} checkpoints ({time.time() - t0:.0f}s)"
        )
    names, rates = selector.ledger.scoring_learning_rates()
    return {
        "names": names,
        "learning_rates": rates,
        "train": {n: GradientStore.open(out / "rose" / "train" / n).read_all() for n in names},
        "val": {n: GradientStore.open(out / "rose" / "val_dpo" / n).read_all() for n in names},
    }


class ArrayStore:
    """The parts of a GradientStore that scoring reads, over an array in memory."""

    def __init__(self, rows: np.ndarray):
        self.rows, self.num_rows, self.dim = rows, rows.shape[0], rows.shape[1]
        self.meta = {"pool_fingerprint": "sweep", "projection": {"dim": self.dim}}

    def iter_chunks(self, chunk_rows: int = 16384):
        for start in range(0, self.num_rows, chunk_rows):
            yield start, self.rows[start : start + chunk_rows]

    def read_rows(self, rows):
        return self.rows[np.asarray(rows)]


def table_of(features: dict, names: list[str], rates: list[float], index: int, dim: int, subtasks, rows=None):
    """The library's score table of one layer subset (`index`) over checkpoints `names`."""
    grads = {n: subset(features["val"][n], index, dim) for n in names}
    targets = validation_targets(grads, subtasks)
    checkpoints = [
        CheckpointGradients(n, ArrayStore(subset(features["train"][n], index, dim)), targets.targets[i], lr)
        for i, (n, lr) in enumerate(zip(names, rates, strict=True))
    ]
    return score_checkpoints(checkpoints, targets.subtasks, rows=rows), targets.subtasks


def sweep_setting(suite: Suite, target: Target, features: dict, setting: Setting) -> dict:
    """The setting's scores (ranked as a user's scores.parquet ranks them), picks and candidates."""
    all_names, all_rates = features["names"], features["learning_rates"]
    chosen = resolve_checkpoints(None if setting.checkpoints is None else list(setting.checkpoints), len(all_names))
    names, rates = [all_names[i] for i in chosen], [all_rates[i] for i in chosen]
    index = suite.layer_subsets.index(setting.layers or suite.layer_subsets[0])
    labels = list(target.validation["subtask"])
    pairs = Counter(labels)
    rows = None
    if setting.prefilter:
        first_index = suite.layer_subsets.index(suite.prefilter_layers)
        first, subtasks = table_of(features, names[:1], [1.0], first_index, suite.dim, labels)
        rows = np.sort(select_rows(first, subtasks, setting.prefilter, "max", pairs)[0])
    table, subtasks = table_of(features, names, rates, index, suite.dim, labels, rows)
    if rows is not None:
        table[PREFILTER_SCORE] = first[SCORE]
        table[PREFILTERED_OUT] = np.isnan(table[SCORE])
    picks, _ = select_rows(table, subtasks, suite.budget, "max", pairs)
    return {"table": table, "picks": picks, "candidates": rows}


def ranking(table: dict) -> np.ndarray:
    """Scores whose order is the selection's: candidates first by their score, then the rest by the first pass."""
    score = np.asarray(table[SCORE], dtype=np.float64)
    if PREFILTERED_OUT not in table:
        return score
    out = np.empty_like(score)
    kept = ~np.asarray(table[PREFILTERED_OUT], dtype=bool)
    n = len(score)
    out[kept] = 2 + np.argsort(np.argsort(score[kept])) / n
    out[~kept] = np.argsort(np.argsort(np.asarray(table[PREFILTER_SCORE])[~kept])) / n
    return out


def run_sweep(suite: Suite) -> dict:
    results = {}
    for target in suite.targets:
        features = layered_features(suite, target)
        full = sweep_setting(suite, target, features, FULL)
        rows = {}
        for setting in suite.settings:
            got = full if setting == FULL else sweep_setting(suite, target, features, setting)
            rows[setting.key] = {
                "auc": auc(ranking(got["table"]), target.positive, target.negative),
                "overlap": len(set(got["picks"].tolist()) & set(full["picks"].tolist())) / len(full["picks"]),
                "picks": [int(i) for i in got["picks"]],
                "candidates": None if got["candidates"] is None else len(got["candidates"]),
            }
        results[target.name] = rows
        best = max(rows, key=lambda k: rows[k]["auc"])
        log(f"{suite.name} {target.name}: full AUC {rows[FULL.key]['auc']:.3f}; best {best} {rows[best]['auc']:.3f}")
    return results


# ---------------------------------------------------------------------------------- costs


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def exclusive(lock: Path | None):
    """Hold `lock` exclusively (fcntl, as `flock -x`) while timing; nothing without one."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def measure_costs(suite: Suite, sweep: dict, lock: Path | None, settings: list[Setting]) -> dict:
    """Each setting's own selection on the suite's cost target (a fresh output dir: nothing shared), timed."""
    warm = suite.warmup()
    target = next(t for t in suite.targets if t.name == suite.cost_target)
    base = suite.base()
    total_layers = lora_layers(warmup_model(find_checkpoints(warm)[0], suite.base()))
    out = {}
    for setting in settings:
        path = suite.folder / "costs" / f"{target.name}_{setting.key}.json"
        cached = read_json(path)
        if cached is None:
            run_dir = suite.folder / "costs" / f"{target.name}_{setting.key}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = ROSEConfig(
                projection_dim=suite.dim,
                selection_fraction=suite.budget,
                gradient_batch_size=8,
                memory_budget_gb=suite.memory,
                **setting.options(suite.prefilter_layers),
            )
            with exclusive(lock):
                load = os.getloadavg()
                start, wall = cpu_seconds(), time.time()
                selector = ROSESelector(
                    suite.pool,
                    target.validation,
                    suite.tokenizer,
                    config,
                    run_dir,
                    max_length=suite.max_length,
                    use_cpu=True,
                    progress=False,
                )
                folder = select_from_checkpoints(warm, base, selector)
                cached = {"cpu_s": cpu_seconds() - start, "wall_s": time.time() - wall}
                cached["load"] = [load, os.getloadavg()]
            table = pd.read_parquet(folder / "scores.parquet")
            cached["picks"] = np.flatnonzero(table["selected"].to_numpy()).tolist()
            work = selection_work(selector.config, len(selector.pool_tokens), selector.total_checkpoints, base)
            cached["work_share"] = work.share
            write_json(path, cached)
            shutil.rmtree(run_dir / "rose", ignore_errors=True)  # the stores: the timing is what is kept
            base = suite.base()  # a fresh base: the selector's adapter was attached to this one
        picks = set(sweep[target.name][setting.key]["picks"])
        cached["same_picks_as_sweep"] = len(picks & set(cached["picks"])) / len(picks)
        out[setting.key] = cached
        log(f"{suite.name} cost {setting.key}: {cached['cpu_s']:.0f} CPU-s, {cached['wall_s']:.0f}s wall")
    full = out[FULL.key]["cpu_s"]
    for value in out.values():
        value["cpu_share"] = value["cpu_s"] / full
    return {"target": target.name, "total_layers": total_layers, "settings": out}


# ---------------------------------------------------------------------------------- trained accuracy


def trained(suite: Suite, sweep: dict, settings: list[Setting], seeds=(0, 1, 2, 3, 4)) -> dict:
    """(d)'s protocol for the properties suite: each target's picks trained and evaluated on its test pairs,
    paired against random's seeds and against the full method's picks."""
    import property_targets as pt
    from property_report import paired

    pb = suite.extra["pb"]
    out = {}
    for target in suite.targets:
        prop, direction = target.name.rsplit("_", 1)
        randoms = [
            pt.oriented(pb.evaluate(prop, pb.select("random", prop, direction, s)[suite.budget]["picks"]), direction)
            for s in seeds
        ]
        full = pt.oriented(pb.evaluate(prop, sweep[target.name][FULL.key]["picks"]), direction)
        rows = {}
        for setting in [FULL, *settings]:
            mine = pt.oriented(pb.evaluate(prop, sweep[target.name][setting.key]["picks"]), direction)
            rows[setting.key] = {
                "accuracy": mine["accuracy"],
                "accuracy_ci": mine["accuracy_ci"],
                "vs_random": paired([mine], randoms, "wins"),
                "vs_full": paired([mine], [full], "wins"),
                "margin_vs_full": paired([mine], [full], "margins"),
            }
        out[target.name] = {"random_accuracy": [r["accuracy"] for r in randoms], "settings": rows}
    return out


# ---------------------------------------------------------------------------------- reporting


def merge(path: Path, suite: str, entry: dict) -> dict:
    data = read_json(path) or {}
    data.setdefault("suites", {}).setdefault(suite, {}).update(entry)
    write_json(path, data)
    return data


def write_csv(path: Path, data: dict) -> None:
    rows = []
    for suite, entry in data.get("suites", {}).items():
        costs = entry.get("costs", {}).get("settings", {})
        warm = (entry.get("warmup") or {}).get("cpu_s")
        for target, by_setting in entry.get("sweep", {}).items():
            full = by_setting[FULL.key]["auc"]
            for key, r in by_setting.items():
                c = costs.get(key, {})
                t = entry.get("trained", {}).get(target, {}).get("settings", {}).get(key, {})
                rows.append(
                    {
                        "suite": suite,
                        "target": target,
                        "setting": key,
                        "auc": round(r["auc"], 4),
                        "auc_minus_full": round(r["auc"] - full, 4),
                        "overlap_with_full": round(r["overlap"], 4),
                        "cpu_s": round(c["cpu_s"], 1) if c else "",
                        "cpu_s_with_warmup": round(c["cpu_s"] + warm, 1) if c and warm else "",
                        "cpu_share_of_full": round(c["cpu_share"], 3) if c else "",
                        "predicted_share": round(entry.get("predicted", {}).get(key, float("nan")), 3),
                        "accuracy_vs_full": round(t["vs_full"]["mean"], 3) if t else "",
                        "accuracy_vs_full_ci": json.dumps([round(x, 3) for x in t["vs_full"]["ci"]]) if t else "",
                    }
                )
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def cost_shares(entry: dict) -> dict[str, float]:
    """Each setting's selection cost, a share of the full method's: measured where --costs timed it, else predicted."""
    costs = (entry.get("costs") or {}).get("settings") or {}
    return {k: costs[k]["cpu_share"] if k in costs else p for k, p in entry["predicted"].items()}


def worst_differences(entry: dict) -> dict[str, float]:
    """Each setting's AUC minus the full method's, the worst over the suite's targets and directions."""
    return {k: min(by[k]["auc"] - by[FULL.key]["auc"] for by in entry["sweep"].values()) for k in entry["predicted"]}


def frontier(entry: dict) -> list[str]:
    """Settings no other is both cheaper and closer to the full method (worst AUC difference over the targets)."""
    shares, worst = cost_shares(entry), worst_differences(entry)
    return [
        k
        for k in shares
        if not any(
            shares[o] <= shares[k] and worst[o] >= worst[k] and (shares[o], worst[o]) != (shares[k], worst[k])
            for o in shares
        )
    ]


def holding(data: dict, tolerance: float = 0.03) -> dict[str, dict]:
    """Per setting key: the suites that ran it, whether its AUC stays within `tolerance` of the full method's on every
    target and direction of each, and its worst difference; with its cost share on each suite (measured where
    --costs ran, else predicted)."""
    out = {}
    for suite, entry in data.get("suites", {}).items():
        costs = (entry.get("costs") or {}).get("settings") or {}
        shares, differences = cost_shares(entry), worst_differences(entry)
        for key in entry["predicted"]:
            worst = differences[key]
            row = out.setdefault(key, {"suites": {}, "holds": True, "worst": float("inf")})
            row["suites"][suite] = {"worst": worst, "share": shares[key], "measured": key in costs}
            row["holds"] = row["holds"] and worst >= -tolerance
            row["worst"] = min(row["worst"], worst)
    return out


def print_table(suite: str, entry: dict) -> None:
    costs = entry.get("costs", {}).get("settings") or {}
    targets = list(entry["sweep"])
    print(f"\n#### {suite}: AUC (overlap of the picks with the full method's) per target; cost of the selection")
    print("| setting | " + " | ".join(targets) + " | worst AUC - full | CPU-s (share of full) | predicted share |")
    print("|---|" + "---|" * len(targets) + "---|---|---|")
    front = set(frontier(entry))
    differences = worst_differences(entry)
    for key in entry["predicted"]:
        cells = [f"{entry['sweep'][t][key]['auc']:.3f} ({entry['sweep'][t][key]['overlap']:.2f})" for t in targets]
        worst = differences[key]
        cost = f"{costs[key]['cpu_s']:.0f} ({costs[key]['cpu_share']:.2f})" if key in costs else "-"
        name = f"**{key}**" if key in front else key
        print(f"| {name} | " + " | ".join(cells) + f" | {worst:+.3f} | {cost} | {entry['predicted'][key]:.2f} |")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("outputs/smollm2/model"), help="SmolLM2 (properties, se, hh)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_frontier"))
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON results are merged into (CSV beside)")
    p.add_argument(
        "--suites",
        nargs="+",
        default=["planted", "planted_distractor"],
        choices=["properties", "se", "hh", "planted", "planted_distractor"],
    )
    p.add_argument("--properties", nargs="+", default=["se_link", "se_code", "se_emphasis"])
    p.add_argument(
        "--release",
        type=Path,
        default=os.environ.get("ROSE_DATA_DIR"),
        help="a copy of the paper's release (the properties' held-out pairs come from its test answers, as in (d)); "
        "default $ROSE_DATA_DIR",
    )
    p.add_argument("--prefilter", type=float, default=0.2, help="the first pass's share of the pool")
    p.add_argument("--costs", action="store_true", help="time each setting's own selection on the cost target")
    p.add_argument("--cost-settings", nargs="*", default=None, help="setting keys to time (default: all)")
    p.add_argument("--lock", type=Path, default=None, help="hold this file's exclusive lock while timing")
    p.add_argument("--train", nargs="*", default=None, metavar="SETTING", help="(d)'s trained accuracy (properties)")
    p.add_argument("--se-pool", type=int, default=80, help="SE target prompts in the se suite's pool (+ 40 HH)")
    p.add_argument("--hh-pool", type=int, default=60, help="HH target prompts in the hh suite's pool (+ 40 SE)")
    p.add_argument("--released-epochs", type=int, default=2, help="warm-up epochs (checkpoints) of se and hh")
    p.add_argument("--tiny-layers", type=int, default=4)
    p.add_argument("--planted-pool", type=int, default=None)
    p.add_argument("--planted-epochs", type=int, default=4)
    p.add_argument("--planted-dim", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="memory_budget_gb of every selection (default: ROSEConfig's); the same for every setting",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    data = {}
    for name in args.suites:
        suite = build_suite(args, name)
        suite.memory = args.memory_budget_gb
        sweep = run_sweep(suite)
        total = suite.layer_subsets[0]
        checkpoints = len(find_checkpoints(suite.warmup()))
        predicted = {}
        for s in suite.settings:
            chosen = len(resolve_checkpoints(None if s.checkpoints is None else list(s.checkpoints), checkpoints))
            work = SelectionWork(
                len(suite.pool), checkpoints, chosen, s.layers, total, s.prefilter, suite.prefilter_layers
            )
            predicted[s.key] = work.share
        entry = {
            "settings": {s.key: s.describe(total) for s in suite.settings},
            "sweep": {t: {k: {x: v for x, v in r.items()} for k, r in rows.items()} for t, rows in sweep.items()},
            "predicted": predicted,
            "warmup": read_json(suite.folder / "warmup_cost.json"),
            "pool_rows": len(suite.pool),
            "checkpoints": checkpoints,
            "budget": suite.budget,
            "layers": total,
            "memory_budget_gb": suite.memory,
        }
        if args.costs:
            keys = args.cost_settings
            chosen = [s for s in suite.settings if keys is None or s.key in keys or s == FULL]
            entry["costs"] = measure_costs(suite, sweep, args.lock, chosen)
        if args.train is not None and name == "properties":
            entry["trained"] = trained(suite, sweep, [Setting.parse(k) for k in args.train])
        data = merge(args.results, name, entry)
        print_table(name, data["suites"][name])
    write_csv(args.results.with_suffix(".csv"), data)
    print("\n#### Settings whose AUC stays within 0.03 of the full method's on every target and direction they ran on")
    print("| setting | suites | worst AUC - full | cost share per suite (m: measured, p: predicted) |")
    print("|---|---|---|---|")
    for key, row in sorted(holding(data).items(), key=lambda kv: max(s["share"] for s in kv[1]["suites"].values())):
        if row["holds"]:
            shares = ", ".join(
                f"{name} {s['share']:.2f} {'m' if s['measured'] else 'p'}" for name, s in row["suites"].items()
            )
            print(f"| {key} | {len(row['suites'])} | {row['worst']:+.3f} | {shares} |")
    return data


if __name__ == "__main__":
    main()
