"""The front page's results figure, drawn from the benchmarks' recorded results.

    python benchmarks/results_figure.py                 # docs/figures/results.png from the recorded results below
    python benchmarks/results_figure.py --table         # and the front page's results table (README.md)

The recorded results (each file names the command, date, commit and hardware of its run):
- benchmarks/quality/results/property_targets.json: benchmarks/quality/property_targets.py, the property targets
  (minimal pairs of real SE answers) in both directions: held-out preference accuracy of the model trained on each
  method's 10% selection, 95% intervals, paired differences;
- benchmarks/quality/results/real_model.json: benchmarks/quality/real_model.py, the paper's released SE and HH
  few-shot pairs at SmolLM2-135M, the same measures, and the oracle that reads the pool's labels;
- benchmarks/speed/results/extraction.json: benchmarks/speed/extraction.py, milliseconds per example of a
  LESS-style gradient loop, of this engine and of a plain forward+backward (the floor), per workload and run.

After a new run, record it first (the file is rewritten from the benchmark's own output; --hardware is required,
--commit defaults to the checkout's HEAD, --date to today, --command to the file's), then draw again:

    python benchmarks/results_figure.py --property-results outputs/props_full/results_full.json --hardware "..."
    python benchmarks/results_figure.py --real-model-results outputs/bench_real_model/results_full_se_hh.json \\
        --hardware "..."
    python benchmarks/speed/extraction.py | tee extraction.log
    python benchmarks/results_figure.py --extraction-log extraction.log --workload tiny --hardware "..."
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROPERTY_RESULTS = HERE / "quality" / "results" / "property_targets.json"
REAL_MODEL_RESULTS = HERE / "quality" / "results" / "real_model.json"
EXTRACTION_RESULTS = HERE / "speed" / "results" / "extraction.json"
FIGURE = ROOT / "docs" / "figures" / "results.png"

_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
# One style for every method, in every panel (the frontier figure uses the same default colour cycle).
STYLE = {
    "random": dict(color="grey", marker="s", label="random (mean ± sd over seeds)"),
    "less": dict(color=_COLORS[1], marker="D", label="LESS (95% interval)"),
    "rose": dict(color=_COLORS[0], marker="o", label="ROSE (95% interval)"),
    "oracle": dict(color="black", marker="*", label="oracle: reads the labels (95% interval)"),
}
PROPERTY_NAMES = {"se_link": "link", "se_code": "code", "se_emphasis": "emphasis"}


# ------------------------------------------------------------------------------------------------ reading


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def above_zero(interval) -> bool:
    return interval[1] > 0


def holds_zero(interval) -> bool:
    return interval[1] <= 0 <= interval[2]


def property_answer(data: dict) -> str:
    """How many target-directions ROSE beats random in (paired 95% interval above 0), from the data."""
    wins = sum(above_zero(t["minus_random"]["rose"]) for t in data["targets"])
    return f"ROSE above random in {wins} of {len(data['targets'])} target-directions"


def floor_multiples(workload: dict) -> dict[str, float]:
    """Each path's time per example as a multiple of the floor's: the median over runs of each run's ratio."""
    runs = workload["runs"]
    return {path: float(np.median([r[path] / r["floor"] for r in runs])) for path in ("floor", "engine", "less")}


