"""`rose-trl` command line. Each subcommand lives with its code and registers itself here
through an `add_<name>_parser(subparsers)` function that sets `func` to its handler."""

from __future__ import annotations

import argparse
import logging
import sys

from rose_trl.hub import add_push_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rose-trl", description="ROSE data selection for TRL.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_push_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
