"""Does a ROSE selection make a real model better? SmolLM2-135M-Instruct, real text, held-out intervals.

    rose-trl smollm2-assets outputs/smollm2  # once: the model folder (model/)
    python benchmarks/quality/real_model.py --model outputs/smollm2/model --quick  # ~3 min on 2 cores
    # ~2 h: the dev study and the test grid
    python benchmarks/quality/real_model.py --model outputs/smollm2/model --variants gradient

For each target (SE, HH) `rose_trl.data.realtext.build_real_task` makes the task: a pool of target prompts
answered with their chosen or their rejected answer (a coin flip, recorded in `answer`) plus other-task rows,
the released k-shot preference file as the validation set, and held-out pairs (prompts in neither) split into
a dev and a test half. Every selection gets the same LoRA SFT; the base model (no training) is the reference
of every implicit reward. Methods: rose, less, random (over seeds), bm25, dsir, rds, full (the whole pool),
and two that read the answer column, target_chosen and target_rejected: the right and the wrong selection,
which show how far a selection can move the held-out numbers at all.
Reported per method and budget, on the test half:
- the selection itself: its share of target-chosen / target-rejected / other rows (random's expected shares
  are the pool's), and for scored methods the AUC of the score for target-chosen over target-rejected rows;
- held-out accuracy of the implicit reward (log pi/ref, chosen > rejected) and its mean margin (beta 0.1),
  each with a 95% bootstrap interval over pairs; random as mean +- std over its seeds; and the paired
  difference to random's mean on the same pairs, with its interval;
- the NLL of the held-out chosen answers (LESS's objective, for contrast).
rose and less share one warm-up (a checkpoint per epoch) and its pool gradient stores; every budget is scored
from the same stores. Before the test grid, `--variants` selects with ROSE's options (checkpoints, balance,
aggregation, k, beta, loss type, warm-up fraction, warm-up rank, projection dim), trains each selection and
evaluates it on the dev half against random's seeds there.

Every finished unit (warm-up, selection, trained adapter, evaluation) is a file or folder under --out keyed
by its settings and written atomically: a killed run continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import numpy as np
import torch
from common import key_of, log, read_json, write_json
from datasets import Dataset
from peft import LoraConfig, PeftModel
from real_model_report import composition, pool_shares, print_tables, summary_line
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rose_trl.baselines import BASELINES
from rose_trl.config import ROSEConfig
from rose_trl.data.realtext import SLICE_FILES, build_real_task
from rose_trl.evaluation.metrics import PreferenceMetricsOptions, pair_logps, summarize_pairs
from rose_trl.run.offline import select_from_checkpoints
from rose_trl.run.pipeline import last_complete_checkpoint, sft_training_dataset, warmup_indices
from rose_trl.run.selector import ROSESelector
from rose_trl.scoring.scores import selection_size, top_fraction


# Pool and held-out sizes per target: HH's slice has 276 prompts beyond its shipped few-shot files, SE's 585.
SIZES = {
    "se": dict(pool_target=240, pool_other=80, heldout=240),
    "hh": dict(pool_target=150, pool_other=80, heldout=126),
}
# The full grid: the paper's warm-up (5% of the pool, 4 epochs = 4 checkpoints), three budgets from the same
# stores, 5 random seeds, every method trained, the larger k for the methods that read the validation set.
FULL = dict(
    budgets=[0.05, 0.1, 0.2],
    seeds=[0, 1, 2, 3, 4],
    methods=["rose", "less", "random", "bm25", "dsir", "rds", "target_chosen", "target_rejected", "full"],
    train_methods=None,
    larger_k_methods=["rose", "less"],
    ks="both",
    warmup_fraction=0.05,
    warmup_epochs=4,
    final_epochs=2,
    variants="gradient",
    variant_budget=0.1,
)  # "all" adds the warm-up variants (~+50 min)
QUICK = dict(
    pool_target=36,
    pool_other=12,
    heldout=32,
    budgets=[0.2],
    seeds=[0, 1, 2],
    methods=["rose", "less", "random", "bm25", "dsir", "target_chosen"],
    train_methods=["rose", "less", "random", "target_chosen"],
    larger_k_methods=[],
    ks="default",
    warmup_fraction=0.1,
    warmup_epochs=1,
    final_epochs=1,
    variants="none",
    variant_budget=0.2,
)
LARGER_K = {"se": 5, "hh": 10}
# ROSE's options, each selected, trained at --variant-budget and evaluated on the dev half against random's
# seeds on the same pairs: (name, ROSEConfig options (k: shots per subtask), checkpoints, bench overrides).
# "rescoring" ones re-score the same stores; "gradient" ones need new validation gradients; "warmup" ones a
# new warm-up and new pool gradients.
VARIANTS = {
    "rescoring": [
        ("rose: default (sigmoid, beta 0.1, normalized_mean, max)", {}, "all", {}),
        ("less: default", {"method": "less"}, "all", {}),
        ("rose: last checkpoint only", {}, "last", {}),
        ("rose: first checkpoint only", {}, "first", {}),
        ("rose: subtask_balance round_robin", {"subtask_balance": "round_robin"}, "all", {}),
        ("rose: subtask_balance proportional", {"subtask_balance": "proportional"}, "all", {}),
        ("rose: validation_aggregation eq6", {"validation_aggregation": "eq6"}, "all", {}),
    ],
    "gradient": [
        ("rose: larger k", {"k": "larger"}, "all", {}),
        ("rose: validation beta 1.0", {"validation_beta": 1.0}, "all", {}),
        ("rose: loss ipo", {"validation_loss_type": ["ipo"]}, "all", {}),
        ("rose: loss sigmoid + sft", {"validation_loss_type": ["sigmoid", "sft"]}, "all", {}),
    ],
    "warmup": [
        ("rose: warm-up 20% of the pool", {}, "all", {"warmup_fraction": 0.2}),
        ("rose: warm-up LoRA r 32", {}, "all", {"warmup_lora_r": 32}),
        ("rose: projection dim 2048", {}, "all", {"projection_dim": 2048}),
    ],
}
VARIANT_BY_NAME = {v[0]: v for level in VARIANTS.values() for v in level}
VARIANT_LEVELS = {
    "none": [],
    "rescoring": ["rescoring"],
    "gradient": ["rescoring", "gradient"],
    "all": ["rescoring", "gradient", "warmup"],
}


SEEDED = ("random", "target_chosen", "target_rejected")


def task_sizes_and_key(target: str, args) -> tuple[dict, str]:
    """The task's pool / held-out sizes (args, else SIZES) and the key its files live under."""
    sizes = {n: getattr(args, n) or SIZES[target][n] for n in ("pool_target", "pool_other", "heldout")}
    return sizes, key_of(target, sizes["pool_target"], sizes["pool_other"], sizes["heldout"], args.task_seed)