def _diff(interval) -> str:
    value, low, high = interval
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def results_table(properties: dict, real_model: dict) -> str:
    """The front page's table (README.md, "Results at a glance"): per target, ROSE's, LESS's and the oracle's
    held-out accuracy minus random's, paired over the same test pairs, with 95% intervals."""
    src = properties["source"]
    lines = [
        f"Held-out preference accuracy of {src['model']} trained on each method's {src['budget']:.0%} selection, "
        f"minus random's ({properties['targets'][0]['random']['seeds']} seeds), paired over the same test pairs, "
        "with 95% intervals; the oracle reads the pool's labels.",
        "",
        "| target (test pairs) | ROSE - random | LESS - random | oracle - random |",
        "|---|---|---|---|",
    ]
    for t in properties["targets"]:
        name = f"{PROPERTY_NAMES.get(t['target'], t['target'])}, {t['direction']} ({src['test_pairs']})"
        d = t["minus_random"]
        lines.append(f"| {name} | {_diff(d['rose'])} | {_diff(d['less'])} | {_diff(d['oracle'])} |")
    for t in real_model["targets"]:
        name = f"{t['target'].upper()}, the paper's {t['validation_k']}-shot pairs ({t['test_pairs']})"
        d = t["minus_random"]
        lines.append(f"| {name} | {_diff(d['rose'])} | {_diff(d['less'])} | {_diff(d['target_chosen'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ drawing


def _point(ax, x, value, low=None, high=None, style=None, sd=None, show_label=True):
    style = style or {}
    if sd is not None:
        low, high = value - sd, value + sd
    err = None if low is None else [[value - low], [high - value]]
    ax.errorbar(
        x,
        value,
        yerr=err,
        fmt=style.get("marker", "o"),
        color=style.get("color"),
        markersize=7 if style.get("marker") == "*" else 5,
        capsize=3,
        linewidth=1.2,
        label=style.get("label") if show_label else None,
    )


def draw_methods(ax, groups: list[tuple[str, dict]], methods: list[tuple[str, str]]):
    """Per group (a label and its target entry), each method's accuracy with its interval, side by side."""
    width = 0.16
    offsets = (np.arange(len(methods)) - (len(methods) - 1) / 2) * width
    for g, (_, entry) in enumerate(groups):
        for (style_name, key), dx in zip(methods, offsets, strict=True):
            first = g == 0
            if key == "random":
                _point(
                    ax,
                    g + dx,
                    entry["random"]["mean"],
                    sd=entry["random"]["sd"],
                    style=STYLE["random"],
                    show_label=first,
                )
            else:
                value, low, high = entry["accuracy"][key]
                _point(ax, g + dx, value, low, high, style=STYLE[style_name], show_label=first)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", linewidth=0.3)


def draw(properties: dict, real_model: dict, extraction: dict, out: Path) -> Path:
    fig = plt.figure(figsize=(11, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1], hspace=0.42, wspace=0.28)

    ax = fig.add_subplot(grid[0, :])
    src = properties["source"]
    groups = [(f"{PROPERTY_NAMES.get(t['target'], t['target'])}\n{t['direction']}", t) for t in properties["targets"]]
    draw_methods(ax, groups, [("random", "random"), ("less", "less"), ("rose", "rose"), ("oracle", "oracle")])
    ax.set_ylabel(f"held-out preference accuracy\n({src['test_pairs']} test pairs)")
    ax.set_title(
        f"Property targets in both directions ({src['model']}, {src['budget']:.0%} selected): "
        f"{property_answer(properties)}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower left", ncol=4)

    ax = fig.add_subplot(grid[1, 0])
    src = real_model["source"]
    groups = [(f"{t['target'].upper()} ({t['test_pairs']} pairs)", t) for t in real_model["targets"]]
    draw_methods(ax, groups, [("random", "random"), ("less", "less"), ("rose", "rose"), ("oracle", "target_chosen")])
    ax.set_ylabel("held-out preference accuracy")
    ties = all(
        holds_zero(t["minus_random"][m]) for t in real_model["targets"] for m in ("rose", "less", "target_chosen")
    )
    ax.set_title(
        f"Released SE and HH pairs ({src['model']}, {src['budget']:.0%}):\n"
        + ("every method ties random, the oracle too" if ties else "paired differences to random: see the results"),
        fontsize=10,
    )

    ax = fig.add_subplot(grid[1, 1])
    paths = (
        ("less", "LESS-style loop (batch 1)", STYLE["less"]["color"]),
        ("engine", "rose_trl", STYLE["rose"]["color"]),
        ("floor", "floor: plain forward+backward", "grey"),
    )
    height = 0.26
    workloads = extraction["workloads"]
    for w, workload in enumerate(workloads):
        multiples = floor_multiples(workload)
        for i, (path, name, color) in enumerate(paths):
            y = len(workloads) - 1 - w + (1 - i) * height
            value = multiples[path]
            ax.barh(y, value, height=height * 0.9, color=color, label=name if w == 0 else None)
            ax.text(value * 1.08, y, f"{value:.2f}x" if value < 10 else f"{value:.0f}x", va="center", fontsize=8)
    ax.set_yticks(range(len(workloads))[::-1], [textwrap.fill(w["label"], 14) for w in workloads], fontsize=9)
    ax.set_xscale("log")
    ax.set_xlim(0.5, max(max(floor_multiples(w).values()) for w in workloads) * 5)
    ax.set_xlabel("time per example, x the floor (median over runs)")
    ax.set_title("Gradient extraction cost against the floor", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ recording


def _ci(value, interval, digits=4) -> list[float]:
    return [round(float(value), digits), round(float(interval[0]), digits), round(float(interval[1]), digits)]


def _paired(rows: list[dict], baseline: list[dict], key: str) -> list[float]:
    """Mean over pairs of (rows' mean per pair - baseline's), with its 95% bootstrap interval: the benchmarks' own
    paired difference (property_report.paired, real_model_report.paired_difference)."""
    from rose_trl.evaluation.metrics import bootstrap_interval

    diff = np.mean([r[key] for r in rows], axis=0) - np.mean([r[key] for r in baseline], axis=0)
    return _ci(diff.mean(), bootstrap_interval(diff))


def _random(rows: list[dict]) -> dict:
    accuracies = [r["accuracy"] for r in rows]
    return {
        "mean": round(float(np.mean(accuracies)), 4),
        "sd": round(float(np.std(accuracies)), 4),
        "seeds": len(rows),
    }


def property_targets_entries(results: dict, budget: float) -> list[dict]:
    """property_targets.py's results (results_full.json) -> the entries of property_targets.json at `budget`."""
    entries = []
    for prop, res in results["targets"].items():
        for direction, d in res["directions"].items():
            tested = {
                name: [r["test"] for r in by_budget[str(budget)]]
                for name, by_budget in d["methods"].items()
                if "test" in by_budget[str(budget)][0]
            }
            tested.update({name: [r] for name, r in d.get("bounds", {}).get(str(budget), {}).items()})
            random = tested.pop("random")
            entries.append(
                {
                    "target": prop,
                    "direction": direction,
                    "accuracy": {n: _ci(rows[0]["accuracy"], rows[0]["accuracy_ci"]) for n, rows in tested.items()},
                    "random": _random(random),
                    "auc": {
                        name: round(float(np.mean([r["composition"]["auc_chosen_rejected"] for r in rows])), 2)
                        for name, rows in ((n, d["methods"][n][str(budget)]) for n in ("rose", "less", "random"))
                    },
                    "minus_random": {n: _paired(rows, random, "wins") for n, rows in tested.items()},
                    "rose_minus_less": _paired(tested["rose"], tested["less"], "wins"),
                    "margin_rose_minus_random": _paired(tested["rose"], random, "margins"),
                    "margin_rose_minus_less": _paired(tested["rose"], tested["less"], "margins"),
                }
            )
    return entries


def real_model_entries(results: dict, budget: float) -> list[dict]:
    """real_model.py's results -> the entries of real_model.json at `budget`: each target at its released k (the
    table that holds random's runs)."""
    entries = []
    for name, res in results.items():
        if name.endswith("_variants") or "random" not in res.get("methods", {}):
            continue
        tested = {
            method: [r["test"] for r in by_budget[str(budget)]]
            for method, by_budget in res["methods"].items()
            if str(budget) in by_budget and "test" in by_budget[str(budget)][0]
        }
        random = tested.pop("random")
        target, k = name.rsplit("_k", 1)
        compositions = {m: by_budget[str(budget)][0]["composition"] for m, by_budget in res["methods"].items()}
        entries.append(
            {
                "target": target,
                "validation_k": int(k),
                "test_pairs": len(random[0]["wins"]),
                "accuracy": {m: _ci(rows[0]["accuracy"], rows[0]["accuracy_ci"]) for m, rows in tested.items()},
                "random": _random(random),
                "minus_random": {m: _paired(rows, random, "wins") for m, rows in tested.items()},
                "auc": {
                    m: _ci(c["auc_chosen_rejected"], c["auc_chosen_rejected_ci"], 2)
                    for m, c in compositions.items()
                    if m in tested and "auc_chosen_rejected" in c
                },
            }
        )
    return entries


_LINE = re.compile(r"^\((a|b|c|c')\) .*?([\d.]+) ms/example", re.M)


def extraction_runs(log: str) -> list[dict]:
    """benchmarks/speed/extraction.py's printed output (one or more runs) -> runs of ms per example: `less` (a),
    `engine` (b) and `floor`, the labelled-positions floor (c') where the run has it, else (c)."""
    runs = []
    for chunk in re.split(r"^speedup_vs_less=.*$", log, flags=re.M)[:-1]:
        found = {m.group(1): float(m.group(2)) for m in _LINE.finditer(chunk)}
        if not {"a", "b", "c"} <= set(found):
            raise ValueError("an extraction.py run without its (a), (b) and (c) lines (was it run with --skip-less?)")
        runs.append({"less": found["a"], "engine": found["b"], "floor": found.get("c'", found["c"])})
    if not runs:
        raise ValueError("no extraction.py run in the log (its last line is speedup_vs_less=...)")
    return runs


def git_head() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def write(path: Path, data: dict) -> None:
    """JSON with each interval on one line."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+([-\d.e]+),\s+([-\d.e]+),\s+([-\d.e]+)\s+\]", r"[\1, \2, \3]", text)
    Path(path).write_text(text + "\n")


def record(args) -> None:
    """Rewrite the recorded results named on the command line from a new run's output."""
    stamp = {"date": args.date or datetime.date.today().isoformat(), "commit": args.commit or git_head()}
    stamp["hardware"] = args.hardware
    if args.property_results:
        data = read(args.property_results_file)
        data["targets"] = property_targets_entries(read(args.property_results), data["source"]["budget"])
        data["source"].update(stamp, command=args.command or data["source"]["command"])
        write(args.property_results_file, data)
    if args.real_model_results:
        data = read(args.real_model_results_file)
        data["targets"] = real_model_entries(read(args.real_model_results), data["source"]["budget"])
        data["source"].update(stamp, command=args.command or data["source"]["command"])
        write(args.real_model_results_file, data)
    if args.extraction_log:
        data = read(args.extraction_file)
        workload = next((w for w in data["workloads"] if w["name"] == args.workload), None)
        if workload is None:
            raise SystemExit(
                f"--workload {args.workload!r}: the workloads are {[w['name'] for w in data['workloads']]}"
            )
        workload["runs"] = extraction_runs(Path(args.extraction_log).read_text())
        workload["source"].update(stamp, command=args.command or workload["source"]["command"])
        write(args.extraction_file, data)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=FIGURE, help="the figure (default: docs/figures/results.png)")
    p.add_argument("--property-results-file", type=Path, default=PROPERTY_RESULTS)
    p.add_argument("--real-model-results-file", type=Path, default=REAL_MODEL_RESULTS)
    p.add_argument("--extraction-file", type=Path, default=EXTRACTION_RESULTS)
    p.add_argument("--table", action="store_true", help="also print the front page's results table (markdown)")
    new = p.add_argument_group("recording a new run (before drawing)")
    new.add_argument("--property-results", type=Path, help="property_targets.py's results_full.json")
    new.add_argument("--real-model-results", type=Path, help="real_model.py's results_full_<targets>.json")
    new.add_argument("--extraction-log", type=Path, help="extraction.py's printed output")
    new.add_argument("--workload", default="tiny", help="the extraction workload the log is of (tiny, smollm2-135m)")
    new.add_argument("--hardware", help="the machine the run was made on (required when recording)")
    new.add_argument("--command", help="the run's command (default: the recorded one)")
    new.add_argument("--date", help="the run's date (default: today)")
    new.add_argument("--commit", help="the commit the run was made from (default: this checkout's HEAD)")
    args = p.parse_args(argv)
    if args.property_results or args.real_model_results or args.extraction_log:
        if not args.hardware:
            p.error("--hardware is required when recording a run: the results say what machine made them")
        record(args)
    properties, real_model = read(args.property_results_file), read(args.real_model_results_file)
    path = draw(properties, real_model, read(args.extraction_file), args.out)
    print(f"wrote {path}")
    if args.table:
        print(results_table(properties, real_model))
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
