"""Does a ROSE selection make a real model better? SmolLM2-135M-Instruct, real text, held-out intervals.

    rose-trl smollm2-assets outputs/smollm2                           # once: the model folder (model/)
    python benchmarks/real_model.py --model outputs/smollm2/model --quick          # < 20 min on 2 cores
    python benchmarks/real_model.py --model outputs/smollm2/model                  # the full grid
    python benchmarks/real_model.py --model outputs/smollm2/model --quick --variants   # dev study of ROSE's options

For each target (SE, HH) `rose_trl.data.realtext.build_real_task` makes the task: a pool of target prompts
answered with their chosen or their rejected answer (a coin flip, recorded in `answer`) plus other-task rows,
the released k-shot preference file as the validation set, and held-out pairs (prompts in neither) split into
a dev and a test half. Every method's selection (rose, less, random over seeds, bm25, dsir, rds; full = the
whole pool) gets the same LoRA SFT; the base model (no training) is the reference of every implicit reward.
Reported per method and budget:
- the selection itself: its share of target-chosen / target-rejected / other rows (random's expected shares
  are the pool's), and for scored methods the AUC of the score for target-chosen over target-rejected rows;
- held-out accuracy of the implicit reward (log pi/ref, chosen > rejected) and its mean margin (beta 0.1),
  each with a 95% bootstrap interval over pairs; random as mean +- std over its seeds;
- the NLL of the held-out chosen answers (LESS's objective, for contrast).
rose and less share one warm-up (checkpoint per epoch) and its pool gradient stores; every budget is scored
from the same stores. --variants runs ROSE's options on the same stores and reports what each selects (no
final training): checkpoints, shots per subtask, subtask_balance, validation_aggregation, loss type and beta.

Every finished unit (warm-up, selection, trained adapter, evaluation) is a file or folder under --out keyed
by its settings and written atomically: a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rose_trl.baselines import BASELINES
from rose_trl.config import ROSEConfig
from rose_trl.data.realtext import SLICE_FILES, build_real_task
from rose_trl.evaluation.metrics import PreferenceMetricsOptions, bootstrap_interval, pair_logps, summarize_pairs
from rose_trl.offline import select_from_checkpoints
from rose_trl.pipeline import last_complete_checkpoint, sft_training_dataset, warmup_indices
from rose_trl.scoring import top_fraction
from rose_trl.selector import ROSESelector

ANSWERS = ("chosen", "rejected", "other")
# The full grid and --quick (one warm-up checkpoint, one budget, rose/less/random trained; measured: docs/
# selection_quality.md (c)). Larger k: the next released file.
FULL = dict(pool_target=150, pool_other=50, heldout=80, budgets=[0.05, 0.1, 0.2], seeds=[0, 1, 2, 3, 4],
            methods=["rose", "less", "random", "bm25", "dsir", "rds", "full"], train_methods=None, ks="both",
            halves=["dev", "test"],
            warmup_epochs=2, final_epochs=2)
QUICK = dict(pool_target=36, pool_other=12, heldout=32, budgets=[0.2], seeds=[0, 1],
             methods=["rose", "less", "random", "bm25", "dsir"], train_methods=["rose", "less", "random"],
             ks="default", halves=["test"],
             warmup_epochs=1, final_epochs=1)
LARGER_K = {"se": 5, "hh": 10}
# ROSE's options studied at the selection level, from the same stores: (name, ROSEConfig options, checkpoints).
# "rescoring" ones cost no gradient pass; "all" adds those that need new validation gradients.
VARIANTS = [
    ("default (sigmoid, beta 0.1, normalized_mean, max)", {}, "all"),
    ("last checkpoint only", {}, "last"),
    ("first checkpoint only", {}, "first"),
    ("subtask_balance round_robin", {"subtask_balance": "round_robin"}, "all"),
    ("subtask_balance proportional", {"subtask_balance": "proportional"}, "all"),
    ("validation_aggregation eq6", {"validation_aggregation": "eq6"}, "all"),
]
GRADIENT_VARIANTS = [
    ("validation beta 1.0, eq6", {"validation_beta": 1.0, "validation_aggregation": "eq6"}, "all"),
    ("loss ipo", {"validation_loss_type": ["ipo"]}, "all"),
    ("loss sigmoid + sft", {"validation_loss_type": ["sigmoid", "sft"]}, "all"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=lambda x: np.asarray(x).tolist()))
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_key = key_of(sorted((p.name, p.stat().st_size) for p in Path(args.model).iterdir() if p.is_file()))
        self.lora = dict(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.1,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        self.train_settings = dict(model=self.model_key, lora=self.lora, lr=args.lr, epochs=args.final_epochs,
                                   batch=args.batch_size, max_length=args.max_length)
        self.eval_options = PreferenceMetricsOptions(max_length=args.max_length, batch_size=8)
        self.counts = {"trained": 0, "evaluated": 0, "selected": 0}

    def base(self):
        return AutoModelForCausalLM.from_pretrained(self.args.model, dtype=torch.float32)

    def sft_args(self, out: Path, epochs: int, save: bool) -> SFTConfig:
        return SFTConfig(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=self.args.batch_size,
                         learning_rate=self.args.lr, lr_scheduler_type="linear", save_strategy="epoch" if save else "no",
                         logging_steps=1, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to=[],
                         max_length=self.args.max_length, disable_tqdm=True, seed=0)

    def train(self, rows: Dataset, out: Path, epochs: int, save: bool, resume: bool = False):
        trainer = SFTTrainer(self.base(), args=self.sft_args(out, epochs, save), processing_class=self.tokenizer,
                             train_dataset=sft_training_dataset(rows, self.tokenizer, self.args.max_length, "bench"),
                             peft_config=LoraConfig(**self.lora))
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if resume else None)
        return trainer

    # ---- per target ------------------------------------------------------------------------------
    def task(self, target: str, k: int):
        a = self.args
        task = build_real_task(target, k=k, pool_target=a.pool_target, pool_other=a.pool_other, heldout=a.heldout,
                               seed=a.task_seed)
        task_key = key_of(target, a.pool_target, a.pool_other, a.heldout, a.task_seed)
        return task, task_key

    def warmup(self, pool: Dataset, folder: Path) -> Path:
        """LoRA SFT on warmup_fraction of the pool, a checkpoint (with its Adam state) per epoch."""
        done = folder / "done.json"
        if not done.exists():
            log(f"warm-up: {folder}")
            t0 = time.time()
            rows = pool.select(warmup_indices(len(pool), self.args.warmup_fraction, 0))
            self.train(rows, folder, self.args.warmup_epochs, save=True, resume=True)
            write_json(done, {"seconds": time.time() - t0})
        return folder

    def checkpoint_dir(self, warm: Path, which: str) -> Path:
        """`which` = all | first | last: a folder of links to those warm-up checkpoints (their stores are shared)."""
        if which == "all":
            return warm
        ckpts = sorted((p for p in warm.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))
        keep = ckpts[0] if which == "first" else ckpts[-1]
        folder = warm.parent / f"{warm.name}_{which}"
        folder.mkdir(exist_ok=True)
        if not (folder / keep.name).exists():
            os.symlink(keep.resolve(), folder / keep.name)
        return folder

    def gradient_selection(self, method: str, target_dir: Path, warm: Path, pool, validation, k: int,
                           options: dict, checkpoints: str, budgets: list[float]) -> dict[float, np.ndarray]:
        """rose/less picks at every budget. One output dir per (validation set, beta, checkpoints): what
        ROSESelector's run record holds; the pool gradient stores are shared through a link."""
        a = self.args
        beta = options.get("validation_beta", 0.1)
        out = target_dir / f"sel_k{k}_beta{beta:g}_{checkpoints}_p{a.projection_dim}"
        shared = target_dir / f"pool_train_p{a.projection_dim}"
        shared.mkdir(parents=True, exist_ok=True)
        (out / "rose").mkdir(parents=True, exist_ok=True)
        if not (out / "rose" / "train").exists():
            os.symlink(shared.resolve(), out / "rose" / "train")
        config = ROSEConfig(selection_method=method, selection_fraction=budgets[0], projection_dim=a.projection_dim,
                            gradient_batch_size=8, **options)
        selector = ROSESelector(pool, validation, self.tokenizer, config, out, max_length=a.max_length, use_cpu=True,
                                progress=a.progress)
        tag = key_of(method, options)[:8]
        picks = {}
        for i, budget in enumerate(budgets):
            folder = f"selection_{method}_{tag}_{round(budget * 100)}"
            if i == 0:
                path = select_from_checkpoints(self.checkpoint_dir(warm, checkpoints), self.base(), selector, folder=folder)
            else:  # the same stores, scored again at another budget
                selector.config = dataclasses.replace(config, selection_fraction=budget)
                path = selector.finalize(folder)
            picks[budget] = selected_from(path)
        return picks

    def select(self, method: str, seed: int, target: str, k: int, task, task_key: str, warm: Path | None,
               options: dict | None = None, checkpoints: str = "all") -> dict[float, dict]:
        """{budget: {"picks": [...], "scores": [...] or None}}, cached per settings."""
        a = self.args
        options = options or {}
        common = (method, target, k, task_key, self.model_key, a.max_length)
        grad = (a.lora_r, a.warmup_fraction, a.warmup_epochs, a.lr, a.projection_dim, options, checkpoints) \
            if method in ("rose", "less") else ()
        paths = {b: self.out / "selections" / f"{method}_{target}_k{k}_{round(b * 100)}_s{seed}_"
                 f"{key_of(common, grad, seed if method == 'random' else 0, b)}.json" for b in a.budgets}
        if all(p.exists() for p in paths.values()):
            return {b: read_json(p) for b, p in paths.items()}
        t0 = time.time()
        pool, validation = task.pool, task.validation
        if method in ("rose", "less"):
            target_dir = self.out / f"{target}_{task_key}" / f"r{a.lora_r}_w{a.warmup_fraction:g}_e{a.warmup_epochs}"
            picks = self.gradient_selection(method, target_dir, warm, pool, validation, k, options, checkpoints,
                                            a.budgets)
        elif method == "full":
            picks = {b: (np.arange(len(pool)), None) for b in a.budgets}
        else:
            model = self.base() if method == "rds" else None
            extra = {"max_length": a.max_length} if method == "rds" else {}
            table = BASELINES[method](pool, validation, seed=seed, model=model, tokenizer=self.tokenizer, **extra)
            picks = {b: (top_fraction(table["score"], b), np.asarray(table["score"])) for b in a.budgets}
        self.counts["selected"] += 1
        result = {}
        for b, (chosen, scores) in picks.items():
            result[b] = {"picks": [int(i) for i in chosen], "scores": None if scores is None else scores.tolist()}
            write_json(paths[b], result[b])
        log(f"selected {target} k={k} {method}{'' if method != 'random' else f' seed {seed}'}"
            f"{' ' + json.dumps(options) if options else ''}{'' if checkpoints == 'all' else ' ckpt ' + checkpoints}"
            f" ({time.time() - t0:.0f}s)")
        return result

    def adapter(self, target: str, task_key: str, pool: Dataset, picks: list[int]) -> Path:
        folder = self.out / "adapters" / f"{target}_{key_of(task_key, sorted(picks), self.train_settings)}"
        if (folder / "adapter_model.safetensors").exists():
            return folder
        t0 = time.time()
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        trainer = self.train(pool.select(sorted(picks)), tmp / "run", self.args.final_epochs, save=False)
        trainer.save_model(str(tmp / "model"))
        os.replace(tmp / "model", folder)  # weights complete, then visible
        shutil.rmtree(tmp, ignore_errors=True)
        self.counts["trained"] += 1
        log(f"trained {folder.name} on {len(picks)} rows ({time.time() - t0:.0f}s)")
        return folder

    def reference(self, target: str, task_key: str, pairs: Dataset, half: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.out / "evals" / f"base_{target}_{task_key}_{half}_{key_of(self.model_key, self.args.max_length)}.npz"
        if not path.exists():
            t0 = time.time()
            logps, counts = pair_logps(self.base(), self.tokenizer, pairs, self.eval_options)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
            np.savez(tmp, logps=logps, counts=counts)
            tmp.replace(path)
            log(f"base log-probs of {len(pairs)} {target} {half} pairs ({time.time() - t0:.0f}s)")
        data = np.load(path, allow_pickle=False)
        return data["logps"], data["counts"]

    def evaluate(self, target: str, task_key: str, pairs: Dataset, half: str, folder: Path | None) -> dict:
        """Implicit-reward summary (base = reference) and the NLL of the chosen answers; folder None = base."""
        name = "base" if folder is None else folder.name
        path = self.out / "evals" / f"{name}_{half}_{key_of(task_key, self.args.max_length)}.json"
        if path.exists():
            return read_json(path)
        reference, counts = self.reference(target, task_key, pairs, half)
        policy = reference
        if folder is not None:
            t0 = time.time()
            policy, _ = pair_logps(PeftModel.from_pretrained(self.base(), str(folder)), self.tokenizer, pairs,
                                   self.eval_options)
            self.counts["evaluated"] += 1
            log(f"evaluated {name} on {len(pairs)} {half} pairs ({time.time() - t0:.0f}s)")
        summary = summarize_pairs(policy, counts, reference, pairs, self.eval_options)
        summary.pop("per_subtask", None)
        n = len(pairs)
        summary["chosen_nll"] = float(-policy[:n].sum() / counts[:n].sum())  # = reference_nll of the chosen answers
        write_json(path, summary)
        return read_json(path)  # as a cached run reads it


def selected_from(selection: Path) -> tuple[np.ndarray, np.ndarray]:
    """(picked pool indices, best first; every row's score) of a selection folder."""
    import pandas as pd

    frame = pd.read_parquet(selection / "scores.parquet", columns=["pool_index", "score", "selected"])
    scores = frame["score"].to_numpy()  # in pool order: pool_index is 0..n-1
    chosen = frame["pool_index"].to_numpy()[frame["selected"].to_numpy()]
    return chosen[np.argsort(-scores[chosen], kind="stable")], scores


def auc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive row > score of a negative row), ties 1/2."""
    diff = scores[positive][:, None] - scores[negative][None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def auc_interval(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, resamples: int = 1000,
                 seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of `auc`, rows resampled within each class."""
    rng = np.random.default_rng(seed)
    values = [auc(scores, rng.choice(positive, len(positive)), rng.choice(negative, len(negative)))
              for _ in range(resamples)]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def composition(pool: Dataset, picks: list[int], scores) -> dict:
    answers = np.asarray(pool["answer"])
    subtasks = np.asarray(pool["subtask"])
    picked = answers[np.asarray(picks, dtype=np.int64)]
    out = {a: float(np.mean(picked == a)) for a in ANSWERS}
    target_picks = picked[picked != "other"]
    out["chosen_of_target"] = float(np.mean(target_picks == "chosen")) if len(target_picks) else float("nan")
    out["chosen_of_target_ci"] = bootstrap_interval((target_picks == "chosen").astype(float))
    out["subtasks"] = len(set(subtasks[np.asarray(picks, dtype=np.int64)][picked != "other"].tolist()))
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        pos, neg = np.flatnonzero(answers == "chosen"), np.flatnonzero(answers == "rejected")
        out["auc_chosen_rejected"] = auc(scores, pos, neg)
        out["auc_chosen_rejected_ci"] = auc_interval(scores, pos, neg)
    return out


