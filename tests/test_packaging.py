"""What a clone, an sdist and a wheel get: one version (rose_trl/__init__.py, read by setup.py, equal to the
installed metadata), LICENSE and NOTICE shipped, every package folder a regular package, no tracked file hidden
by .gitignore, and one ruff version for CI, pre-commit and the `dev` extra."""

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from setuptools import find_packages


ROOT = Path(__file__).resolve().parents[1]


def setup_py(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        [sys.executable, "setup.py", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


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


def test_the_version_is_defined_once_and_setup_py_reads_it():
    import rose_trl

    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", rose_trl.__version__), rose_trl.__version__
    assert setup_py("--version").strip().splitlines()[-1] == rose_trl.__version__
    assert "version=VERSION" in (ROOT / "setup.py").read_text()  # not written a second time
    # CITATION.cff cites this version of the software.
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == rose_trl.__version__


def installed_from() -> Path | None:
    """The folder the installed rose_trl was installed from (pip's direct_url.json), if any."""
    try:
        direct_url = importlib.metadata.distribution("rose_trl").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    url = json.loads(direct_url or "{}").get("url", "")
    return Path(unquote(urlparse(url).path)).resolve() if url.startswith("file://") else None


def test_the_installed_version_is_this_checkouts():
    import rose_trl

    if installed_from() != ROOT:
        pytest.skip(f"the installed rose_trl comes from {installed_from()}, not from this checkout ({ROOT})")
    installed = importlib.metadata.version("rose_trl")
    assert installed == rose_trl.__version__, (
        f"installed metadata says {installed}, rose_trl/__init__.py {rose_trl.__version__}: "
        "reinstall (pip install -e . --no-deps)"
    )


def test_sdist_and_wheel_ship_the_license_notice_and_data(tmp_path):
    import rose_trl

    # egg-info and build folders under tmp_path: nothing is written into the checkout.
    setup_py(
        "-q",
        "egg_info",
        "--egg-base",
        str(tmp_path),
        "sdist",
        "--dist-dir",
        str(tmp_path),
        "build",
        "--build-base",
        str(tmp_path / "build"),
        "bdist_wheel",
        "--bdist-dir",
        str(tmp_path / "bdist"),
        "--dist-dir",
        str(tmp_path),
    )
    name = f"rose_trl-{rose_trl.__version__}"
    with tarfile.open(tmp_path / f"{name}.tar.gz") as sdist:
        in_sdist = {m.name.removeprefix(f"{name}/") for m in sdist.getmembers()}
    assert {"LICENSE", "NOTICE", "CHANGELOG.md", "CITATION.cff", "rose_trl/data/real/se.jsonl"} <= in_sdist
    with zipfile.ZipFile(tmp_path / f"{name}-py3-none-any.whl") as wheel:
        in_wheel = set(wheel.namelist())
        metadata = wheel.read(f"{name}.dist-info/METADATA").decode()
    assert {f"{name}.dist-info/licenses/LICENSE", f"{name}.dist-info/licenses/NOTICE"} <= in_wheel
    assert {"rose_trl/outputs/__init__.py", "rose_trl/data/real/hh.jsonl", "rose_trl/data/real/README.md"} <= in_wheel
    assert f"Version: {rose_trl.__version__}" in metadata.splitlines()
    # The license is the Apache License 2.0's own text, whole.
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_torch_is_a_range_and_the_commands_keep_their_exact_cpu_pin():
    """setup.py declares the torch range the project supports (so that a CUDA build installed first is kept); the
    README's and CI's commands install one exact CPU build inside it first, which makes them reproducible."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    (torch,) = [r for r in setup_assignment("INSTALL_REQUIRES") if re.match(r"torch\b", r)]
    supported = SpecifierSet(torch.removeprefix("torch"))
    assert not any(s.operator == "==" for s in supported) and Version("2.6") in supported
    assert Version("2.5.1") not in supported  # below transformers 5's floor (setup.py says why)
    assert Version(version("torch")) in supported  # the torch these tests run on
    for path in (ROOT / "README.md", ROOT / ".ci" / "run"):
        pins = set(re.findall(r"pip install (?:-q )?torch==([\d.]+)", path.read_text()))
        assert pins == {"2.13.0"}, (path.name, pins)
    assert Version("2.13.0") in supported


def test_ci_runs_the_readmes_test_command():
    """The README gives the test command; CI runs that very command (and then the slow suite)."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    (command,) = [line for block in blocks for line in block.splitlines() if line.startswith("python -m pytest")]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
