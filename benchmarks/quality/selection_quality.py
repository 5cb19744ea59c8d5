"""Selection quality of ROSE against LESS and the baselines, with a tiny model, on CPU.

    python benchmarks/quality/selection_quality.py [--seeds 0 1 2] [--out outputs/bench_quality]
        [--skip-real] [--skip-planted] [--methods rose less random bm25 dsir rds full] [--loss-types all]

(a) Planted signal (rose_trl.models.tiny): pool answers end with a phrase that is preferred or dispreferred
    for one of two subtasks, or with none; the preference pairs differ only in that phrase. Reported:
    the share of the selection carrying a preferred phrase and a dispreferred one. (a2) adds a
    distractor phrase to every preference answer, chosen and rejected alike, and to a sixth of the pool:
    it resembles the target's answers but carries no preference. With --loss-types, ROSE is also run
    with each of TRL's DPO loss types as the validation loss (docs/guides/method.md): overlap of its selection
    with the sigmoid one, the same shares, and how its per-pair gradients point against sigmoid's.
(b) The ROSE paper's released data (../shared/data/rose, or ROSE_DATA_DIR): the pool is the SFT view of
    the SHP, SE and HH test sets (prompt + best answer, one `source` per task); the target is one task's
    few-shot preference file (SHP 5-shot, SE 2-shot, HH 1-shot); held-out pairs come from that task's
    10-shot file minus the target's prompts (no overlap). Reported per target: the share of the
    selection drawn from the target task's rows, and the held-out preference accuracy (implicit reward
    log pi/ref, chosen > rejected, ties 1/2) after LoRA SFT on the selection.
Every number is a mean over seeds (+- std). The model is a tiny Llama trained from scratch here (no
Hub), so absolute accuracies stay near chance; the composition shows what each method targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import release_root  # noqa: E402

from rose_trl.baselines import BASELINES  # noqa: E402
from rose_trl.config import DPO_LOSS_TYPES, ROSEConfig  # noqa: E402
from rose_trl.data import load_preferences  # noqa: E402
from rose_trl.evaluation.metrics import PreferenceMetricsOptions, preference_metrics  # noqa: E402
from rose_trl.models.tiny import build_tiny_llama, build_tokenizer, make_planted_task  # noqa: E402
from rose_trl.run.offline import select_from_checkpoints  # noqa: E402
from rose_trl.run.pipeline import sft_training_dataset, warmup_indices  # noqa: E402
from rose_trl.run.selector import ROSESelector  # noqa: E402
from rose_trl.scoring.scores import top_fraction  # noqa: E402
from rose_trl.stores.store import GradientStore  # noqa: E402
from rose_trl.stores.validation import validation_loss_tag  # noqa: E402


LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
TARGETS = {"shp": 5, "se": 2, "hh": 1}
HELD_OUT_K = 10


def sft(model, tokenizer, rows: Dataset, out: Path, epochs: int, lr: float, max_length: int, save: bool):
    args = SFTConfig(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=lr,
        save_strategy="epoch" if save else "no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        max_length=max_length,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model,
        args=args,
        train_dataset=sft_training_dataset(rows, tokenizer, max_length, "bench"),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    return trainer.model


def gradient_selection(
    method, pool, validation, tokenizer, base_factory, warm_dir, out, fraction, max_length, folder=None, **options
):
    """rose/less from the shared warm-up's checkpoints; pool stores are shared through a symlink."""
    shared = warm_dir.parent / "rose_train"
    (out / "rose").mkdir(parents=True, exist_ok=True)
    if not (out / "rose" / "train").exists():
        shared.mkdir(exist_ok=True)
        os.symlink(shared.resolve(), out / "rose" / "train")
    config = ROSEConfig(selection_method=method, selection_fraction=fraction, projection_dim=2048, **options)
    selector = ROSESelector(
        pool, validation, tokenizer, config, out, max_length=max_length, use_cpu=True, progress=False
    )
    sel = select_from_checkpoints(warm_dir, base_factory(), selector, folder=folder or config.selection_folder)
    import pandas as pd

    return np.flatnonzero(pd.read_parquet(sel / "scores.parquet")["selected"].to_numpy())


