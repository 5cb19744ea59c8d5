"""The shots sweep of benchmarks/quality/property_targets.py: how many validation pairs a target needs, and how much
they must agree; and where the released SE and HH few-shot pairs sit on that curve.

Per property, one ROSE selection with all of its validation pairs (prefer direction) writes one DPO gradient
per pair and checkpoint. From those stores alone (no model, nothing trained), for k in --shots and --draws
random draws of k pairs:
- agreement: the pairs' mean pairwise gradient cosine (rose_trl.scoring.agreement.pair_agreement, eta-weighted over the
  checkpoints, as summary.json reports it), and the reliability R = k a / (1 + (k - 1) a);
- AUC: ROSE's score from those k pairs (rose_trl.scoring.scores's formula: eta-weighted cosine of each pool row's
  gradient with the mean unit pair gradient) for the preferred rows over the other rows of the task;
- share: the preferred rows' share of the top 10%;
- reproducibility (k <= n/2): the share of the top 10% that a disjoint draw of k other pairs picks too
  (chance: 0.10).
The avoid direction's pairs are the same pairs swapped, whose unit DPO gradients are the negated ones (the
DPO weight cancels in the normalization): its scores are the negated scores and its preferred side is the other
side, so its agreement, AUC and reproducibility are the same (its share: of the rows without the property).
The threshold of rose_trl.scoring.agreement is read off this table: the lowest reliability bin from which the median
reproducibility stays at or above one half.
Placement: the released SE and HH few-shot files of the slice, their gradients on the same warm-up: per subtask
their agreement and the reliability at the paper's k and at 50 shots; and all of a file's pairs as one target,
swept like a property (agreement and reproducibility; the pool holds no labels for them), to set beside the
property targets at the same k.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
from common import log, unit
from datasets import Dataset
from real_model_report import auc

from rose_trl.data.realtext import DEFAULT_K, load_slice
from rose_trl.scoring.agreement import pair_agreement, reliability
from rose_trl.stores.store import GradientStore


BINS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]


def read_stores(selection_dir: Path, pool_dir: Path) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(eta normalized, per checkpoint unit pool gradients, per checkpoint unit validation gradients; a pair whose
    gradient is zero stays a zero row: `usable` tells them apart)."""
    checkpoints = json.loads((selection_dir / "rose" / "checkpoints.json").read_text())["checkpoints"]
    eta = np.asarray([c["learning_rate"] for c in checkpoints], dtype=np.float64)
    pool = [unit(GradientStore.open(pool_dir / c["name"]).read_all().astype(np.float64)) for c in checkpoints]
    val = [
        unit(GradientStore.open(selection_dir / "rose" / "val_dpo" / c["name"]).read_all().astype(np.float64))
        for c in checkpoints
    ]
    return eta / eta.sum(), pool, val


def usable(val: list[np.ndarray]) -> np.ndarray:
    """Pairs with a non-zero gradient at every checkpoint (ROSE leaves the others out of every mean)."""
    return np.flatnonzero(np.all([np.abs(v).sum(axis=1) > 0 for v in val], axis=0))


def score(eta, pool, val, pairs) -> np.ndarray:
    return sum(e * p @ v[pairs].mean(axis=0) for e, p, v in zip(eta, pool, val, strict=True))


def agreement_of(eta, val, pairs) -> float | None:
    values = [pair_agreement(v[pairs]) for v in val]
    return None if any(x is None for x in values) else float(np.dot(eta, values))


def top(scores: np.ndarray, n: int) -> set:
    return set(np.lexsort((np.arange(len(scores)), -scores))[:n].tolist())


def sweep(
    eta, pool, val, answers: np.ndarray, shots: list[int], draws: int, budget: float = 0.1, seed: int = 0
) -> list[dict]:
    """One row per (k, draw): see the module docstring. answers: the pool's chosen/rejected/other labels (None:
    no AUC nor share)."""
    kept = usable(val)
    n_pairs = len(kept)
    n_rows = len(pool[0])
    labelled = answers is not None  # without labels (released pairs on this pool): agreement and reproducibility
    if labelled:
        pos, neg = np.flatnonzero(answers == "chosen"), np.flatnonzero(answers == "rejected")
    n_top = max(1, int(np.ceil(budget * n_rows - 1e-9)))
    rng = np.random.default_rng(seed)
    rows = []
    for k in shots:
        if k > n_pairs:
            continue
        for d in range(1 if k == n_pairs else draws):
            order = kept[rng.permutation(n_pairs)]
            pairs = order[:k]
            s = score(eta, pool, val, pairs)
            picked = top(s, n_top)
            row = {"k": k, "draw": d, "agreement": agreement_of(eta, val, pairs)}
            if labelled:
                row["auc"] = auc(s, pos, neg)
                row["share"] = float(np.mean([answers[i] == "chosen" for i in picked]))
            row["reliability"] = reliability(row["agreement"], k)
            if 2 * k <= n_pairs:
                other = order[k : 2 * k]
                row["reproducibility"] = len(picked & top(score(eta, pool, val, other), n_top)) / n_top
                other_agreement = agreement_of(eta, val, other)
                if row["agreement"] is not None:  # both draws' reliability: what each would report
                    row["reliability_pair"] = float(np.mean([row["reliability"], reliability(other_agreement, k)]))
            rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for k in sorted({r["k"] for r in rows}):
        mine = [r for r in rows if r["k"] == k]
        entry = {"k": k, "draws": len(mine)}
        for key in ("agreement", "reliability", "auc", "share", "reproducibility"):
            values = [r[key] for r in mine if r.get(key) is not None]
            entry[key] = (float(np.mean(values)), float(np.std(values))) if values else None
        out.append(entry)
    return out


