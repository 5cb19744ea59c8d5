"""The command lines of `rose-trl plan` and `rose-trl check-pairs`: the recipe's own options (recipes/rose_sft.py's
parser) under each command's few, and the plan printed for a person (`format_plan`) or as JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from rose_trl.data.sft import BadRecordError
from rose_trl.resources.disk import human


RECIPE_OPTIONS = (
    "Every option of recipes/rose_sft.py (ROSEConfig, SFTConfig, ModelConfig: --output_dir X, --final_training false, "
    "--memory_budget_gb 4, ...) may follow, over the --config file's values, as in the recipe; --recipe-help "
    "lists them."
)
LOSS_OPEN, LOSS_CLOSE = "[[", "]]"
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"


@contextlib.contextmanager
def quiet_stdout():
    """What libraries print while the work runs (DeepSpeed's accelerator line, TRL's notices) goes to stderr: stdout
    holds the command's output alone (one JSON object with --json)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def parse_recipe(config: str, options: list[str]):
    """(ROSEConfig, SFTConfig, ModelConfig) from a recipe YAML and the recipe's own command-line options on top:
    recipes/rose_sft.py's parser (`pipeline.recipe_parser`)."""
    from rose_trl.run.pipeline import recipe_parser

    return recipe_parser().parse_args_and_config(args=["--config", config, *options])


def marked(segments: list[dict], color: bool) -> str:
    """A row's text with the tokens that carry the loss marked: inside [[ ]] (and bold on a terminal), the others
    dim on a terminal."""
    out = []
    for s in segments:
        if s["loss"]:
            out.append(f"{BOLD}{s['text']}{RESET}" if color else f"{LOSS_OPEN}{s['text']}{LOSS_CLOSE}")
        else:
            out.append(f"{DIM}{s['text']}{RESET}" if color else s["text"])
    return "".join(out)


