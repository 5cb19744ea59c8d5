"""Regenerate (or check) the reference selection outputs: scores.parquet and contributions.parquet of the
tiny recipe and of every selection method the slow suite runs, as this checkout's code writes them.

    PYTHONPATH=$PWD python tests/references/make_references.py [--cases tiny matrix rerun] [--check]

Cases (final training off: the scores do not depend on it, tests/test_rerun.py checks that):
- tiny:   recipes/tiny/rose/config_tiny.yaml as it is, rose then less on the same output_dir
          (tests/test_recipe_tiny.py);
- matrix: the re-run matrix's arguments, one output_dir per method: rose, less, random (tests/test_rerun_matrix.py);
- rerun:  tests/test_rerun.py's slow arguments, every method on one output_dir in its order;
- inline: the selector on an in-memory tiny model (tests/test_references.py's default-suite variant).
Each output lands in tests/references/<case>/<selection folder>/, with manifest.json (sha256 of every file and
the pyarrow/pandas versions that wrote them: parquet embeds its writer's version, so bytes are compared only
under the same versions; the decoded tables always are).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FILES = ("scores.parquet", "contributions.parquet")
TINY_CONFIG = ROOT / "recipes/tiny/rose/config_tiny.yaml"
MATRIX_ARGS = [
    "--pool_max_examples",
    "160",
    "--num_train_epochs",
    "3",
    "--per_device_train_batch_size",
    "4",
    "--warmup_steps",
    "2",
    "--projection_dim",
    "512",
    "--selection_fraction",
    "0.1",
    "--logging_steps",
    "500",
    "--save_strategy",
    "epoch",
]
RERUN_ARGS = [
    "--num_train_epochs",
    "2",
    "--projection_dim",
    "512",
    "--save_strategy",
    "epoch",
    "--pool_max_examples",
    "160",
    "--warmup_fraction",
    "0.25",
]
GRADIENT_METHODS = ("rose", "less")
ALL_METHODS = ("rose", "less", "random", "bm25", "rds", "dsir", "full")


def folder_of(method: str) -> str:
    return "selection" if method == "rose" else f"selection_{method}"


def versions() -> dict:
    import pandas
    import pyarrow

    return {"pyarrow": pyarrow.__version__, "pandas": pandas.__version__}


def recipe(workdir: Path, config: Path, out: Path, *args: str) -> None:
    """recipes/rose_sft.py as a user launches it (one CPU process), final training off."""
    cmd = [
        sys.executable,
        str(ROOT / "recipes/rose_sft.py"),
        "--config",
        str(config),
        "--output_dir",
        str(out),
        "--final_training",
        "false",
        "--disable_tqdm",
        "true",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def assets(workdir: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(workdir / "outputs/tiny")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )


def run_case(case: str, workdir: Path) -> dict[str, Path]:
    """Runs `case` under `workdir`; selection folder name -> its path."""
    if case == "inline":
        from tests.reference_selector import run_inline

        return run_inline(workdir)
    assets(workdir)
    found = {}
    if case == "tiny":
        out = workdir / "outputs/tiny/run"
        for method in GRADIENT_METHODS:
            recipe(workdir, TINY_CONFIG, out, "--selection_method", method)
            found[folder_of(method)] = out / folder_of(method)
    elif case == "matrix":
        for method in ("rose", "less", "random"):
            out = workdir / f"run-{method}"
            recipe(workdir, TINY_CONFIG, out, "--selection_method", method, *MATRIX_ARGS)
            found[folder_of(method)] = out / folder_of(method)
    elif case == "rerun":
        lines = TINY_CONFIG.read_text().splitlines()  # logging_steps at its default, as tests/test_rerun.py
        config = workdir / "config.yaml"
        config.write_text("\n".join(line for line in lines if not line.startswith("logging_steps")))
        out = workdir / "run"
        for method in ALL_METHODS:
            recipe(workdir, config, out, "--selection_method", method, *RERUN_ARGS)
            found[folder_of(method)] = out / folder_of(method)
    else:
        raise ValueError(f"unknown case {case!r}")
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(case: str, folders: dict[str, Path]) -> dict:
    """Copies the case's files under tests/references/<case>/ and writes its manifest."""
    target = HERE / case
    shutil.rmtree(target, ignore_errors=True)
    manifest = {"versions": versions(), "files": {}}
    for name, folder in folders.items():
        for f in FILES:
            if (folder / f).exists():
                (target / name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / f, target / name / f)
                manifest["files"][f"{name}/{f}"] = sha256(folder / f)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def compare(case: str, folders: dict[str, Path]) -> list[str]:
    """What differs from the stored references: [] when every file matches (see tests/references/compare.py)."""
    from tests.references.compare import differences

    return differences(HERE / case, folders)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["inline", "tiny", "matrix", "rerun"])
    p.add_argument("--check", action="store_true", help="compare with the stored references instead of writing them")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    failed = False
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            folders = run_case(case, Path(tmp))
            if args.check:
                problems = compare(case, folders)
                failed |= bool(problems)
                print(f"{case}: " + ("identical" if not problems else "DIFFERS\n  " + "\n  ".join(problems)))
            else:
                manifest = record(case, folders)
                print(f"{case}: recorded {len(manifest['files'])} files")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