def fmt_ci(value, ci, digits=3) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def pool_shares(pool: Dataset) -> dict:
    answers = np.asarray(pool["answer"])
    return {a: float(np.mean(answers == a)) for a in ANSWERS}


def run_target(bench: Bench, target: str, k: int, results: dict, train: bool) -> None:
    """Every method's selection and its composition; with `train`, its adapter and held-out metrics too."""
    a = bench.args
    task, task_key = bench.task(target, k)
    pool = task.pool
    target_dir = bench.out / f"{target}_{task_key}" / f"r{a.lora_r}_w{a.warmup_fraction:g}_e{a.warmup_epochs}"
    warm = bench.warmup(pool, target_dir / "warmup") if {"rose", "less"} & set(a.methods) else None
    name = f"{target}_k{k}"
    res = results[name] = {"pool": {"rows": len(pool), **pool_shares(pool)}, "validation_pairs": len(task.validation),
                           "methods": {}}
    halves = {h: task.heldout.filter(lambda r, h=h: r["half"] == h) for h in a.halves} if train else {}
    res["heldout"] = {h: len(p) for h, p in halves.items()}
    for h, pairs in halves.items():
        res.setdefault("base", {})[h] = bench.evaluate(target, task_key, pairs, h, None)
    for method in a.methods:
        for seed in (a.seeds if method == "random" else [0]):
            picks = bench.select(method, seed, target, k, task, task_key, warm)
            for budget in a.budgets:
                entry = picks[budget]
                row = {"composition": composition(pool, entry["picks"], entry["scores"])}
                res["methods"].setdefault(method, {}).setdefault(str(budget), []).append(row)
                if not train or method not in a.train_methods:
                    continue  # its selection only
                folder = bench.adapter(target, task_key, pool, entry["picks"])
                for h, pairs in halves.items():
                    row[h] = bench.evaluate(target, task_key, pairs, h, folder)
                log(f"{name} {method} {budget:.0%}{f' seed {seed}' if method == 'random' else ''}: picks "
                    + " / ".join(f"{x} {row['composition'][x]:.2f}" for x in ANSWERS) + "; "
                    + "; ".join(f"{h} acc {row[h]['accuracy']:.3f}" for h in halves))


