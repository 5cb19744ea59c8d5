"""`rose-trl` command line: small utilities around runs (the pipeline itself is recipes/rose_sft.py)."""

from __future__ import annotations

import argparse


def _tiny_assets(args) -> None:
    from .tiny import write_tiny_assets

    out = write_tiny_assets(args.out_dir, n_pool=args.pool_size, seed=args.seed)
    print(f"wrote {out}/model, {out}/pool.jsonl, {out}/validation.jsonl")


def add_tiny_assets_parser(subparsers) -> None:
    p = subparsers.add_parser("tiny-assets", help="write the offline tiny model, pool and preference set")
    p.add_argument("out_dir")
    p.add_argument("--pool-size", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_assets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rose-trl", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_tiny_assets_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
