"""`rose-trl check-pairs`: do the validation pairs agree, before any warm-up?

    rose-trl check-pairs --config recipes/smollm2-135m/rose/config_se.yaml [--json] [recipe options...]

A run learns how much each subtask's pairs agree (agreement.py: their gradients' mean cosine, the reliability of
their mean, the pairs a subtask would need) only after the warm-up and every pool gradient pass. Here the same
report is made before any training, from the pairs' gradients at the base model with a freshly initialized LoRA
adapter (the run's own LoRA settings, seeded with the run's seed): the run's validation path
(`ValidationGradients.compute`: TRL's DPO loss through `ROSEDPOTrainer`, or LESS's SFT rows), the run's projection,
the run's `validation_agreement` and `across_subtasks`. Nothing is trained and nothing is written under output_dir.

Why that model: PEFT starts LoRA's B at zero, so the adapter's gradient is all in B, and B's gradient is the base
weight's gradient times the random A (dL/dB = dL/dW A^T): a random projection of the base model's own gradient,
which keeps its cosines. After a short warm-up B is still small and A near its start, so the gradient the run
measures is mostly the same projection at slightly moved weights. docs/results/preflight.md
measures how well it predicts the after-warm-up agreement and flags, against other
candidates (`CANNOT_TELL` says what it cannot see).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rose_trl.config import ROSEConfig
from rose_trl.data import load_preferences
from rose_trl.gradients.capture import num_trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.projection import build_projector
from rose_trl.resources.budget import plan_run
from rose_trl.run.selector import with_subtasks
from rose_trl.scoring.agreement import across_subtasks, agreement_warnings, validation_agreement
from rose_trl.scoring.scores import zero_gradient_pairs
from rose_trl.stores.validation import ValidationGradients


CANNOT_TELL = (
    "how the warm-up moves the weights: after it the agreement is measured at the trained adapter, and can differ "
    "(how much, measured: docs/results/preflight.md)",
    "the Adam preconditioning of the pool gradients (the warm-up's optimizer state does not exist yet): it changes "
    "the scores, not the agreement of the pairs",
    "whether the model can learn the preference the pairs express, and which pool rows will be selected",
)


def pair_vectors(
    model,
    validation,
    tokenizer,
    rose: ROSEConfig,
    max_length: int | None,
    use_cpu: bool = True,
    kept: dict | None = None,
):
    """[n_pairs, dim] float32 features of the pairs' gradients at `model` (a PEFT model, or any model with trainable
    linear weights) by the run's own validation path and projection; the passes sized by the run's memory plan. The
    DPO trainer works in a temporary folder. `kept`: a dict that keeps the reference's log-probs of the pairs (the
    base model's, the same for every adapter) from one call to the next, as a run keeps them between checkpoints."""
    device = next(p for p in model.parameters() if p.requires_grad).device
    projector = build_projector(
        rose.projection_type, num_trainable_parameters(model), rose.projection_dim, rose.projection_seed, device=device
    )
    featurizer = Featurizer(projector)
    with tempfile.TemporaryDirectory(prefix="rose-check-pairs-") as tmp:
        grads = ValidationGradients(validation, tokenizer, rose, Path(tmp), "", max_length, use_cpu)
        if grads.kind == "dpo":
            plan = plan_run(model, rose, featurizer.fused, 1, grads.longest(), 1)
            grads.pairs_per_pass = plan.passes["validation"].rows
            grads.head_tokens = plan.passes["validation"].head_tokens
        if kept is not None:
            grads.reference = kept.get("reference")
        vectors = grads.compute(model, featurizer).float().cpu().numpy()
        if kept is not None:
            kept["reference"] = grads.reference
        return vectors


def agreement_report(vectors: list[np.ndarray], learning_rates: list[float], subtasks: list[str]) -> dict:
    """The run's agreement report (summary.json's entries) of per-checkpoint pair vectors: pairs whose gradient is
    zero anywhere are left out, as the run leaves them out."""
    usable = np.ones(len(subtasks), dtype=bool)
    for v in vectors:
        usable[zero_gradient_pairs(v)] = False
    report = validation_agreement(vectors, learning_rates, subtasks, usable)
    across = across_subtasks(vectors, learning_rates, subtasks, usable)
    return {
        "validation_agreement": report,
        "validation_agreement_across": across,
        "agreement_warnings": agreement_warnings(report, across),
        "left_out_pairs": np.flatnonzero(~usable).tolist(),
    }


