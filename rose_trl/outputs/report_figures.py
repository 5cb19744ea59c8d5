"""The report's figures (report.py), as base64 PNGs. Each takes a `report.SelectionRun`."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg and never touches a display


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def score_distribution_figure(run) -> str:
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    scores = run.scores["score"].to_numpy(dtype=float)
    selected = run.scores["selected"].to_numpy()
    finite = np.isfinite(scores)
    # Shared bin edges, stacked: the selected tail sits on the same axis as the rest of the pool.
    edges = np.histogram_bin_edges(scores[finite], bins=50 if np.ptp(scores[finite]) > 0 else 1)
    ax.hist(
        [scores[finite & ~selected], scores[finite & selected]],
        bins=edges,
        stacked=True,
        color=["#9aa7b8", "#d9534f"],
        label=["not selected", "selected"],
    )
    if run.threshold is not None and math.isfinite(run.threshold):
        ax.axvline(run.threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {run.threshold:.4g}")
    ax.set_xlabel("score")
    ax.set_ylabel("pool rows")
    ax.set_title(f"{run.name}: score distribution ({run.method})")
    ax.legend(fontsize=8)
    return _png(fig)


def best_subtask(run) -> pd.Series | None:
    columns = run.columns
    if not columns.subtasks:
        return None
    values = run.scores[columns.subtask_columns].to_numpy(dtype=float)
    values = np.where(np.isnan(values), -np.inf, values)  # a missing subtask score never wins
    return pd.Series(np.asarray(columns.subtasks, dtype=object)[np.argmax(values, axis=1)], index=run.scores.index)


def _share_bars(ax, pool_counts: pd.Series | None, selected_counts: pd.Series, title: str) -> None:
    labels = list(selected_counts.index if pool_counts is None else pool_counts.index.union(selected_counts.index))
    y = np.arange(len(labels))
    sel = selected_counts.reindex(labels, fill_value=0)
    if pool_counts is not None:
        pool = pool_counts.reindex(labels, fill_value=0)
        ax.barh(y + 0.2, pool / max(pool.sum(), 1), height=0.4, color="#9aa7b8", label="pool")
        ax.barh(y - 0.2, sel / max(sel.sum(), 1), height=0.4, color="#d9534f", label="selected")
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.06), ncol=2, frameon=False)
    else:
        ax.barh(y, sel / max(sel.sum(), 1), height=0.6, color="#d9534f")
    ax.set_yticks(y, [str(label) for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows")
    ax.set_title(title, fontsize=10)


def composition_figure(run) -> str | None:
    """Pool vs selected rows by `source` (selected/ alone in older layouts) and by best subtask."""
    panels = []
    if "source" in run.scores.columns:
        source = run.scores["source"].astype(str)
        panels.append(("source", source.value_counts(), source[run.scores["selected"]].value_counts()))
    elif run.selected is not None and "source" in run.selected.column_names:
        panels.append(("source", None, pd.Series(run.selected["source"]).astype(str).value_counts()))
    subtask = best_subtask(run)
    if subtask is not None:  # the pool by best subtask, the selection by the subtask each row was taken for
        panels.append(("subtask", subtask.value_counts(), run.owners.value_counts()))
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels), 0.35 * max(len(p[2]) for p in panels) + 2))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (what, pool, sel) in zip(axes, panels, strict=True):
        _share_bars(ax, pool, sel, f"selection by {what}")
    return _png(fig)


def checkpoint_agreement_figure(corr: pd.DataFrame) -> str:
    fig = Figure(figsize=(1.1 * len(corr) + 2, 1.0 * len(corr) + 1.2))
    ax = fig.subplots()
    im = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [f"ckpt{i}" for i in range(len(corr.columns))]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(corr)):
        for j in range(len(corr)):
            value = corr.iat[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(value) > 0.6 else "black",
            )
    ax.set_title("Spearman correlation of checkpoint scores", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)
