"""The reference pages written from the code, so that they cannot drift from it.

    python -m rose_trl.reference            # writes docs/reference/options.md and docs/reference/cli.md
    python -m rose_trl.reference --check    # exit code 1, naming the pages, when they differ from the code

docs/reference/options.md: every `ROSEConfig` and `SelectConfig` option (rose_trl/config.py) with its type, default
and help, in the groups the dataclass's `# Parameters that control ...` comments open. docs/reference/cli.md: every
`rose-trl` subcommand with its arguments, from the parser itself (rose_trl/cli.py). tests/test_reference_docs.py
writes both again and compares them with the committed pages.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PAGES = {"options": Path("docs/reference/options.md"), "cli": Path("docs/reference/cli.md")}
COMMAND = "python -m rose_trl.reference"
GENERATED = (
    "<!-- Written by `{command}` from {source}: edit the code, then run the command again "
    "(tests/test_reference_docs.py fails while this page and the code differ). -->"
)
TRL_DOCS = "https://huggingface.co/docs/trl"


def _cell(text: str) -> str:
    """Text for a markdown table cell: one line, pipes escaped (inside code spans too, as GitHub needs), and `<`
    outside code spans written `&lt;` (`checkpoint-<step>/` would otherwise be read as an HTML tag)."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _default(value) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return f"`{value!r}`"


def _option_table(cls, options: list[Field]) -> list[str]:
    from rose_trl.config import option_default, option_help, option_type

    lines = ["| option | type | default | description |", "|---|---|---|---|"]
    for f in options:
        kind = _cell(f"`{option_type(cls, f)}`")
        lines.append(f"| `{f.name}` | {kind} | {_cell(_default(option_default(f)))} | {_cell(option_help(f))} |")
    return lines


def _short_title(title: str) -> str:
    """`Parameters that control the data` -> `The data`."""
    rest = title.removeprefix("Parameters that control ")
    return rest[:1].upper() + rest[1:] if rest != title else title


def _anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces as hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def options_markdown() -> str:
    """docs/reference/options.md: ROSEConfig's and SelectConfig's options, grouped as the dataclasses group them."""
    from rose_trl.config import ROSEConfig, SelectConfig, option_sections

    sections = [(_short_title(t), fields) for t, fields in option_sections(ROSEConfig)]
    lines = [
        GENERATED.format(command=COMMAND, source="rose_trl/config.py"),
        "",
        "# Options",
        "",
        "ROSE's own options are the fields of two dataclasses in `rose_trl/config.py`. `ROSEConfig` is read by the",
        "recipe (`recipes/rose_sft.py`), the drop-in callback (`ROSECallback(..., config=ROSEConfig(...))`) and the",
        "offline selection; `SelectConfig` adds what `recipes/rose_select.py` needs to find a finished warm-up.",
        "Set an option in a recipe's YAML file (`selection_fraction: 0.1`), on the recipe's command line",
        "(`--selection_fraction 0.1`, after `--config`), or in Python (`ROSEConfig(selection_fraction=0.1)`).",
        "",
        "The training options of the warm-up and of the final model (learning rate, epochs, batch size,",
        "`max_length`, LoRA, dtype, `output_dir`) are TRL's own `SFTConfig` and `ModelConfig`",
        f"([TRL's reference]({TRL_DOCS})), read from the same YAML file.",
        "",
        "## `ROSEConfig`",
        "",
        *[f"- [{title}](#{_anchor(title)})" for title, _ in sections],
    ]
    for title, fields in sections:
        lines += ["", f"### {title}", "", *_option_table(ROSEConfig, fields)]
    lines += [
        "",
        "## `SelectConfig`",
        "",
        "The offline selection's own options (`recipes/rose_select.py`, next to `ROSEConfig` and TRL's",
        "`ModelConfig`).",
        "",
    ]
    for _, fields in option_sections(SelectConfig):
        lines += _option_table(SelectConfig, fields)
    return "\n".join(lines) + "\n"


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    """The parser's own help formatter at a fixed width: the page does not depend on the terminal it is written
    from."""
    return parser.formatter_class(prog=parser.prog, width=100)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = _formatter(parser)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = _formatter(parser)
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
        else:
            name = formatter._format_args(action, formatter._get_default_metavar_for_positional(action))
        help_text = formatter._expand_help(action) if action.help else ""  # choices: in the name, as {a,b}
        shown = action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS))
        default = _cell(_default(action.default)) if shown else ""
        rows.append(f"| {_cell(f'`{name}`')} | {default} | {_cell(help_text)} |")
    return rows


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order `rose-trl --help` lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """docs/reference/cli.md: every `rose-trl` subcommand, its usage and its arguments, from the parser."""
    if parser is None:
        from rose_trl.cli import build_parser

        parser = build_parser()
    commands = _subcommands(parser)
    lines = [
        GENERATED.format(command=COMMAND, source="rose_trl/cli.py's parser"),
        "",
        "# Command line",
        "",
        "`pip install` puts one command on the path, `rose-trl`, with a subcommand for each job below;",
        "`rose-trl <command> --help` prints the same.",
        "",
        "The pipeline itself is a recipe script, launched with `accelerate launch`: `recipes/rose_sft.py` (warm-up,",
        "selection, final training) and `recipes/rose_select.py` (the selection alone, from a finished warm-up's",
        "checkpoints). Their options are TRL's `SFTConfig` and `ModelConfig` and ROSE's own, listed in",
        "[options.md](options.md); `python recipes/rose_sft.py --help` prints them all.",
        "",
        "| command | what it does |",
        "|---|---|",
        *[f"| [`{name}`](#rose-trl-{_anchor(name)}) | {_cell(help_text)} |" for name, help_text, _ in commands],
    ]
    for name, help_text, sub in commands:
        lines += ["", f"## rose-trl {name}", ""]
        if help_text or sub.description:
            lines += [" ".join((help_text or sub.description).split()), ""]
        lines += ["```", _usage(sub), "```"]
        rows = _argument_rows(sub)
        if rows:
            lines += ["", "| argument | default | description |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def pages() -> dict[Path, str]:
    """Each generated page's path (relative to the repository) and its text."""
    return {PAGES["options"]: options_markdown(), PAGES["cli"]: cli_markdown()}


def stale(root: Path = ROOT) -> list[Path]:
    """The pages under `root` whose text differs from what the code gives now."""
    return [path for path, text in pages().items() if not (root / path).exists() or (root / path).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit code 1 when a page is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this package's checkout)")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale(args.root)
        for path in out_of_date:
            print(f"{path} differs from the code: run `{COMMAND}`", file=sys.stderr)
        return 1 if out_of_date else 0
    for path, text in pages().items():
        (args.root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.root / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