def fresh_lora_model(model_args, sft, gguf_file: str | None = None):
    """The run's base model (its dtype, its chat template) with a fresh LoRA adapter of the run's settings, seeded
    with the run's seed: what the warm-up starts from. -> (model, tokenizer)."""
    from peft import get_peft_model
    from trl import get_peft_config

    from rose_trl.models.final_model import apply_chat_template_path
    from rose_trl.models.source import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_args, sft.trust_remote_code, gguf_file)
    model, tokenizer, _ = apply_chat_template_path(model, tokenizer, sft.chat_template_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(sft.seed)
    return get_peft_model(model, get_peft_config(model_args)), tokenizer


def check_pairs(rose: ROSEConfig, sft, model_args) -> dict:
    """The agreement report of the run's validation pairs before any warm-up (module docstring)."""
    if not model_args.use_peft:
        raise ValueError("ROSE extracts LoRA gradients: set use_peft: true (and lora_r, lora_target_modules)")
    validation = with_subtasks(
        load_preferences(rose.validation_dataset, split=rose.validation_split, k=rose.validation_k, seed=sft.seed)
    )
    model, tokenizer = fresh_lora_model(model_args, sft, rose.gguf_file)
    vectors = pair_vectors(model, validation, tokenizer, rose, sft.max_length, use_cpu=bool(sft.use_cpu))
    subtasks = list(validation["subtask"])
    return {
        "model": f"{model_args.model_name_or_path} with a fresh LoRA adapter (r={model_args.lora_r}, seed {sft.seed})",
        "loss": "dpo" if rose.selection_method == "rose" else "sft",
        "pairs": len(validation),
        **agreement_report([vectors], [1.0], subtasks),
        "cannot_tell": list(CANNOT_TELL),
    }


def format_check(result: dict) -> str:
    report, across = result["validation_agreement"], result["validation_agreement_across"]
    lines = [
        f"validation pairs before any warm-up: {result['pairs']} pairs, {result['loss']} gradients at "
        f"{result['model']}",
        f"  {'subtask':<24} {'pairs':>5} {'agreement':>10} {'reliability':>11} {'pairs needed':>12}  agrees",
    ]
    for name, s in report.items():
        a = "-" if s["agreement"] is None else f"{s['agreement']:+.3f}"
        r = "-" if s["reliability"] is None else f"{s['reliability']:.2f}"
        need = "-" if s["pairs_needed"] is None else str(s["pairs_needed"])
        flag = {True: "yes", False: "no", None: "one pair"}[s["agrees"]]
        lines.append(f"  {name:<24} {s['pairs']:>5} {a:>10} {r:>11} {need:>12}  {flag}")
    m = across["merged"]
    if across["subtasks"] > 1:
        between = "-" if across["between"] is None else f"{across['between']:+.3f}"
        merged = "-" if m["agreement"] is None else f"{m['agreement']:+.3f}, reliability {m['reliability']:.2f}"
        lines.append(
            f"  across subtasks: pairs of different subtasks agree at {between}; all as one subtask: {merged}"
        )
    lines += [f"warning: {w}" for w in result["agreement_warnings"]]
    if result["left_out_pairs"]:
        lines.append(f"note: pairs {result['left_out_pairs']} have a zero gradient and are left out")
    lines += [f"cannot tell: {c}" for c in result["cannot_tell"]]
    return "\n".join(lines)


def _check_pairs_command(args) -> int:
    from rose_trl.data.sft import BadRecordError
    from rose_trl.run.plan_cli import parse_recipe, quiet_stdout

    if args.recipe_help:
        from rose_trl.run.pipeline import recipe_parser

        recipe_parser().print_help()
        return 0
    if not args.config:
        print("rose-trl check-pairs: error: --config <recipe.yaml> is required", file=sys.stderr)
        return 2
    import datasets

    datasets.disable_progress_bars()
    try:
        with quiet_stdout():
            result = check_pairs(*parse_recipe(args.config, args.recipe_args))
    except (ValueError, FileNotFoundError, BadRecordError) as e:
        print(f"rose-trl check-pairs: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else format_check(result))
    return 0


def add_check_pairs_parser(subparsers) -> None:
    from rose_trl.run.plan_cli import RECIPE_OPTIONS

    p = subparsers.add_parser(
        "check-pairs",
        help="each subtask's agreement and reliability of its validation pairs before any warm-up (the base model "
        "with a fresh LoRA adapter)",
        description="The agreement report a run gives after its warm-up (per subtask: the mean cosine of its pairs' "
        "gradients, the reliability of their mean, the pairs it would need, whether it reaches the threshold; "
        "across subtasks; the warnings), made before any training from the pairs' gradients at the base model with "
        "a fresh LoRA adapter of the recipe's settings. Loads the model; trains nothing; writes nothing under "
        "output_dir.",
        epilog=RECIPE_OPTIONS,
        allow_abbrev=False,
    )
    p.add_argument("--config", help="the recipe's YAML file (as recipes/rose_sft.py --config)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--recipe-help", action="store_true", help="list the recipe's options and exit")
    p.set_defaults(func=_check_pairs_command, recipe_options=True)