def warmup_folder(out: Path, target: str, task_key: str, lora_r: int, fraction: float, epochs: int) -> Path:
    """Where one warm-up and its pool gradient stores live."""
    return out / f"{target}_{task_key}" / f"r{lora_r}_w{fraction:g}_e{epochs}"


def lora_settings(r: int) -> dict:
    return dict(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_key = key_of(sorted((p.name, p.stat().st_size) for p in Path(args.model).iterdir() if p.is_file()))
        self.lora = lora_settings(args.lora_r)  # the final SFT's; the warm-up's rank is args.warmup_lora_r
        self.train_settings = dict(
            model=self.model_key,
            lora=self.lora,
            lr=args.lr,
            epochs=args.final_epochs,
            batch=args.batch_size,
            max_length=args.max_length,
        )
        self.eval_options = PreferenceMetricsOptions(max_length=args.max_length, batch_size=8)
        self.counts = {"trained": 0, "evaluated": 0, "selected": 0}

    def with_args(self, **overrides) -> Bench:
        """The same bench (cache, tokenizer, counters, final SFT) with other warm-up/selection settings."""
        other = copy.copy(self)
        other.args = argparse.Namespace(**{**vars(self.args), **overrides})
        return other

    def base(self):
        return AutoModelForCausalLM.from_pretrained(self.args.model, dtype=torch.float32)

    def sft_args(self, out: Path, epochs: int, save: bool) -> SFTConfig:
        return SFTConfig(
            output_dir=str(out),
            num_train_epochs=epochs,
            per_device_train_batch_size=self.args.batch_size,
            learning_rate=self.args.lr,
            lr_scheduler_type="linear",
            save_strategy="epoch" if save else "no",
            logging_steps=1,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            max_length=self.args.max_length,
            disable_tqdm=True,
            seed=0,
        )

    def train(self, rows: Dataset, out: Path, epochs: int, save: bool, resume: bool = False, lora: dict | None = None):
        trainer = SFTTrainer(
            self.base(),
            args=self.sft_args(out, epochs, save),
            processing_class=self.tokenizer,
            train_dataset=sft_training_dataset(rows, self.tokenizer, self.args.max_length, "bench"),
            peft_config=LoraConfig(**(lora or self.lora)),
        )
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(out) if resume else None)
        return trainer

    # ---- per target ------------------------------------------------------------------------------
    def task(self, target: str, k: int):
        a = self.args
        sizes, task_key = task_sizes_and_key(target, a)
        return build_real_task(target, k=k, seed=a.task_seed, **sizes), task_key

    def target_dir(self, target: str, task_key: str) -> Path:
        """Where one warm-up and its pool gradient stores live."""
        a = self.args
        return warmup_folder(self.out, target, task_key, a.warmup_lora_r, a.warmup_fraction, a.warmup_epochs)

    def warmup(self, pool: Dataset, folder: Path) -> Path:
        """LoRA SFT on warmup_fraction of the pool, a checkpoint (with its Adam state) per epoch."""
        done = folder / "done.json"
        if not done.exists():
            log(f"warm-up: {folder}")
            t0 = time.time()
            rows = pool.select(warmup_indices(len(pool), self.args.warmup_fraction, 0))
            self.train(
                rows,
                folder,
                self.args.warmup_epochs,
                save=True,
                resume=True,
                lora=lora_settings(self.args.warmup_lora_r),
            )
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

    def gradient_selection(
        self,
        method: str,
        target_dir: Path,
        warm: Path,
        pool,
        validation,
        k: int,
        options: dict,
        checkpoints: str,
        budgets: list[float],
    ) -> dict[float, np.ndarray]:
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
        config = ROSEConfig(
            selection_method=method,
            selection_fraction=budgets[0],
            projection_dim=a.projection_dim,
            gradient_batch_size=8,
            **options,
        )
        selector = ROSESelector(
            pool, validation, self.tokenizer, config, out, max_length=a.max_length, use_cpu=True, progress=a.progress
        )
        tag = key_of(method, options)[:8]
        picks = {}
        for i, budget in enumerate(budgets):
            folder = f"selection_{method}_{tag}_{round(budget * 100)}"
            if i == 0:
                path = select_from_checkpoints(
                    self.checkpoint_dir(warm, checkpoints), self.base(), selector, folder=folder
                )
            else:  # the same stores, scored again at another budget
                selector.config = dataclasses.replace(config, selection_fraction=budget)
                path = selector.finalize(folder)
            picks[budget] = selected_from(path)
        return picks

    def select(
        self,
        method: str,
        seed: int,
        target: str,
        k: int,
        task,
        task_key: str,
        warm: Path | None,
        options: dict | None = None,
        checkpoints: str = "all",
        budgets: list[float] | None = None,
    ) -> dict[float, dict]:
        """{budget: {"picks": [...], "scores": [...] or None}}, cached per settings."""
        a = self.args
        options = options or {}
        budgets = budgets or a.budgets
        common = (method, target, k, task_key, self.model_key, a.max_length)
        grad = (
            (a.warmup_lora_r, a.warmup_fraction, a.warmup_epochs, a.lr, a.projection_dim, options, checkpoints)
            if method in ("rose", "less")
            else ()
        )
        paths = {
            b: self.out / "selections" / f"{method}_{target}_k{k}_{round(b * 100)}_s{seed}_"
            f"{key_of(common, grad, seed if method in SEEDED else 0, b)}.json"
            for b in budgets
        }
        if all(p.exists() for p in paths.values()):
            return {b: read_json(p) for b, p in paths.items()}
        t0 = time.time()
        pool, validation = task.pool, task.validation
        if method in ("rose", "less"):
            picks = self.gradient_selection(
                method, self.target_dir(target, task_key), warm, pool, validation, k, options, checkpoints, budgets
            )
        elif method == "full":
            picks = {b: (np.arange(len(pool)), None) for b in budgets}
        elif method in ("target_chosen", "target_rejected"):  # the right (or wrong) answer, known to the pool
            rows = np.flatnonzero(np.asarray(pool["answer"]) == method.split("_")[1])
            rows = np.random.default_rng(seed).permutation(rows)
            picks = {b: (rows[: selection_size(len(pool), b)], None) for b in budgets}
        else:
            model = self.base() if method == "rds" else None
            extra = {"max_length": a.max_length} if method == "rds" else {}
            table = BASELINES[method](pool, validation, seed=seed, model=model, tokenizer=self.tokenizer, **extra)
            picks = {b: (top_fraction(table["score"], b), np.asarray(table["score"])) for b in budgets}
        self.counts["selected"] += 1
        result = {}
        for b, (chosen, scores) in picks.items():
            result[b] = {"picks": [int(i) for i in chosen], "scores": None if scores is None else scores.tolist()}
            write_json(paths[b], result[b])
        log(
            f"selected {target} k={k} {method}{f' seed {seed}' if method in SEEDED else ''}"
            f"{' ' + json.dumps(options) if options else ''}{'' if checkpoints == 'all' else ' ckpt ' + checkpoints}"
            f" ({time.time() - t0:.0f}s)"
        )
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
        path = (
            self.out / "evals" / f"base_{target}_{task_key}_{half}_{key_of(self.model_key, self.args.max_length)}.npz"
        )
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
        path = self.out / "evals" / f"{name}_{half}_{key_of(task_key, self.args.max_length, 'per-pair')}.json"
        if path.exists():
            return read_json(path)
        reference, counts = self.reference(target, task_key, pairs, half)
        policy = reference
        if folder is not None:
            t0 = time.time()
            policy, _ = pair_logps(
                PeftModel.from_pretrained(self.base(), str(folder)), self.tokenizer, pairs, self.eval_options
            )
            self.counts["evaluated"] += 1
            log(f"evaluated {name} on {len(pairs)} {half} pairs ({time.time() - t0:.0f}s)")
        summary = summarize_pairs(policy, counts, reference, pairs, self.eval_options)
        summary.pop("per_subtask", None)
        n = len(pairs)
        summary["chosen_nll"] = float(-policy[:n].sum() / counts[:n].sum())  # = reference_nll of the chosen answers
        # Per pair, for paired comparisons on the same pairs: the win (ties 1/2) and the beta-scaled margin.
        raw = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
        opts = self.eval_options
        summary["wins"] = np.where(np.abs(raw) <= opts.tie_tolerance, 0.5, (raw > 0).astype(float)).tolist()
        summary["margins"] = (opts.beta * raw).tolist()
        write_json(path, summary)
        return read_json(path)  # as a cached run reads it


