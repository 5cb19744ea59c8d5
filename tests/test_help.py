"""Every entry point answers --help and lists its options; a command-line error is one line, never a traceback.

argparse (and TRL's parser on top of it) formats every help string with `%`: a literal `5%` in a dataclass field's
help or an add_argument/add_parser help makes --help itself raise. The scan below finds one before a user does.
"""

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rose_trl.cli import build_parser
from rose_trl.config import ROSEConfig, SelectConfig


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.py"))


def subcommands() -> list[str]:
    """rose-trl's subcommands, from its parser: a new one is covered without touching this file."""
    return sorted(_subparsers(build_parser()).choices)


def _subparsers(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action


def options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def expected_options() -> dict[str, set[str]]:
    """Each entry point (`recipes/<name>.py`, `rose-trl [subcommand]`) -> the options its --help must list."""
    rose = {f"--{f.name}" for f in dataclasses.fields(ROSEConfig)}
    select = {f"--{f.name}" for f in dataclasses.fields(SelectConfig)}
    recipes = {
        "recipes/rose_sft.py": rose | {"--output_dir", "--model_name_or_path", "--per_device_train_batch_size"},
        "recipes/rose_select.py": rose | select | {"--model_name_or_path"},
        "recipes/trl_sft_with_rose.py": rose | {"--output_dir", "--dataset_name", "--model_name_or_path"},
    }
    assert set(recipes) == {f"recipes/{name}" for name in RECIPES}, "a new recipe: say which options --help lists"
    commands = dict(recipes)
    action = _subparsers(build_parser())
    commands["rose-trl"] = set(action.choices)
    for name in subcommands():
        commands[f"rose-trl {name}"] = options(action.choices[name])
    return commands


def help_of_every_entry_point() -> None:
    """Run in a subprocess: each entry point as a user runs it with --help (a recipe as __main__, rose-trl
    through its installed console-script entry point, else rose_trl.cli:main); prints {command: [exit code,
    output]} as JSON. One process for all of them: torch and TRL are imported once, not a dozen times."""
    import contextlib
    import io
    import json
    import runpy
    from importlib.metadata import entry_points

    installed = [e for e in entry_points(group="console_scripts") if e.name == "rose-trl"]
    rose_trl_main = installed[0].load() if installed else __import__("rose_trl.cli").cli.main
    results = {}
    for command in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if command.startswith("recipes/"):
                    sys.argv = [command, "--help"]
                    runpy.run_path(str(ROOT / command), run_name="__main__")
                else:
                    code = rose_trl_main([*command.split()[1:], "--help"])
            except SystemExit as e:
                code = e.code
            except Exception as e:  # reported as the entry point's failure
                code, err = 1, io.StringIO(f"{type(e).__name__}: {e}")
        results[command] = [code or 0, out.getvalue() + err.getvalue()]
    print(json.dumps(results))


def test_every_entry_point_answers_help():
    commands = expected_options()
    assert len(commands) >= len(RECIPES) + 1 + 7
    script = "from tests.test_help import help_of_every_entry_point; help_of_every_entry_point()"
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(sorted(commands))],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(found) == set(commands)
    assert {c: text[-600:] for c, (code, text) in found.items() if code != 0} == {}
    missing = {c: sorted(o for o in wanted if o not in found[c][1]) for c, wanted in commands.items()}
    assert {c: m for c, m in missing.items() if m} == {}


def rose_trl() -> list[str]:
    """The console script next to this interpreter (what users type), else the module it runs."""
    script = Path(sys.executable).parent / "rose-trl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rose_trl.cli"]


# ---------------------------------------------------------------------------------- a literal % in a help string

ARGPARSE_FIELDS = re.compile(r"%\((?:prog|default|type|choices|required|dest|metavar|help|const|nargs)\)[sdrf]")


def unescaped_percent(text: str) -> bool:
    """A `%` that argparse's `help % params` would choke on (or misread): not `%%`, not `%(default)s` and kin."""
    return "%" in ARGPARSE_FIELDS.sub("", text).replace("%%", "")


def constant_text(node) -> str | None:
    """The text of a string expression made of constants (implicit or + concatenation), else None; an f-string's
    constant parts (its placeholders left out)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = constant_text(node.left), constant_text(node.right)
        return None if left is None or right is None else left + right
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant))
    return None


def help_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every help argparse formats in `path`: add_argument/add_parser(help=...) and dataclass
    fields' metadata={"help": ...}."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for keyword in node.keywords:
            if name in ("add_argument", "add_parser", "add_argument_group") and keyword.arg == "help":
                found.append((node.lineno, constant_text(keyword.value)))
            elif name == "field" and keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "help":
                        found.append((node.lineno, constant_text(value)))
    return [(line, text) for line, text in found if text is not None]


def python_files() -> list[Path]:
    folders = ("rose_trl", "recipes", "benchmarks", "tests")
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_help_string_holds_a_literal_percent():
    scanned = {p: help_strings(p) for p in python_files()}
    assert sum(len(v) for v in scanned.values()) > 100  # the scan sees the help strings
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {text!r}"
        for p, found in scanned.items()
        for line, text in found
        if unescaped_percent(text)
    ]
    assert bad == []


def test_the_scan_finds_a_planted_percent(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from dataclasses import field\n"
        "x: float = field(default=None, metadata={'help': 'Default: 15% of ' 'the memory.'})\n"
        "p.add_argument('--a', help='fine: 15%% and %(default)s')\n"
        "p.add_parser('b', help='up to ' + '95% of it')\n"
    )
    assert [(line, unescaped_percent(text)) for line, text in help_strings(planted)] == [
        (2, True),
        (3, False),
        (4, True),
    ]


# ---------------------------------------------------------------------------------- errors are one line


@pytest.mark.parametrize(
    "args, says",
    [
        (["report", "{missing}"], "give the output_dir of a finished run"),
        (["explain", "{empty}", "3"], "is not a finished selection folder"),
        (["push", "{empty}", "me/subset"], "not a finished selection run"),
        (["evaluate", "--model", "{missing}/m.gguf", "--pairs", "p.jsonl"], "does not exist"),
    ],
)
def test_a_command_line_error_is_one_line(tmp_path, capsys, args, says):
    from rose_trl import cli

    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"rose-trl {args[0]}: error: ") and says in err


def test_rose_trl_report_on_a_folder_that_is_not_a_run(tmp_path):
    """As a user types it: the console script, one line on stderr, exit code 2."""
    result = subprocess.run([*rose_trl(), "report", str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"rose-trl report: error: no selection/ or selection_<method>/ folder with scores.parquet in {tmp_path}: "
        "give the output_dir of a finished run (the folder that holds selection/)\n"
    )


@pytest.mark.parametrize("recipe", ["rose_sft.py", "rose_select.py"])
def test_a_recipe_option_error_is_one_line(tmp_path, capsys, monkeypatch, recipe):
    import runpy

    args = ["--output_dir", str(tmp_path), "--selection_fraction", "2"]
    args += ["--warmup_dir", str(tmp_path)] if recipe == "rose_select.py" else []
    monkeypatch.setattr(sys, "argv", [recipe, *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "recipes" / recipe), run_name="__main__")
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"{recipe}: error: selection_fraction must be in (0, 1], got 2.0\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the package's user-facing errors become one line: anything else is raised as it is."""
    from rose_trl import cli
    from rose_trl.outputs import report

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["report", "anywhere"])