def select(method, pool, validation, tokenizer, base_factory, warm_dir, out, fraction, max_length, seed):
    if method in ("rose", "less"):
        return gradient_selection(
            method, pool, validation, tokenizer, base_factory, warm_dir, out, fraction, max_length
        )
    if method == "full":
        return np.arange(len(pool))
    model = base_factory() if method == "rds" else None
    table = BASELINES[method](pool, validation, seed=seed, model=model, tokenizer=tokenizer if model else None)
    return top_fraction(table["score"], fraction)


def fmt(values) -> str:
    return f"{np.mean(values):.3f} +- {np.std(values):.3f}"


# (name, ROSEConfig options): every TRL loss type at its defaults (exo_pair needs a label smoothing: the EXO
# paper's 1e-3), IPO and hinge with a beta large enough for their margins (1/(2 beta) per token, 1/beta) to be
# crossed, and one combination.
def loss_targets(names: list[str]) -> list[tuple[str, dict]]:
    names = list(DPO_LOSS_TYPES) if names == ["all"] else names
    out = [
        (t, {"validation_loss_type": [t], "validation_label_smoothing": 1e-3 if t == "exo_pair" else 0.0})
        for t in names
    ]
    if names == list(DPO_LOSS_TYPES):
        out += [
            ("ipo, beta 10", {"validation_loss_type": ["ipo"], "validation_beta": 10.0}),
            ("hinge, beta 10", {"validation_loss_type": ["hinge"], "validation_beta": 10.0}),
            ("sigmoid + sft", {"validation_loss_type": ["sigmoid", "sft"]}),
        ]
    return out


def gradient_agreement(sigmoid_run: Path, run: Path, tag: str) -> tuple[float, float, int]:
    """(mean per-pair cosine with the sigmoid target's gradient, share of pairs pointing against it, pairs with
    a zero gradient), over the checkpoints. Sigmoid's per-pair direction does not depend on beta."""
    cosines, zeros = [], 0
    for ckpt in sorted(p.name for p in (sigmoid_run / "rose" / "val_dpo").iterdir()):
        ref = GradientStore.open(sigmoid_run / "rose" / "val_dpo" / ckpt).read_all().astype(np.float64)
        other = (
            GradientStore.open(run / "rose" / (f"val_dpo_{tag}" if tag else "val_dpo") / ckpt)
            .read_all()
            .astype(np.float64)
        )
        norms = np.linalg.norm(other, axis=1)
        zeros += int((norms == 0).sum())
        keep = norms > 0
        cosines += list((ref[keep] * other[keep]).sum(1) / (np.linalg.norm(ref[keep], axis=1) * norms[keep]))
    return float(np.mean(cosines)), float(np.mean(np.asarray(cosines) < 0)), zeros


def loss_type_selections(args, pool, validation, tokenizer, base, warm_dir, out, seed, features, results) -> None:
    """ROSE with each validation loss; betas other than 0.1 in their own output dir (beta is in rose/run.json)."""
    reference = None
    for name, options in [("sigmoid", {})] + [t for t in loss_targets(args.loss_types) if t[0] != "sigmoid"]:
        beta = options.get("validation_beta", 0.1)
        run = out / "rose_losses" / ("" if beta == 0.1 else f"beta{beta:g}")
        tag = validation_loss_tag(
            options.get("validation_loss_type", ["sigmoid"]), None, options.get("validation_label_smoothing", 0.0)
        )
        try:
            chosen = gradient_selection(
                "rose",
                pool,
                validation,
                tokenizer,
                base,
                warm_dir,
                run,
                0.05,
                256,
                folder=f"selection_{name.replace(' ', '').replace(',', '_')}",
                **options,
            )
        except ValueError as e:  # e.g. a subtask whose every pair has a zero gradient
            print(f"seed {seed} {name}: {e}", flush=True)
            results.setdefault(name, {}).setdefault("refused", []).append(seed)
            continue
        reference = chosen if name == "sigmoid" else reference
        r = results.setdefault(name, {})
        for key, value in zip(
            ("overlap", "good", "bad", "distractor"),
            (
                len(set(chosen) & set(reference)) / len(reference),
                float(np.mean([f.endswith("_good") for f in features[chosen]])),
                float(np.mean([f.endswith("_bad") for f in features[chosen]])),
                float(np.mean(features[chosen] == "distractor")),
            ),
            strict=True,
        ):
            r.setdefault(key, []).append(value)
        for key, value in zip(
            ("cos", "against", "zero"), gradient_agreement(out / "rose_losses", run, tag), strict=True
        ):
            r.setdefault(key, []).append(value)