def run_variants(bench: Bench, target: str, k_default: int, results: dict, variants: list) -> None:
    """ROSE's options at the selection level: what each picks, from the same warm-up and pool stores."""
    a = bench.args
    out = results.setdefault(f"{target}_variants", {})
    for name, options, checkpoints in variants:
        if checkpoints != "all" and a.warmup_epochs < 2:
            continue  # one checkpoint: nothing to leave out
        options = dict(options)
        k = options.pop("k", k_default)
        task, task_key = bench.task(target, k)
        target_dir = bench.out / f"{target}_{task_key}" / f"r{a.lora_r}_w{a.warmup_fraction:g}_e{a.warmup_epochs}"
        warm = bench.warmup(task.pool, target_dir / "warmup")
        methods = ["rose", "less"] if not options and checkpoints == "all" else ["rose"]
        for method in methods:
            try:
                picks = bench.select(method, 0, target, k, task, task_key, warm, options, checkpoints)
            except ValueError as e:  # e.g. every pair of a subtask with a zero gradient
                out[f"{method}: {name}"] = {"refused": str(e)}
                continue
            out[f"{method}: {name}"] = {str(b): composition(task.pool, picks[b]["picks"], picks[b]["scores"])
                                        for b in a.budgets}


def print_tables(results: dict, args) -> None:
    mode = "quick" if args.quick else "full"
    for name, res in results.items():
        if name.endswith("_variants"):
            continue
        shares = res["pool"]
        print(f"\n### {name} ({mode}): pool {shares['rows']} rows (chosen {shares['chosen']:.2f} / rejected "
              f"{shares['rejected']:.2f} / other {shares['other']:.2f}: random's expected shares), "
              f"{res['validation_pairs']} validation pairs, held-out pairs {res['heldout']}")
        for h in args.halves:
            base = res["base"][h]
            print(f"\n{h} half ({res['heldout'][h]} pairs). base: likelihood accuracy "
                  f"{fmt_ci(base['likelihood_accuracy'], base['likelihood_accuracy_ci'])}, chosen NLL "
                  f"{base['chosen_nll']:.3f}")
            print("| budget | method | picks chosen / rejected / other | AUC chosen>rejected | accuracy [95% CI] "
                  "| mean margin [95% CI] | chosen NLL |\n|---|---|---|---|---|---|---|")
            for budget in args.budgets:
                for method, by_budget in res["methods"].items():
                    rows = by_budget.get(str(budget))
                    if not rows:
                        continue
                    comp = " / ".join(f"{np.mean([r['composition'][x] for r in rows]):.2f}" for x in ANSWERS)
                    aucs = [r["composition"].get("auc_chosen_rejected") for r in rows]
                    if aucs[0] is None:
                        auc_text = "-"
                    elif len(rows) == 1:
                        auc_text = fmt_ci(aucs[0], rows[0]["composition"]["auc_chosen_rejected_ci"], 2)
                    else:
                        auc_text = f"{np.mean(aucs):.2f} +- {np.std(aucs):.2f}"
                    if h not in rows[0]:
                        print(f"| {budget:.0%} | {method} | {comp} | {auc_text} | not trained | | |")
                        continue
                    acc = [r[h]["accuracy"] for r in rows]
                    margin = [r[h]["reward_margin"] for r in rows]
                    nll = [r[h]["chosen_nll"] for r in rows]
                    if len(rows) == 1:
                        r = rows[0][h]
                        acc_text, margin_text = fmt_ci(r["accuracy"], r["accuracy_ci"]), \
                            fmt_ci(r["reward_margin"], r["reward_margin_ci"], 4)
                    else:
                        acc_text = f"{np.mean(acc):.3f} +- {np.std(acc):.3f} (seeds {args.seeds})"
                        margin_text = f"{np.mean(margin):.4f} +- {np.std(margin):.4f}"
                    print(f"| {budget:.0%} | {method} | {comp} | {auc_text} | {acc_text} | {margin_text} "
                          f"| {np.mean(nll):.3f} |")
    for name, res in results.items():
        if not name.endswith("_variants"):
            continue
        print(f"\n### {name.replace('_variants', '')}: ROSE's options at the selection level (no training; "
              f"composition of the picks)")
        print("| variant | budget | chosen / rejected / other | chosen of target picks [95% CI] | AUC chosen>rejected "
              "[95% CI] | own subtasks of the target picks |\n|---|---|---|---|---|---|")
        for variant, by_budget in res.items():
            if "refused" in by_budget:
                print(f"| {variant} | - | refused: {by_budget['refused'][:80]} | | | |")
                continue
            for budget, c in by_budget.items():
                print(f"| {variant} | {float(budget):.0%} | {c['chosen']:.2f} / {c['rejected']:.2f} / {c['other']:.2f} "
                      f"| {fmt_ci(c['chosen_of_target'], c['chosen_of_target_ci'], 2)} "
                      f"| {fmt_ci(c['auc_chosen_rejected'], c['auc_chosen_rejected_ci'], 2)} | {c['subtasks']} |")


