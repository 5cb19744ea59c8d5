"""The frontier figure from frontier.py's data: each setting's selection cost against how far its AUC falls from the
full method's, per suite.

    python benchmarks/quality/frontier_figure.py [--results benchmarks/quality/results/frontier.json]
        [--out docs/figures/frontier.png]

x: the setting's selection CPU-seconds as a share of the full method's, measured (frontier.py --costs) where the
suite has it, else as resources/cost.py predicts (hollow markers). y: its AUC minus the full method's, the worst over
the suite's targets and directions. The lines mark the goal (half the full cost) and the tolerance (0.03 of AUC);
the settings on each suite's frontier are joined.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
from frontier import RESULTS, cost_shares, frontier, worst_differences  # noqa: E402


FIGURE = Path(__file__).resolve().parents[2] / "docs" / "figures" / "frontier.png"
MARKERS = {"properties": "o", "se": "s", "hh": "D", "planted": "^", "planted_distractor": "v"}
# The setting docs/results/cost_frontier.md recommends (the last checkpoint alone), ringed on every suite.
RECOMMENDED = "lall_c-1_poff"


def points(entry: dict) -> list[tuple[str, float, float, bool]]:
    """(setting, cost share, worst AUC difference, measured) of a suite."""
    costs = (entry.get("costs") or {}).get("settings") or {}
    shares, worst = cost_shares(entry), worst_differences(entry)
    return [(key, shares[key], worst[key], key in costs) for key in entry["predicted"]]


def draw(data: dict, out: Path, highlight: str | None = RECOMMENDED) -> Path:
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(8, 5))
    handles = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (suite, entry) in enumerate(data["suites"].items()):
        color = colors[i % len(colors)]
        got = points(entry)
        for _key, x, y, measured in got:
            ax.scatter(
                x,
                y,
                marker=MARKERS.get(suite, "o"),
                facecolors=color if measured else "none",
                edgecolors=color,
                s=36,
            )
        front = sorted((x, y) for key, x, y, _ in got if key in set(frontier(entry)))
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color, linewidth=1)
        handles.append(Line2D([], [], color=color, linewidth=1, marker=MARKERS.get(suite, "o"), label=suite))
        ringed = [(x, y) for key, x, y, _ in got if key == highlight]
        if ringed:
            ax.scatter(
                *zip(*ringed, strict=True), marker="o", facecolors="none", edgecolors="black", s=160, linewidths=1.2
            )
    if highlight:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="black",
                markersize=11,
                label=highlight,
            )
        )
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.axhline(-0.03, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("selection CPU-seconds, share of the full method's (hollow: predicted)")
    ax.set_ylabel("AUC - full method's AUC (worst target and direction)")
    ax.set_title("Cost against quality of a selection: gradient_layers x selection_checkpoints x prefilter")
    ax.legend(handles=handles, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--out", type=Path, default=FIGURE)
    p.add_argument("--highlight", default=RECOMMENDED, help="a setting key ringed on every suite ('' for none)")
    args = p.parse_args(argv)
    path = draw(json.loads(args.results.read_text()), args.out, args.highlight or None)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