def planted(args, distractor: bool) -> dict:
    results = {m: {"good": [], "bad": [], "distractor": []} for m in args.methods if m != "full"}
    losses = {}
    for seed in args.seeds:
        pool_rows, val_rows = make_planted_task(
            n_pool=480 if distractor else 400, pairs_per_subtask=4, seed=seed, distractor=distractor
        )
        pool, validation = Dataset.from_list(pool_rows), Dataset.from_list(val_rows)
        tokenizer = build_tokenizer(
            [r["prompt"] + r["completion"] for r in pool_rows]
            + [r["prompt"] + r["chosen"] + r["rejected"] for r in val_rows]
        )
        base = functools.partial(build_tiny_llama, tokenizer, hidden=64, layers=2, seed=seed)
        out = args.out / f"planted{'_distractor' if distractor else ''}_seed{seed}"
        warm_dir = out / "warmup"
        if not warm_dir.exists():
            sft(
                base(), tokenizer, pool.select(warmup_indices(len(pool), 0.1, seed)), warm_dir, 4, 1e-3, 256, save=True
            )
        features = np.array([r["feature"] for r in pool_rows])
        for method in results:
            chosen = select(method, pool, validation, tokenizer, base, warm_dir, out / method, 0.05, 256, seed)
            results[method]["good"].append(float(np.mean([f.endswith("_good") for f in features[chosen]])))
            results[method]["bad"].append(float(np.mean([f.endswith("_bad") for f in features[chosen]])))
            results[method]["distractor"].append(float(np.mean(features[chosen] == "distractor")))
        if args.loss_types:
            loss_type_selections(args, pool, validation, tokenizer, base, warm_dir, out, seed, features, losses)
    rates = "1/3, 1/3, 1/6" if distractor else "0.4, 0.4, 0"
    print(
        f"\n(a{'2' if distractor else '1'}) planted signal{' with a shared distractor' if distractor else ''}: "
        f"share of the 5% selection carrying a preferred / dispreferred / distractor phrase "
        f"(pool rates {rates}; seeds {args.seeds})"
    )
    print("| method | preferred | dispreferred | distractor |\n|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {fmt(r['good'])} | {fmt(r['bad'])} | {fmt(r['distractor'])} |")
    if losses:
        print(
            f"\n(a3{'b' if distractor else 'a'}) ROSE's validation loss on the planted task"
            f"{' with the distractor' if distractor else ''}: overlap with the sigmoid selection, shares of the "
            f"selection as above; per-pair validation gradients against sigmoid's: mean cosine, share pointing "
            f"against it, zero gradients (pairs x checkpoints, summed over seeds {args.seeds})"
        )
        print(
            "| validation loss | overlap with sigmoid | preferred | dispreferred | distractor | mean cos | against "
            "| zero |\n|---|---|---|---|---|---|---|---|"
        )
        for name, r in losses.items():
            refused = f" (refused for seeds {r['refused']}: a subtask without a usable pair)" if "refused" in r else ""
            if "overlap" not in r:
                print(f"| {name}{refused} | - | - | - | - | - | - | - |")
                continue
            print(
                f"| {name}{refused} | {fmt(r['overlap'])} | {fmt(r['good'])} | {fmt(r['bad'])} "
                f"| {fmt(r['distractor'])} "
                f"| {np.mean(r['cos']):.3f} | {np.mean(r['against']):.3f} | {sum(r['zero'])} |"
            )
        results["loss_types"] = losses
    return results


