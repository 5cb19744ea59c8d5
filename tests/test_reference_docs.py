"""The reference pages written from the code (rose_trl/reference.py) match it: docs/reference/options.md holds every
ROSEConfig and SelectConfig option with its type, default and help, in the dataclass's groups; docs/reference/cli.md
every `rose-trl` subcommand and argument. A page that differs fails here with the command that writes it again."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from rose_trl import reference
from rose_trl.cli import build_parser
from rose_trl.config import ROSEConfig, SelectConfig, option_help, option_sections, option_type


def test_the_reference_pages_match_the_code():
    out_of_date = reference.stale()
    assert not out_of_date, (
        f"{', '.join(map(str, out_of_date))} differ from the code: run `{reference.COMMAND}` and commit the result"
    )


def test_every_option_is_in_a_group_its_comments_open():
    sections = option_sections(ROSEConfig)
    grouped = [f.name for _, fields in sections for f in fields]
    assert grouped == [f.name for f in dataclasses.fields(ROSEConfig)]  # each once, in field order
    assert all(title.startswith("Parameters that control ") for title, _ in sections)
    titles = [title for title, _ in sections]
    assert len(titles) == len(set(titles))
    assert dict(sections)["Parameters that control the data"][0].name == "pool_dataset"


def test_the_options_page_shows_each_option_with_its_type_default_and_help():
    page = reference.options_markdown()
    for cls in (ROSEConfig, SelectConfig):
        for f in dataclasses.fields(cls):
            row = next((line for line in page.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f.name
            assert f"`{option_type(cls, f)}`".replace("|", "\\|") in row, (f.name, row)
            assert " ".join(option_help(f).split())[:40].replace("<", "&lt;") in row, (f.name, row)
    assert "| `selection_fraction` | `float` | `0.05` |" in page
    assert "| `validation_loss_type` | `list[str]` | `['sigmoid']` |" in page
    assert "One of: rose, less, random, bm25, rds, dsir, full." in page
    # the groups, in the dataclass's order, with GitHub's anchors in the contents
    headings = re.findall(r"^### (.+)$", page, re.M)
    assert headings == [reference._short_title(t) for t, _ in option_sections(ROSEConfig)]
    assert "- [The checkpoints' learning rates](#the-checkpoints-learning-rates)" in page


def test_help_is_shown_as_a_reader_sees_it():
    page = reference.options_markdown()
    assert "%%" not in page  # argparse's escape, not the reader's text
    assert "checkpoint-&lt;step>/" in page  # a tag-like word outside code is escaped
    assert reference._cell("`a|b` <x> `<y>`") == "`a\\|b` &lt;x> `<y>`"


def test_a_new_option_reaches_the_page_in_its_group(monkeypatch):
    """A field added under a group's comment shows up in that group: the page is made from the dataclass, not kept
    by hand."""

    @dataclass
    class Extended(ROSEConfig):
        # Parameters that control the planted group
        planted_option: int = field(default=3, metadata={"help": "A planted option, 100%% of it."})

    monkeypatch.setattr("rose_trl.config.ROSEConfig", Extended)
    page = reference.options_markdown()
    assert "### The planted group" in page
    assert "| `planted_option` | `int` | `3` | A planted option, 100% of it. |" in page


def test_the_cli_page_lists_every_subcommand_and_argument():
    page = reference.cli_markdown()
    parser = build_parser()
    commands = reference._subcommands(parser)
    assert len(commands) >= 7
    for name, _, sub in commands:
        assert f"\n## rose-trl {name}\n" in page
        section = page.split(f"\n## rose-trl {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in section or f", {option}" in section, (name, option)


def test_check_fails_on_a_stale_page_and_passes_once_written(tmp_path, capsys):
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    assert f"run `{reference.COMMAND}`" in capsys.readouterr().err
    assert reference.main(["--root", str(tmp_path)]) == 0
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / reference.PAGES["options"]
    page.write_text(page.read_text().replace("Fraction of the pool", "Share of the pool"))
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", ["options", "cli"])
def test_each_page_says_how_it_is_made(name):
    text = getattr(reference, f"{name}_markdown")()
    assert text.startswith("<!-- Written by `python -m rose_trl.reference`")