def _indented(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def format_plan(plan: dict, color: bool = False) -> str:
    """The plan for a person (the same figures as --json)."""
    r, pool, val = plan["recipe"], plan["pool"], plan["validation"]
    lines = [
        f"plan of {r['selection_method']} on {r['model']} -> {r['output_dir']} ({r['processes']} process"
        f"{'es' if r['processes'] > 1 else ''}; nothing was written)",
        f"pool: {pool['rows']:,} rows, {pool['tokens']:,} tokens ({pool['loss_tokens']:,} carry the loss; longest "
        f"{pool['longest']}, mean {pool['mean']:.1f}, max_length {r['max_length']})",
        f"validation: {val['pairs']} pairs in {len(val['subtasks'])} subtask(s) "
        f"({', '.join(f'{k} {v}' for k, v in val['subtasks'].items())})"
        + (f"; longest row {val['longest']} tokens" if val["longest"] else ""),
    ]
    w = plan["warmup"]
    if w:
        lines.append(
            f"warm-up: {w['rows']} rows, {w['epochs']} epoch(s) x {w['steps_per_epoch']} optimizer steps = "
            f"{w['optimizer_steps']} steps (batch {w['per_device_batch']} x {w['gradient_accumulation_steps']} "
            f"accumulation x {w['processes']} process(es) = {w['effective_batch']} rows a step); "
            f"{len(w['checkpoints'])} checkpoint(s): {', '.join(w['checkpoints'])}"
        )
    g = plan["gradient_passes"]
    if g:
        p, v = g["pool"], g["validation"]
        tokens = f" / {p['tokens_a_pass']} tokens" if p["tokens_a_pass"] else ""
        lines += [
            f"gradient passes per checkpoint ({g['checkpoints']} checkpoints):",
            f"  pool: {p['passes']} passes of up to {p['rows_a_pass']} rows{tokens} ({p['padded_tokens']:,} padded "
            f"tokens; set by {p['set_by']}), estimated peak {_gb(p['estimated_peak'])}",
            f"  validation ({v['loss']}): {v['passes']} passes of up to {v['pairs_a_pass']} pair(s), estimated peak "
            f"{_gb(v['estimated_peak'])}",
        ]
    s, c, f = plan["store_bytes"], plan["warmup_checkpoint_bytes"], plan["final_model_bytes"]
    stores = (
        f"{human(s['total'])} ({s['checkpoints']} x ({human(s['pool_per_checkpoint'])} pool + "
        f"{human(s['validation_per_checkpoint'])} validation))"
        if s["checkpoints"]
        else f"none ({r['selection_method']} selects without gradients)"
    )
    lines += [
        "disk:",
        f"  store_bytes: {stores}",
        f"  warmup_checkpoint_bytes: {human(c['total'])} ({len(c['per_checkpoint'])} checkpoint(s): adapter, AdamW "
        "state, trainer files, tokenizer)",
        f"  final_model_bytes: {human(f['total'])}"
        + (
            f" (model {human(f['model'])}, its training's checkpoints {human(f['checkpoints'])})"
            if "model" in f
            else ""
        ),
        f"  selection_bytes: about {human(plan['selection_bytes'])}; total {human(plan['total_bytes'])}",
    ]
    for name, d in plan["disk"]["destinations"].items():
        lines.append(
            f"  {name}: {d['path']} (its filesystem at {d['nearest_existing']}): needs {human(d['needed'])}, "
            f"{human(d['free'])} free"
        )
    ft = plan["final_training"]
    if ft:
        lines.append(
            f"final training: {ft['rows']} rows, {ft['optimizer_steps']} optimizer steps, "
            f"{len(ft['checkpoints'])} checkpoint(s), into {ft['output_dir']}"
        )
    m = plan["memory"]
    if m:
        lines.append(f"memory ({m['device']}; budget {_gb(m['budget'])}: {m['budget_source']}), estimated peaks:")
        lines += [f"  {kind}: {_gb(peak)}" for kind, peak in m["peaks"].items()]
    t = plan["time"]
    if t:
        lines.append(f"time on this machine (measured passes, {t['device']}): total {t['total']:.0f} s")
        lines += [f"  {stage}: {seconds:.1f} s" for stage, seconds in t["stages"].items()]
        lines += [f"  measured: {what}" for what in t["measured"]]
    ex = plan["examples"]
    legend = "bold" if color else f"inside {LOSS_OPEN} {LOSS_CLOSE}"
    row = ex["pool_row"]
    lines += [
        f"first pool row as the model sees it ({row['tokens']} tokens; the {row['loss_tokens']} that carry the loss "
        f"{legend}):",
        _indented(marked(row["segments"], color)),
    ]
    pair = ex["preference_pair"]
    for side in ("chosen", "rejected"):
        if side in pair:
            x = pair[side]
            lines += [
                f"first preference pair, {side} (subtask {pair['subtask']!r}, {pair['loss']} loss; {x['tokens']} "
                f"tokens, {x['loss_tokens']} carry the loss):",
                _indented(marked(x["segments"], color)),
            ]
    lines += [f"note: {n}" for n in plan["notes"]]
    return "\n".join(lines)


def _plan_command(args) -> int:
    from rose_trl.run.plan import make_plan

    if args.recipe_help:
        from rose_trl.run.pipeline import recipe_parser

        recipe_parser().print_help()
        return 0
    if not args.config:
        print("rose-trl plan: error: --config <recipe.yaml> is required", file=sys.stderr)
        return 2
    import datasets

    datasets.disable_progress_bars()  # the plan is the output
    try:
        with quiet_stdout():
            plan = make_plan(
                *parse_recipe(args.config, args.recipe_args), processes=args.processes, measure=args.measure
            )
    except (ValueError, FileNotFoundError, BadRecordError) as e:
        print(f"rose-trl plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    else:
        print(format_plan(plan, color=sys.stdout.isatty()))
    return 0


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="a run's plan before any work: rows, tokens, steps, checkpoints, gradient passes, disk, memory (and "
        "time with --measure); writes nothing",
        description="The plan of recipes/rose_sft.py with these options, before any work: the pool's rows and "
        "tokens, the warm-up's rows, optimizer steps and checkpoints, the gradient passes per checkpoint, the "
        "bytes of the gradient stores, of the warm-up checkpoints and of the final model, the free disk where each "
        "goes, the estimated peak memory of each kind of pass, and the first pool row and preference pair as the "
        "model sees them, with the tokens that carry the loss marked. Nothing is written under output_dir.",
        epilog=RECIPE_OPTIONS,
        allow_abbrev=False,
    )
    p.add_argument("--config", help="the recipe's YAML file (as recipes/rose_sft.py --config)")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys: rose_trl.run.plan.PLAN_KEYS)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="time a few real passes on this machine (a warm-up step, a pool gradient pass, a validation pass) and "
        "give each stage's wall time (loads the weights; writes only into a temporary folder)",
    )
    p.add_argument("--processes", type=int, default=1, help="processes the run will be launched with (default 1)")
    p.add_argument("--recipe-help", action="store_true", help="list the recipe's options and exit")
    p.set_defaults(func=_plan_command, recipe_options=True)


def recipe_arguments(parser: argparse.ArgumentParser, argv: list[str] | None):
    """`parser.parse_known_args`, the unknown options kept for the subcommands that take the recipe's options
    (`recipe_args`), refused for the others (argparse's one-line error)."""
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "recipe_options", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.recipe_args = rest
    return args