def real_pool(root: Path) -> Dataset:
    rows = []
    for task in TARGETS:
        for file in sorted((root / "test" / task).glob("*.json")):
            for r in json.loads(file.read_text()):
                if r["golden_answer"].strip():
                    rows.append(
                        {
                            "prompt": r["prompt"],
                            "completion": " " + r["golden_answer"].strip(),
                            "source": task,
                            "subtask": file.stem.split("_", 1)[1],
                        }
                    )
    return Dataset.from_list(rows)


def real(args) -> dict:
    root = release_root()
    if not root.is_dir():
        print(f"\n(b) skipped: the ROSE paper's released data is not at {root} (set ROSE_DATA_DIR)")
        return {}
    pool = real_pool(root)
    targets, held_out = {}, {}
    for task, k in TARGETS.items():
        targets[task] = load_preferences(
            str(root / "validation" / task / f"{task}_{k}_shot" / f"{task}_{k}_shot_preference.json")
        )
        ten = load_preferences(
            str(
                root / "validation" / task / f"{task}_{HELD_OUT_K}_shot" / f"{task}_{HELD_OUT_K}_shot_preference.json"
            ),
            drop_unusable=True,
        )
        seen = set(targets[task]["prompt"])
        held_out[task] = ten.select([i for i, prompt in enumerate(ten["prompt"]) if prompt not in seen])
    sources = np.array(pool["source"])
    results = {t: {m: {"share": [], "acc": []} for m in args.methods} for t in TARGETS}
    for seed in args.seeds:
        tokenizer = build_tokenizer((r["prompt"] + r["completion"] for r in pool), vocab_size=8000)
        base = functools.partial(build_tiny_llama, tokenizer, hidden=128, layers=2, seed=seed)
        out = args.out / f"real_seed{seed}"
        warm_dir = out / "warmup"
        if not warm_dir.exists():
            sft(
                base(),
                tokenizer,
                pool.select(warmup_indices(len(pool), 0.05, seed)),
                warm_dir,
                4,
                1e-3,
                args.max_length,
                save=True,
            )
        for task in TARGETS:
            for method in args.methods:
                t0 = time.time()
                chosen = select(
                    method,
                    pool,
                    targets[task],
                    tokenizer,
                    base,
                    warm_dir,
                    out / task / method,
                    0.05,
                    args.max_length,
                    seed,
                )
                share = float(np.mean(sources[chosen] == task))
                model = sft(
                    base(),
                    tokenizer,
                    pool.select(chosen.tolist()),
                    out / task / method / "final",
                    args.final_epochs,
                    1e-3,
                    args.max_length,
                    save=False,
                )
                acc = preference_metrics(
                    model, tokenizer, held_out[task], PreferenceMetricsOptions(max_length=args.max_length)
                )["accuracy"]
                results[task][method]["share"].append(share)
                results[task][method]["acc"].append(float(acc))
                print(
                    f"seed {seed} target {task} {method}: share {share:.3f} held-out acc {acc:.3f} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
    n_rows = {t: int((sources == t).sum()) for t in TARGETS}
    print(
        f"\n(b) released ROSE data: pool = {len(pool)} test-set answers {n_rows}; 5% selected; held-out pairs "
        f"{ {t: len(h) for t, h in held_out.items()} }; seeds {args.seeds}"
    )
    print("| target | method | share of selection from the target task | held-out preference accuracy |")
    print("|---|---|---|---|")
    for task in TARGETS:
        for method in args.methods:
            r = results[task][method]
            print(f"| {task} | {method} | {fmt(r['share'])} | {fmt(r['acc'])} |")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["rose", "less", "random", "bm25", "dsir", "rds", "full"])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_quality"))
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--final-epochs", type=int, default=2)
    p.add_argument("--skip-planted", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument(
        "--loss-types",
        nargs="*",
        default=[],
        help="on the planted task, also run ROSE with these validation loss types ('all': every TRL type)",
    )
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {}
    if not args.skip_planted:
        results["planted"] = planted(args, distractor=False)
        results["planted_distractor"] = planted(args, distractor=True)
    if not args.skip_real:
        results["real"] = real(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
