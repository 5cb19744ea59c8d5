"""Why ROSE's score does or does not find the target's chosen answers.

Read off the stores that benchmarks/quality/real_model.py wrote:

    python benchmarks/quality/real_model_probe.py --out outputs/bench_real_model --targets se hh

No model is loaded and nothing is trained: every number comes from the gradient stores that real_model.py
wrote (run it first, with the same sizes and warm-up options). Per target, per warm-up checkpoint:
- pool collinearity: the mean pairwise cosine of the pool's Adam-preconditioned gradients (|mean of the unit
  rows|^2; 1 = one direction). LESS's preconditioner (b1 m + (1 - b1) g) / sqrt(b2 v + (1 - b2) g^2 + eps)
  adds the same b1 m to every row;
- validation agreement: the mean pairwise cosine of the validation DPO gradients: how much the k pairs of the
  file point the same way;
and over all checkpoints (eta-weighted, as ROSE scores):
- ROSE's score's AUC for target-chosen over target-rejected pool rows, with the pool rows as stored and with
  their mean removed (centered), each under max and mean over subtasks;
- a ceiling for any direction in this feature space: a direction fitted on a random half of the target rows
  (mean chosen minus mean rejected unit gradient, all checkpoints concatenated) and its AUC on the other half,
  over 20 splits: what ~100 labelled rows give, against k validation pairs per subtask;
- the answer's length alone, as an AUC.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
from common import unit
from real_model import task_sizes_and_key, warmup_folder
from real_model_report import auc, auc_interval

from rose_trl.data.realtext import SLICE_FILES, build_real_task
from rose_trl.stores.store import GradientStore


def collinearity(rows: np.ndarray) -> float:
    """Mean cosine over all ordered pairs of distinct unit rows."""
    n = len(rows)
    total = float(np.linalg.norm(rows.sum(0)) ** 2)  # sum over all pairs, the n self-pairs included
    return (total - n) / (n * (n - 1))


def fitted_direction_auc(features: np.ndarray, answers: np.ndarray, splits: int = 20, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        fit = rng.random(len(answers)) < 0.5
        groups = [side & (answers == a) for side in (fit, ~fit) for a in ("chosen", "rejected")]
        if not all(g.any() for g in groups):
            continue  # a tiny pool: a split with an empty side says nothing
        direction = features[fit & (answers == "chosen")].mean(0) - features[fit & (answers == "rejected")].mean(0)
        scores = features @ direction
        values.append(
            auc(scores, np.flatnonzero(~fit & (answers == "chosen")), np.flatnonzero(~fit & (answers == "rejected")))
        )
    return (float(np.mean(values)), float(np.std(values))) if values else (float("nan"), float("nan"))


def probe(run_dir: Path, task, projection_dim: int, k: int) -> dict:
    """The numbers of the module docstring for one warm-up folder and the validation file with k shots."""
    selection = run_dir / f"sel_k{k}_beta0.1_all_p{projection_dim}" / "rose"
    checkpoints = json.loads((selection / "checkpoints.json").read_text())["checkpoints"]
    answers = np.asarray(task.pool["answer"])
    pos, neg = np.flatnonzero(answers == "chosen"), np.flatnonzero(answers == "rejected")
    subtasks = np.asarray(task.validation["subtask"])
    plain = centered = 0.0
    per_checkpoint, features = [], []
    for ckpt in checkpoints:
        pool = unit(
            GradientStore.open(run_dir / f"pool_train_p{projection_dim}" / ckpt["name"]).read_all().astype(np.float64)
        )
        val = unit(GradientStore.open(selection / "val_dpo" / ckpt["name"]).read_all().astype(np.float64))
        per_checkpoint.append(
            {
                "checkpoint": ckpt["name"],
                "eta": ckpt["learning_rate"],
                "pool_collinearity": collinearity(pool),
                "validation_agreement": collinearity(val),
            }
        )
        targets = np.stack([unit(val[subtasks == s]).mean(0) for s in dict.fromkeys(subtasks.tolist())])
        plain = plain + ckpt["learning_rate"] * pool @ targets.T
        centered = centered + ckpt["learning_rate"] * unit(pool - pool.mean(0)) @ targets.T
        features.append(pool)
    out = {"checkpoints": per_checkpoint, "auc": {}}
    for name, table in (("as stored", plain), ("centered", centered)):
        for reduce in ("max", "mean"):
            scores = getattr(table, reduce)(axis=1)
            out["auc"][f"{name}, {reduce}"] = (auc(scores, pos, neg), auc_interval(scores, pos, neg))
    out["picked_for"] = np.bincount(plain.argmax(1), minlength=plain.shape[1]).tolist()
    out["fitted_direction_auc"] = fitted_direction_auc(np.concatenate(features, axis=1), answers)
    lengths = np.asarray([len(c) for c in task.pool["completion"]], dtype=np.float64)
    out["length_auc"] = (auc(lengths, pos, neg), auc_interval(lengths, pos, neg))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_real_model"), help="real_model.py's --out")
    p.add_argument("--targets", nargs="+", default=["se", "hh"], choices=["se", "hh"])
    p.add_argument(
        "--ks", nargs="+", type=int, default=None, help="shots per subtask (default: each target's paper k)"
    )
    p.add_argument("--pool-target", type=int, default=None)
    p.add_argument("--pool-other", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=4)
    p.add_argument("--projection-dim", type=int, default=8192)
    args = p.parse_args(argv)
    results = {}
    for target in args.targets:
        sizes, task_key = task_sizes_and_key(target, args)
        run_dir = warmup_folder(args.out, target, task_key, args.lora_r, args.warmup_fraction, args.warmup_epochs)
        for k in args.ks or [SLICE_FILES[target][0]]:
            task = build_real_task(target, k=k, seed=args.task_seed, **sizes)
            res = results[f"{target}_k{k}"] = probe(run_dir, task, args.projection_dim, k)
            print(f"\n### {target}, k={k}: {len(task.pool)} pool rows, {len(task.validation)} validation pairs")
            print("| checkpoint | eta | pool collinearity | validation agreement |\n|---|---|---|---|")
            for c in res["checkpoints"]:
                print(
                    f"| {c['checkpoint']} | {c['eta']:.2e} | {c['pool_collinearity']:.3f} "
                    f"| {c['validation_agreement']:.3f} |"
                )
            print("\n| score | AUC chosen>rejected [95% CI] |\n|---|---|")
            for name, (value, ci) in res["auc"].items():
                print(f"| ROSE, pool gradients {name} | {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
            mean, std = res["fitted_direction_auc"]
            print(
                f"| a direction fitted on half the target rows (held-out half, 20 splits) | {mean:.3f} +- {std:.3f} |"
            )
            value, ci = res["length_auc"]
            print(f"| answer length alone | {value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
            print(f"\nrows whose max is taken for each subtask: {res['picked_for']}")
    return results


if __name__ == "__main__":
    main()
