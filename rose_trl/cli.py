"""`rose-trl` command line: one argparse subcommand per module that registers itself here."""

from __future__ import annotations

import argparse

from .report import add_report_parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rose-trl", description="ROSE instruction-data selection for TRL")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_report_parser(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