def summary_line(results: dict, args) -> str:
    parts = [f"mode={'quick' if args.quick else 'full'}"]
    h = "test" if "test" in args.halves else args.halves[0]
    for name, res in results.items():
        if name.endswith("_variants"):
            continue
        for budget in args.budgets:
            for method in ("rose", "less", "random"):
                rows = res["methods"].get(method, {}).get(str(budget))
                if rows and h in rows[0]:
                    parts.append(f"{name}@{round(budget * 100)}%.{method}={np.mean([r[h]['accuracy'] for r in rows]):.3f}")
            rows = res["methods"].get("rose", {}).get(str(budget))
            if rows:
                parts.append(f"{name}@{round(budget * 100)}%.rose_chosen_share={rows[0]['composition']['chosen']:.2f}")
    return " ".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("outputs/smollm2/model"),
                   help="model folder (`rose-trl smollm2-assets OUT` writes OUT/model)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_real_model"))
    p.add_argument("--quick", action="store_true", help="a 48-row pool, default k, 20%% budget, 2 random seeds, one "
                                                        "warm-up checkpoint, 1 final epoch, no rds and full pool; bm25 "
                                                        "and dsir selected but not trained")
    p.add_argument("--targets", nargs="+", default=["se", "hh"], choices=["se", "hh"])
    p.add_argument("--ks", choices=["default", "larger", "both"], default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--train-methods", nargs="+", default=None,
                   help="methods whose selections are trained and evaluated (default: all of --methods; the others "
                        "report their pick composition only)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="random's seeds")
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--halves", nargs="+", choices=["dev", "test"], default=None)
    p.add_argument("--pool-target", type=int, default=None)
    p.add_argument("--pool-other", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--warmup-epochs", type=int, default=None, help="= checkpoints")
    p.add_argument("--final-epochs", type=int, default=None)
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument("--variants", choices=["rescoring", "all"], default=None,
                   help="also ROSE's options at the selection level: those that only re-score the stores, or all "
                        "(new validation gradients: beta, loss types, the larger k)")
    p.add_argument("--skip-methods", action="store_true", help="only the variants")
    p.add_argument("--progress", action="store_true", help="progress bars of the gradient passes")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.train_methods = args.train_methods or args.methods
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.time()
    bench = Bench(args)
    results = {}
    ks = {t: {"default": [SLICE_FILES[t][0]], "larger": [LARGER_K[t]], "both": [SLICE_FILES[t][0], LARGER_K[t]]}[args.ks]
          for t in args.targets}
    larger_k = [(f"shots per subtask k={LARGER_K[t]}", {"k": LARGER_K[t]}, "all") for t in args.targets]
    # Selections first (the cheapest evidence, before any training), then training and evaluation.
    stages = [("select", False), ("variants", VARIANTS), ("train", True)]
    if args.variants == "all":
        stages.append(("variants", GRADIENT_VARIANTS))
    for stage, what in stages:
        for i, target in enumerate(args.targets):
            if stage == "variants" and args.variants:
                extra = [larger_k[i]] if what is GRADIENT_VARIANTS else []
                run_variants(bench, target, SLICE_FILES[target][0], results, what + extra)
            elif stage != "variants" and not args.skip_methods:
                for k in ks[target]:
                    run_target(bench, target, k, results, train=what)
        log(f"stage {stage} done")
    write_json(args.out / f"results_{'quick' if args.quick else 'full'}_{'_'.join(args.targets)}.json", results)
    print(f"\nreal_model.py {'--quick' if args.quick else ''}: model {args.model}, max_length {args.max_length}, LoRA r "
          f"{args.lora_r}, lr {args.lr}, warm-up {args.warmup_fraction:g} x {args.warmup_epochs} epochs, final "
          f"{args.final_epochs} epochs; this invocation trained {bench.counts['trained']} adapters, evaluated "
          f"{bench.counts['evaluated']}, made {bench.counts['selected']} selections in {time.time() - t0:.0f}s")
    print_tables(results, args)
    print(summary_line(results, args))
    return results


if __name__ == "__main__":
    main()
