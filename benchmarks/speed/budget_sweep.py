"""A recipe's wall time, CPU time and peak memory at each memory budget: where a larger budget stops helping.

    python benchmarks/speed/budget_sweep.py --config recipes/smollm2-135m/rose/config_se.yaml \
        --out outputs/budget_sweep/smollm2 --json outputs/budget_sweep/smollm2.json
    python benchmarks/speed/budget_sweep.py --config recipes/tiny/rose/config_tiny.yaml \
        --out outputs/budget_sweep/tiny --budgets 2 default

For each budget (`--budgets`, GB or `default`: no `memory_budget_gb`, the run's own default), the recipe runs in a
process of its own (recipes/rose_sft.py's `run`, as `accelerate launch` runs it on one process), into
`<out>/budget_<B>`, which must not exist: every run starts from nothing. Per run: the wall time from the process's
start to its end, its CPU-seconds (user + system), its peak resident memory (`getrusage`, the process's own high
mark), the load average before and after (the machine's other work, which a wall time also measures), the memory
plan's lines from its log (the budget, the rows and pairs a pass, what a larger budget would save) and the run's
`timings.json` (each stage's time). Recipe options after the benchmark's own go to every run
(e.g. `--pool_max_examples 24`). Run it alone on the machine: the runs are timed one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
# The memory plan's lines in the run's log (rose_trl.run.selector logs them at the pool's first pass).
PLAN_LINE = re.compile(r"memory plan:|^\s+(pool gradient passes|validation|selection passes):|would allow|over the")


def run_once(recipe_args: list[str], out_json: str) -> None:
    """Run the recipe in this process; write its wall, CPU and peak-memory figures to `out_json`."""
    import psutil

    from rose_trl.run import pipeline

    started = psutil.Process().create_time()
    rose, sft, model_args = pipeline.recipe_parser().parse_args_and_config(args=recipe_args)
    pipeline.run(rose, sft, model_args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    figures = {"wall_s": time.time() - started, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": peak_bytes}
    Path(out_json).write_text(json.dumps(figures))


def plan_lines(log: str) -> list[str]:
    """The memory plan's lines of a run's log, without the logger's prefix."""
    lines = []
    for line in log.splitlines():
        text = re.sub(r"^.*?\] ", "", line) if "memory plan:" in line else line
        if PLAN_LINE.search(text):
            lines.append(text.rstrip())
    return lines


def sweep(config: str, budgets: list[str], out: Path, recipe_options: list[str]) -> list[dict]:
    """One run per budget, one after the other -> one record each (module docstring)."""
    runs = []
    for budget in budgets:
        output_dir = out / f"budget_{budget}"
        if output_dir.exists():
            raise SystemExit(
                f"{output_dir} exists: every run must start from nothing (remove it or give another --out)"
            )
        budget_args = [] if budget == "default" else ["--memory_budget_gb", budget]
        recipe_args = ["--config", config, *recipe_options, "--output_dir", str(output_dir), *budget_args]
        figures_json = out / f"budget_{budget}.figures.json"
        load_before = os.getloadavg()
        done = subprocess.run(
            [sys.executable, __file__, "--run-once", str(figures_json), *recipe_args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))},
        )
        log = done.stdout + done.stderr
        (out / f"budget_{budget}.log").write_text(log)
        if done.returncode != 0:
            raise SystemExit(
                f"the run at budget {budget} failed (exit {done.returncode}); its log: {out}/budget_{budget}.log"
            )
        record = {
            "memory_budget_gb": None if budget == "default" else float(budget),
            **json.loads(figures_json.read_text()),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "plan_lines": plan_lines(log),
            "command": "python recipes/rose_sft.py " + " ".join(recipe_args),
        }
        timings = output_dir / "timings.json"
        if timings.exists():
            record["timings"] = json.loads(timings.read_text())
        runs.append(record)
        print(row(record), flush=True)
    return runs


def row(record: dict) -> str:
    budget = "default" if record["memory_budget_gb"] is None else f"{record['memory_budget_gb']:g}"
    return (
        f"| {budget} | {record['wall_s']:.1f} | {record['cpu_s']:.1f} | {record['peak_rss_bytes'] / 1e9:.2f} | "
        f"{record['load_before'][0]:.2f} / {record['load_after'][0]:.2f} |"
    )


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--run-once":
        run_once(argv[2:], argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe's YAML")
    p.add_argument("--out", type=Path, required=True, help="a folder for the runs (budget_<B>/ each) and their logs")
    p.add_argument("--budgets", nargs="+", default=["2", "4", "8", "12", "default"], help="GB, or `default`")
    p.add_argument("--json", type=Path, default=None, help="also write every run's record here")
    args, recipe_options = p.parse_known_args(argv)
    for budget in args.budgets:
        if budget != "default":
            try:
                float(budget)
            except ValueError:
                p.error(f"--budgets: {budget!r} is neither a number of GB nor `default`")
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        "| memory_budget_gb | wall s | CPU s | peak RSS GB | load before / after |\n|---|---|---|---|---|", flush=True
    )
    runs = sweep(args.config, args.budgets, args.out, recipe_options)
    if args.json:
        source = {"benchmark": "benchmarks/speed/budget_sweep.py", "config": args.config, "options": recipe_options}
        args.json.write_text(json.dumps({"source": source, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
