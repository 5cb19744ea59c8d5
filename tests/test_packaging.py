"""What a clone and a wheel get: every package folder a regular package, no tracked file hidden by .gitignore,
and one ruff version for CI, pre-commit and the `dev` extra."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from setuptools import find_packages


ROOT = Path(__file__).resolve().parents[1]


def setup_assignment(name: str):
    """The literal value setup.py assigns to `name` (read without running setup())."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


def test_every_package_folder_is_a_regular_package():
    folders = {p.parent for p in (ROOT / "rose_trl").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"no __init__.py (a wheel built by find_packages would leave them out): {missing}"
    found = set(find_packages(str(ROOT), include=["rose_trl", "rose_trl.*"]))
    expected = {".".join(f.relative_to(ROOT).parts) for f in folders}
    assert expected <= found, sorted(expected - found)


def test_no_tracked_file_is_ignored():
    """A .gitignore pattern that matches tracked files also hides new files there from git and ruff."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not out, f"tracked but matched by .gitignore: {out}"


def test_ci_pre_commit_and_dev_extra_pin_the_same_ruff():
    (dev_pin,) = [r for r in setup_assignment("EXTRAS")["dev"] if r.startswith("ruff")]
    version = re.fullmatch(r"ruff==([\d.]+)", dev_pin).group(1)
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    (repo,) = [r for r in config["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    assert repo["rev"] == f"v{version}"
    assert {h["id"] for h in repo["hooks"]} == {"ruff-check", "ruff-format"}
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"ruff=={version}" in ci
    # Style is checked before the tests run.
    assert ci.index("ruff check .") < ci.index("ruff format --check .") < ci.index("python -m pytest")