def threshold(rows_by_target: dict[str, list[dict]]) -> dict:
    """Median reproducibility per bin of reliability (both draws' mean), pooled over targets, and the lowest bin
    edge from which every bin with draws has a median of at least 0.5."""
    points = [
        (r["reliability_pair"], r["reproducibility"])
        for rows in rows_by_target.values()
        for r in rows
        if r.get("reliability_pair") is not None
    ]
    bins = []
    for lo, hi in itertools.pairwise(BINS):
        inside = [rep for rel, rep in points if lo <= rel < hi]
        bins.append(
            {
                "from": lo,
                "to": min(hi, 1.0),
                "draws": len(inside),
                "median_reproducibility": float(np.median(inside)) if inside else None,
            }
        )
    edge = None
    for i, b in enumerate(bins):
        later = [x for x in bins[i:] if x["draws"]]
        if later and all(x["median_reproducibility"] >= 0.5 for x in later):
            edge = b["from"] if b["draws"] else next(x["from"] for x in later)
            break
    return {"bins": bins, "threshold": edge, "points": len(points)}


def released_pairs(task: str, k: int) -> Dataset:
    name = f"{task}_{k}_shot"
    rows = [
        {f: r[f] for f in ("prompt", "chosen", "rejected", "subtask")}
        for r in load_slice(task)
        if r["released"] == name
    ]
    if not rows:
        raise ValueError(f"the slice has no {name} file")
    return Dataset.from_list(rows)


def placement(pb, task: str, k: int) -> dict:
    """The released k-shot pairs of `task` (SE or HH), their gradients on the suite's warm-up: per subtask the
    agreement, the reliability at the paper's k, at this k and at 50 shots; and all the pairs as one target,
    swept like a property (agreement and reproducibility: the pool has no labels for them)."""
    pairs = released_pairs(task, k)
    pb.gradient_picks("rose", pairs, f"released_{task}_k{k}", [0.1])
    folder = pb.warm_dir / f"sel_released_{task}_k{k}_p{pb.args.projection_dim}"
    eta, pool, val = read_stores(folder, pb.warm_dir / f"pool_train_p{pb.args.projection_dim}")
    subtasks = np.asarray(pairs["subtask"])
    out = {"task": task, "k": k, "pairs": len(pairs), "subtasks": {}}
    for name in dict.fromkeys(subtasks.tolist()):
        rows = np.flatnonzero(subtasks == name)
        a = agreement_of(eta, val, np.intersect1d(rows, usable(val)))
        out["subtasks"][name] = {"pairs": len(rows), "agreement": a}
    values = [s["agreement"] for s in out["subtasks"].values() if s["agreement"] is not None]
    out["agreement"] = float(np.mean(values)) if values else None
    out["all_pairs_agreement"] = agreement_of(eta, val, usable(val))
    out["reliability"] = {f"k={n}": reliability(out["agreement"], n) for n in sorted({DEFAULT_K[task], k, 50})}
    m = len(usable(val))
    rows = sweep(eta, pool, val, None, sorted({s for s in pb.args.shots if s <= m} | {m}), pb.args.draws)
    out["sweep"] = {"rows": rows, "summary": summarize(rows)}
    return out


def run_sweep(pb, props: list[str]) -> dict:
    a = pb.args
    out = {"targets": {}, "released": {}}
    rows_by_target = {}
    pool_dir = pb.warm_dir / f"pool_train_p{a.projection_dim}"
    for prop in props:
        n = len(pb.suite.validation[prop])
        task = pb.suite.task(prop, "prefer", n)
        name = f"{prop}_prefer_k{n}"
        pb.gradient_picks("rose", task.validation, name, [0.1])
        eta, pool, val = read_stores(pb.warm_dir / f"sel_{name}_p{a.projection_dim}", pool_dir)
        # the rows of the property's task only: the AUC and shares compare with and without the property
        answers = np.asarray(task.pool["answer"])
        m = len(usable(val))  # the pairs ROSE can use (a zero gradient leaves a pair out)
        rows = sweep(eta, pool, val, answers, sorted({s for s in a.shots if s <= m} | {m}), a.draws)
        rows_by_target[prop] = rows
        out["targets"][prop] = {"pairs": n, "usable_pairs": len(usable(val)), "rows": rows, "summary": summarize(rows)}
        log(f"sweep {prop}: {len(rows)} draws")
    out["threshold"] = threshold(rows_by_target)
    for task, k in a.released.items():
        out["released"][task] = placement(pb, task, k)
        log(f"placement {task} k={k}: agreement {out['released'][task]['agreement']}")
    return out