def selected_from(selection: Path) -> tuple[np.ndarray, np.ndarray]:
    """(picked pool indices, best first; every row's score) of a selection folder."""
    import pandas as pd

    frame = pd.read_parquet(selection / "scores.parquet", columns=["pool_index", "score", "selected"])
    scores = frame["score"].to_numpy()  # in pool order: pool_index is 0..n-1
    chosen = frame["pool_index"].to_numpy()[frame["selected"].to_numpy()]
    return chosen[np.argsort(-scores[chosen], kind="stable")], scores


def run_target(bench: Bench, target: str, k: int, results: dict, train: bool, methods: list[str]) -> None:
    """Every method's selection and its composition; with `train`, its adapter and test-half metrics too."""
    a = bench.args
    task, task_key = bench.task(target, k)
    pool = task.pool
    warm = (
        bench.warmup(pool, bench.target_dir(target, task_key) / "warmup") if {"rose", "less"} & set(methods) else None
    )
    name = f"{target}_k{k}"
    res = results[name] = {
        "pool": {"rows": len(pool), **pool_shares(pool)},
        "validation_pairs": len(task.validation),
        "methods": {},
    }
    halves = {"test": task.heldout.filter(lambda r: r["half"] == "test")} if train else {}
    res["heldout"] = {h: len(p) for h, p in halves.items()}
    for h, pairs in halves.items():
        res.setdefault("base", {})[h] = bench.evaluate(target, task_key, pairs, h, None)
    for method in methods + (a.test_variants if k == SLICE_FILES[target][0] else []):
        for seed in a.seeds if method == "random" else [0]:
            if method in VARIANT_BY_NAME:  # a variant chosen on dev, reported on test beside the default
                picks = select_variant(bench, target, VARIANT_BY_NAME[method], a.budgets)
            else:
                picks = bench.select(method, seed, target, k, task, task_key, warm)
            for budget in a.budgets:
                entry = picks[budget]
                row = {"composition": composition(pool, entry["picks"], entry["scores"])}
                res["methods"].setdefault(method, {}).setdefault(str(budget), []).append(row)
                if not train or method not in a.train_methods + a.test_variants:
                    continue  # its selection only
                folder = bench.adapter(target, task_key, pool, entry["picks"])
                for h, pairs in halves.items():
                    row[h] = bench.evaluate(target, task_key, pairs, h, folder)
                log(
                    f"{name} {method} {budget:.0%}{f' seed {seed}' if method == 'random' else ''}: picks "
                    + " / ".join(f"{x} {row['composition'][x]:.2f}" for x in ("chosen", "rejected", "other"))
                    + "; "
                    + "; ".join(f"{h} acc {row[h]['accuracy']:.3f}" for h in halves)
                )


def select_variant(bench: Bench, target: str, variant: tuple, budgets: list[float]) -> dict[float, dict]:
    """A variant's picks at `budgets` (the default k's pool; the variant's own k, options and warm-up)."""
    name, options, checkpoints, overrides = variant
    options = dict(options)
    method = options.pop("method", "rose")
    k = LARGER_K[target] if options.pop("k", None) == "larger" else SLICE_FILES[target][0]
    vbench = bench.with_args(**overrides)
    vtask, task_key = vbench.task(target, k)  # the same pool and held-out pairs; k changes the validation set
    warm = vbench.warmup(vtask.pool, vbench.target_dir(target, task_key) / "warmup")
    return vbench.select(method, 0, target, k, vtask, task_key, warm, options, checkpoints, budgets)


def run_variants(bench: Bench, target: str, results: dict, variants: list) -> None:
    """ROSE's options on the dev half: each variant's selection at --variant-budget, trained and evaluated on the
    same dev pairs as random's seeds (paired differences). The larger k and the warm-up settings select from
    their own stores; the others re-score the default warm-up's."""
    a = bench.args
    budget = a.variant_budget
    k_default = SLICE_FILES[target][0]
    task, task_key = bench.task(target, k_default)
    dev = task.heldout.filter(lambda r: r["half"] == "dev")
    out = results.setdefault(
        f"{target}_variants", {"budget": budget, "half": "dev", "pairs": len(dev), "random": [], "variants": {}}
    )
    base = bench.evaluate(target, task_key, dev, "dev", None)
    out["base"] = {k: v for k, v in base.items() if k not in ("wins", "margins")}
    if not out["random"]:
        for seed in a.seeds:
            picks = bench.select("random", seed, target, k_default, task, task_key, None, budgets=[budget])[budget]
            folder = bench.adapter(target, task_key, task.pool, picks["picks"])
            out["random"].append(
                {
                    "composition": composition(task.pool, picks["picks"], None),
                    "dev": bench.evaluate(target, task_key, dev, "dev", folder),
                }
            )
    for name, options, checkpoints, overrides in variants:
        if checkpoints != "all" and a.warmup_epochs < 2:
            continue  # one checkpoint: nothing to leave out
        if name in out["variants"]:
            continue
        t0 = time.time()
        try:
            picks = select_variant(bench, target, (name, options, checkpoints, overrides), [budget])[budget]
        except ValueError as e:  # e.g. every pair of a subtask with a zero gradient
            out["variants"][name] = {"refused": str(e)}
            continue
        folder = bench.adapter(target, task_key, task.pool, picks["picks"])
        row = out["variants"][name] = {
            "composition": composition(task.pool, picks["picks"], picks["scores"]),
            "dev": bench.evaluate(target, task_key, dev, "dev", folder),
        }
        log(f"variant {target} {name}: dev acc {row['dev']['accuracy']:.3f} ({time.time() - t0:.0f}s)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        type=Path,
        default=Path("outputs/smollm2/model"),
        help="model folder (`rose-trl smollm2-assets OUT` writes OUT/model)",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/bench_real_model"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 48-row pool, default k, a 20%% budget, 3 random seeds, "
        "one warm-up checkpoint, 1 final epoch, no variants; bm25 and "
        "dsir selected but not trained",
    )
    p.add_argument("--targets", nargs="+", default=["se", "hh"], choices=["se", "hh"])
    p.add_argument(
        "--ks",
        choices=["default", "larger", "both"],
        default=None,
        help="the released file(s) used as the validation set: the paper's k, a larger one, or both",
    )
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument(
        "--train-methods",
        nargs="+",
        default=None,
        help="methods whose selections are trained and evaluated (default: all of --methods; the others "
        "report their pick composition only)",
    )
    p.add_argument("--larger-k-methods", nargs="+", default=None, help="methods run again with the larger k")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="random's seeds")
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--pool-target", type=int, default=None, help=f"default per target: {SIZES}")
    p.add_argument("--pool-other", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None, help="held-out pairs, half dev and half test")
    p.add_argument("--task-seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8, help="the final SFT's LoRA rank (and the warm-up's by default)")
    p.add_argument("--warmup-lora-r", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-fraction", type=float, default=None)
    p.add_argument("--warmup-epochs", type=int, default=None, help="= checkpoints")
    p.add_argument("--final-epochs", type=int, default=None)
    p.add_argument("--projection-dim", type=int, default=8192)
    p.add_argument(
        "--variants",
        choices=list(VARIANT_LEVELS),
        default=None,
        help="ROSE's options studied on the dev half: none, those that re-score the stores, + those that "
        "need new validation gradients (beta, loss types, the larger k), or all (+ new warm-ups)",
    )
    p.add_argument("--variant-budget", type=float, default=None)
    p.add_argument(
        "--test-variants",
        nargs="+",
        default=[],
        choices=list(VARIANT_BY_NAME),
        metavar="VARIANT",
        help="variants chosen on dev, also run through the test grid (their full names, as the dev table prints them)",
    )
    p.add_argument("--skip-methods", action="store_true", help="only the variants")
    p.add_argument("--progress", action="store_true", help="progress bars of the gradient passes")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.train_methods = args.train_methods or args.methods
    args.warmup_lora_r = args.warmup_lora_r or args.lora_r
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    t0 = time.time()
    bench = Bench(args)
    results = {}
    variants = [v for level in VARIANT_LEVELS[args.variants] for v in VARIANTS[level]]
    # Per target: every selection first (the cheapest evidence), then the dev-half study of ROSE's options, then
    # the test-half grid, so that settings are chosen on dev before anything is read off test.
    for target in args.targets:
        ks = {
            "default": [SLICE_FILES[target][0]],
            "larger": [LARGER_K[target]],
            "both": [SLICE_FILES[target][0], LARGER_K[target]],
        }[args.ks]
        plan = [
            (k, args.methods if i == 0 and args.ks != "larger" else args.larger_k_methods) for i, k in enumerate(ks)
        ]
        for train in (False, True):
            if train and variants:
                run_variants(bench, target, results, variants)
                log(f"{target}: dev study done")
            for k, methods in plan:
                if methods and not args.skip_methods:
                    run_target(bench, target, k, results, train=train, methods=methods)
            log(f"{target}: {'test grid' if train else 'selections'} done")
    write_json(args.out / f"results_{'quick' if args.quick else 'full'}_{'_'.join(args.targets)}.json", results)
    print(
        f"\nreal_model.py {'--quick' if args.quick else ''}: model {args.model}, max_length {args.max_length}, LoRA r "
        f"{args.lora_r}, lr {args.lr}, warm-up {args.warmup_fraction:g} x {args.warmup_epochs} epochs, final "
        f"{args.final_epochs} epochs; this invocation trained {bench.counts['trained']} adapters, evaluated "
        f"{bench.counts['evaluated']}, made {bench.counts['selected']} selections in {time.time() - t0:.0f}s"
    )
    print_tables(results, args)
    print(summary_line(results, args))
    return results


if __name__ == "__main__":
    main()
