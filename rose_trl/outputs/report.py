"""A self-contained HTML report of a finished selection run: `rose-trl report <output_dir>`.

Reads `<output_dir>/selection/` and every sibling `<output_dir>/selection_<method>/` (scores.parquet,
config.json, summary.json, selected/, and for gradient methods contributions.parquet and pairs.parquet)
and writes `<output_dir>/report.html` with the figures embedded as base64 PNGs, so the file can be
mailed or attached to an issue as is. Order: summary numbers, plots, why these rows (top examples
next to the pairs that pulled them in), the pairs that drive the selection, the comparison of
methods, then the full configuration, folded.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rose_trl.baselines.text import pool_text
from rose_trl.data.preferences import subsample_message
from rose_trl.data.sft import BadRecordError
from rose_trl.outputs.explain import (
    load_contributions,
    load_pairs,
    selected_for,
    shorten,
    top_contributor_counts,
    top_pairs,
)
from rose_trl.outputs.report_figures import checkpoint_agreement_figure, composition_figure, score_distribution_figure
from rose_trl.scoring.columns import SCORE, ScoreColumns
from rose_trl.utils.errors import BadInputError, InputNotFoundError


@dataclass
class SelectionRun:
    name: str
    path: Path
    scores: pd.DataFrame
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    selected: object = None  # datasets.Dataset of the selected rows, when saved

    @property
    def method(self) -> str:
        return str(self.summary.get("selection_method") or self.config.get("selection_method") or self.name)

    @property
    def columns(self) -> ScoreColumns:
        return ScoreColumns.read(self.scores.columns, self.summary.get("subtasks"))

    @property
    def subtask_columns(self) -> list[str]:
        return self.columns.subtask_columns

    @property
    def checkpoint_columns(self) -> list[str]:
        return list(self.columns.checkpoints)

    @property
    def owners(self) -> pd.Series | None:
        """pool_index -> the subtask each selected row was selected for (its best subtask under max)."""
        return selected_for(self.scores, self.summary.get("subtasks")) if self.subtask_columns else None

    @property
    def threshold(self) -> float | None:
        value = self.summary.get("threshold")
        if value is not None:
            return float(value)
        chosen = self.scores.loc[self.scores["selected"], "score"]
        return float(chosen.min()) if len(chosen) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def load_selection(path: str | Path) -> SelectionRun:
    path = Path(path)
    scores_path = path / "scores.parquet"
    if not scores_path.exists():
        raise InputNotFoundError(f"{scores_path} not found: not a finished selection folder")
    scores = pd.read_parquet(scores_path)
    missing = {"pool_index", "score", "selected"} - set(scores.columns)
    if missing:
        raise BadInputError(f"{scores_path} lacks columns {sorted(missing)}: not a selection folder's score table")
    scores["selected"] = scores["selected"].astype(bool)
    selected = None
    if (path / "selected").exists():
        from datasets import load_from_disk

        selected = load_from_disk(str(path / "selected"))
    return SelectionRun(
        path.name, path, scores, _read_json(path / "config.json"), _read_json(path / "summary.json"), selected
    )


def find_selections(output_dir: str | Path) -> list[SelectionRun]:
    """`selection/` first (the main run), then `selection_<method>/` folders by name."""
    output_dir = Path(output_dir)
    dirs = sorted(p for p in output_dir.glob("selection_*") if p.is_dir() and (p / "scores.parquet").exists())
    if (output_dir / "selection" / "scores.parquet").exists():
        dirs.insert(0, output_dir / "selection")
    return [load_selection(d) for d in dirs]


def checkpoint_agreement(run: SelectionRun) -> pd.DataFrame | None:
    cols = run.checkpoint_columns
    if len(cols) < 2:
        return None
    return run.scores[cols].corr(method="spearman")


# ------------------------------------------------------------------------------------ tables


def comparison_table(runs: list[SelectionRun]) -> pd.DataFrame:
    """One row per selection folder; overlap = |S ∩ S_main| / |S_main| with the first (main) run."""
    main = set(runs[0].scores.loc[runs[0].scores["selected"], "pool_index"].tolist())
    rows = []
    for run in runs:
        chosen = set(run.scores.loc[run.scores["selected"], "pool_index"].tolist())
        n_pool = int(run.summary.get("num_pool", len(run.scores)))
        rows.append(
            {
                "folder": run.name,
                "method": run.method,
                "num_pool": n_pool,
                "num_selected": len(chosen),
                "fraction": len(chosen) / n_pool if n_pool else float("nan"),
                "threshold": run.threshold if run.threshold is not None else float("nan"),
                f"overlap with {runs[0].name}": len(chosen & main) / len(main) if main else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def top_examples(run: SelectionRun, per_subtask: int = 5, max_chars: int = 400) -> dict[str, list[dict]]:
    """Highest-scoring selected rows per subtask they were selected for (or overall), with text snippets."""
    if run.selected is None or len(run.selected) == 0:
        return {}
    selected = run.selected
    by_index = {int(i): k for k, i in enumerate(selected["pool_index"])}
    scores = run.scores.set_index("pool_index")
    owners = run.owners
    groups = {}
    if owners is None:
        groups["all"] = ("score", list(by_index))
    else:
        for name in dict.fromkeys(owners.tolist()):
            groups[name] = (run.columns.subtask(name), [i for i in by_index if owners.get(i) == name])
    out = {}
    for name, (col, indices) in groups.items():
        ranked = sorted(indices, key=lambda i: -float(scores.at[i, col]))[:per_subtask]
        rows = []
        for i in ranked:
            record = selected[by_index[i]]
            try:
                text = pool_text(record, i)
            except BadRecordError:  # a pool without the usual text fields: show the row as saved
                text = json.dumps({k: v for k, v in record.items() if k not in ("pool_index", "score")}, default=str)
            rows.append(
                {
                    "pool_index": i,
                    "score": float(scores.at[i, col]),
                    "source": record.get("source"),
                    "text": text if len(text) <= max_chars else text[:max_chars] + " …",
                }
            )
        if rows:
            out[name] = rows
    return out


def summary_table(run: SelectionRun) -> pd.DataFrame:
    """The headline numbers of a selection."""
    n_pool = int(run.summary.get("num_pool", len(run.scores)))
    n_selected = int(run.scores["selected"].sum())
    rows = [
        ("method", run.method),
        ("pool rows", n_pool),
        ("selected rows", n_selected),
        ("fraction", n_selected / n_pool if n_pool else float("nan")),
        ("threshold (lowest selected score)", run.threshold if run.threshold is not None else float("nan")),
        ("subtask balance", run.summary.get("subtask_balance", "max")),
    ]
    if run.method == "rose":
        loss = run.config.get("validation_loss_type", ["sigmoid"])
        weights = run.config.get("validation_loss_weights")
        rows.append(
            (
                "validation loss",
                " + ".join(f"{w:g} * {t}" for t, w in zip(loss, weights, strict=True))
                if weights
                else " + ".join(loss),
            )
        )
    if run.config.get("validation_aggregation"):
        rows.append(("validation aggregation", run.config["validation_aggregation"]))
    return pd.DataFrame(rows, columns=["", "value"])


def score_statistics(run: SelectionRun) -> pd.DataFrame:
    """Mean, spread and range of `score` and each `score_<subtask>`, over the pool and over the selection."""
    selected = run.scores["selected"].to_numpy()
    rows = []
    for col in [SCORE] + run.subtask_columns:
        values = run.scores[col].to_numpy(dtype=float)
        picked = values[selected]
        values = values[np.isfinite(values)]  # a first pass (prefilter_fraction) leaves the rows it dropped unscored
        rows.append(
            {
                "score": col,
                "pool mean": values.mean(),
                "pool std": values.std(),
                "pool min": values.min(),
                "pool max": values.max(),
                "selected mean": picked.mean() if len(picked) else float("nan"),
                "selected min": picked.min() if len(picked) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def subtask_counts(run: SelectionRun, pairs: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per subtask: its validation pairs (usable ones) and the selected rows it was selected for."""
    owners = run.owners
    if owners is None:
        return None
    names = list(run.columns.subtasks)
    picks = owners.value_counts().reindex(names, fill_value=0)
    table = pd.DataFrame(
        {
            "subtask": names,
            "selected rows": picks.to_numpy(),
            "share of selection": picks.to_numpy() / max(len(owners), 1),
        }
    )
    if pairs is not None:
        table.insert(1, "validation pairs", pairs.groupby("subtask").size().reindex(names, fill_value=0).to_numpy())
        table.insert(
            2, "usable pairs", pairs[pairs["usable"]].groupby("subtask").size().reindex(names, fill_value=0).to_numpy()
        )
    return table


def why_these_rows(
    run: SelectionRun, per_subtask: int = 5, n_pairs: int = 3, max_chars: int = 300
) -> dict[str, list[dict]]:
    """`top_examples`, each with the `n_pairs` pairs of its subtask that contribute most to its score."""
    tops = top_examples(run, per_subtask, max_chars)
    indices = [r["pool_index"] for rows in tops.values() for r in rows]
    contributions = load_contributions(run.path, indices) if indices else None
    pairs = load_pairs(run.path)
    if contributions is None or pairs is None:
        return {}
    best = top_pairs(contributions, run.owners, n_pairs)
    for rows in tops.values():
        for r in rows:
            r["pairs"] = [
                {
                    "pair_index": int(c.pair_index),
                    "contribution": float(c.contribution),
                    **{
                        k: shorten(pairs.at[int(c.pair_index), k], max_chars // 2)
                        for k in ("prompt", "chosen", "rejected")
                    },
                }
                for c in best[best["pool_index"] == r["pool_index"]].itertuples()
            ]
    return tops


def driving_pairs(run: SelectionRun, max_chars: int = 120) -> pd.DataFrame | None:
    """`explain.top_contributor_counts` with the pairs' texts, shortened."""
    contributions = load_contributions(run.path)
    pairs = load_pairs(run.path)
    if contributions is None or pairs is None or run.owners is None:
        return None
    counts = top_contributor_counts(contributions, run.owners)
    for k in ("prompt", "chosen", "rejected"):
        counts[k] = [shorten(pairs.at[i, k], max_chars) for i in counts["pair_index"]]
    return counts


# ------------------------------------------------------------------------------------ HTML

# A backslash at a line's end continues the same line of CSS (the text is unchanged).
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;\
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}\
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f2f4f7}img{max-width:100%;display:block;margin:.6em 0}\
.snippet{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em}
.muted{color:#777}.flag{color:#b02a2a;font-weight:600}ol{margin:0;padding-left:1.2em}details{margin:1em 0}
summary{cursor:pointer;font-weight:600}
"""


def _img(b64: str, alt: str) -> str:
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
        f'<figcaption class="muted">{html.escape(alt)}</figcaption></figure>'
    )


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _table(df: pd.DataFrame, index: bool = False) -> str:
    head = ([""] if index else []) + [str(c) for c in df.columns]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for idx, rec in zip(df.index, df.itertuples(index=False), strict=True):
        cells = ([f"<th>{html.escape(str(idx))}</th>"] if index else []) + [
            f"<td>{html.escape(_fmt(v))}</td>" for v in rec
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


_SECRET = ("token", "key", "secret", "password")


def _key_values(d: dict) -> str:
    # A report gets shared; a config may carry credentials (e.g. a hub token).
    d = {k: ("***" if any(w in k.lower() for w in _SECRET) and v else v) for k, v in d.items()}
    return (
        _table(pd.DataFrame({"key": list(d), "value": [_fmt(v) for v in d.values()]}))
        if d
        else '<p class="muted">none</p>'
    )


def _why_html(run: SelectionRun) -> str:
    why = why_these_rows(run)
    if not why:
        return ""
    parts = [
        "<h2>Why these rows</h2>",
        "<p>The highest-scoring selected rows of each subtask, next to the three validation pairs of that subtask "
        "that contribute most to their score (the score is the mean of the subtask's pairs' contributions; "
        "<code>rose-trl explain &lt;output_dir&gt; &lt;pool_index&gt;</code> prints one row in full).</p>",
    ]
    for name, rows in why.items():
        parts.append(
            f"<h3>{html.escape(name)}</h3><table><tr><th>pool index</th><th>score</th><th>row</th>"
            "<th>top pairs: contribution, prompt / chosen / rejected</th></tr>"
        )
        for r in rows:
            pairs = "".join(
                f"<li><b>pair {p['pair_index']}</b> {p['contribution']:+.4g}<br>"
                f"<span class='muted'>prompt</span> {html.escape(p['prompt'])}<br>"
                f"<span class='muted'>chosen</span> {html.escape(p['chosen'])}<br>"
                f"<span class='muted'>rejected</span> {html.escape(p['rejected'])}</li>"
                for p in r["pairs"]
            )
            parts.append(
                f"<tr><td>{r['pool_index']}</td><td>{r['score']:.4g}</td>"
                f'<td class="snippet">{html.escape(r["text"])}</td><td><ol>{pairs}</ol></td></tr>'
            )
        parts.append("</table>")
    return "\n".join(parts)


def _driving_pairs_html(run: SelectionRun) -> str:
    counts = driving_pairs(run)
    if counts is None:
        return ""
    flagged = counts[counts["flagged"]]
    parts = [
        "<h2>Pairs that drive the selection</h2>",
        "<p>Per validation pair: for how many selected rows it is the top contributor among the pairs of the "
        "subtask the row was selected for. A pair that is the top contributor for more than half of its "
        "subtask's picks is flagged: check it is not mislabelled or unrepresentative.</p>",
    ]
    if len(flagged):
        parts.append(
            '<p class="flag">Flagged: '
            + ", ".join(
                f"pair {r.pair_index} ({html.escape(str(r.subtask))}: {r.top_for} of {r.subtask_picks})"
                for r in flagged.itertuples()
            )
            + "</p>"
        )
    head = [
        "pair",
        "subtask",
        "top contributor for",
        "of the subtask's picks",
        "share",
        "",
        "prompt",
        "chosen",
        "rejected",
    ]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in counts.itertuples():
        cells = [
            r.pair_index,
            html.escape(str(r.subtask)),
            r.top_for,
            r.subtask_picks,
            f"{r.share:.0%}",
            '<span class="flag">&gt; half</span>' if r.flagged else "",
            html.escape(r.prompt),
            html.escape(r.chosen),
            html.escape(r.rejected),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("<table>" + "".join(rows) + "</table>")
    return "\n".join(parts)


def _top_examples_html(run: SelectionRun) -> str:
    parts = ["<h2>Top examples per subtask</h2>"]
    tops = top_examples(run)
    if not tops:
        parts.append('<p class="muted">No saved selected/ rows.</p>')
    for name, rows in tops.items():
        parts.append(
            f"<h3>{html.escape(name)}</h3>"
            "<table><tr><th>pool index</th><th>score</th><th>source</th><th>text</th></tr>"
        )
        for r in rows:
            parts.append(
                f"<tr><td>{r['pool_index']}</td><td>{r['score']:.4g}</td>"
                f"<td>{html.escape(str(r['source'] or ''))}</td>"
                f'<td class="snippet">{html.escape(r["text"])}</td></tr>'
            )
        parts.append("</table>")
    return "\n".join(parts)


def agreement_table(run: SelectionRun) -> pd.DataFrame | None:
    """summary.json's validation_agreement (agreement.py) as a table, one row per subtask."""
    report = run.summary.get("validation_agreement")
    if not report:
        return None

    def fmt(v, d):
        return "-" if v is None else f"{v:.{d}f}"

    return pd.DataFrame(
        [
            {
                "subtask": name,
                "validation pairs": s["pairs"],
                "agreement (mean gradient cosine)": fmt(s["agreement"], 3),
                "reliability": fmt(s["reliability"], 2),
                "pairs for the threshold": s["pairs_needed"] if s["pairs_needed"] is not None else "-",
                "agrees": {True: "yes", False: "no", None: "one pair"}[s["agrees"]],
            }
            for name, s in report.items()
        ]
    )


def _agreement_html(run: SelectionRun) -> list[str]:
    table = agreement_table(run)
    if table is None:
        return []
    threshold = next(iter(run.summary["validation_agreement"].values()))["threshold"]
    parts = [
        "<h3>Do the validation pairs agree?</h3>",
        f'<p class="muted">Reliability = k a / (1 + (k - 1) a) for k pairs agreeing at a: the share of a subtask\'s '
        f"target that its pairs have in common. Under {threshold:.2f} (measured: docs/results/shots_sweep.md) "
        "another draw of as many pairs would pick mostly other rows.</p>",
        _table(table),
    ]
    parts += [f'<p class="flag">{html.escape(w)}</p>' for w in run.summary.get("agreement_warnings", [])]
    return parts


def render_report(runs: list[SelectionRun], title: str = "ROSE selection report") -> str:
    if not runs:
        raise ValueError("no selection folder with scores.parquet to report on")
    main = runs[0]
    pairs = load_pairs(main.path)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="muted">{html.escape(str(main.path.parent))} — main selection: '
        f"<b>{html.escape(main.name)}</b> ({html.escape(main.method)})</p>",
    ]
    parts += [
        "<h2>Summary</h2>",
        _table(summary_table(main)),
        "<h3>Score statistics</h3>",
        _table(score_statistics(main)),
    ]
    counts = subtask_counts(main, pairs)
    if counts is not None:
        parts += ["<h3>Selected rows per subtask</h3>", _table(counts)]
    parts += _agreement_html(main)
    if main.summary.get("validation_subsample"):
        message = subsample_message(main.summary["validation_subsample"], "the validation set")
        parts.append(f'<p class="flag">{html.escape(message)}</p>')
    if main.summary.get("left_out_pairs"):
        parts.append(
            f'<p class="flag">Validation pairs {html.escape(str(main.summary["left_out_pairs"]))} have a zero '
            f"gradient (checkpoint: pairs {html.escape(json.dumps(main.summary.get('zero_gradient_pairs')))}) "
            "and are left out of their subtask's mean.</p>"
        )

    parts += [
        "<h2>Score distribution</h2>",
        _img(score_distribution_figure(main), f"{main.name} score distribution and threshold"),
    ]

    parts.append("<h2>Composition of the selection</h2>")
    comp = composition_figure(main)
    parts.append(
        _img(
            comp,
            "selection composition by source and subtask (pool: best subtask; selection: the subtask "
            "each row was selected for)",
        )
        if comp
        else '<p class="muted">No `source` column and no per-subtask scores.</p>'
    )

    parts.append("<h2>Agreement between checkpoints</h2>")
    corr = checkpoint_agreement(main)
    if corr is None:
        parts.append('<p class="muted">Fewer than two score_ckpt&lt;i&gt; columns.</p>')
    else:
        parts += [
            _img(checkpoint_agreement_figure(corr), "Spearman correlation between checkpoint scores"),
            _table(corr, index=True),
        ]

    why = _why_html(main)
    if why:
        parts += [why, _driving_pairs_html(main)]
    else:
        parts += [
            _top_examples_html(main),
            f'<p class="muted">{html.escape(main.name)} has no per-pair contributions ({html.escape(main.method)} '
            "is not a gradient method, or the folder predates them).</p>",
        ]

    if len(runs) > 1:
        parts += ["<h2>Comparison of selection methods</h2>", _table(comparison_table(runs))]
        parts += [
            _img(score_distribution_figure(run), f"{run.name} score distribution and threshold") for run in runs[1:]
        ]

    parts += [
        "<h2>Configuration</h2>",
        f"<details><summary>Full configuration of {html.escape(main.name)} ({len(main.config)} options)</summary>",
        _key_values(main.config),
        "</details>",
    ]
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def write_report(output_dir: str | Path, path: str | Path | None = None) -> Path:
    """Render the report of `output_dir`'s selection folders to `path` (default `<output_dir>/report.html`)."""
    output_dir = Path(output_dir)
    out = Path(path) if path is not None else output_dir / "report.html"
    runs = find_selections(output_dir)
    if not runs:
        raise InputNotFoundError(
            f"no selection/ or selection_<method>/ folder with scores.parquet in {output_dir}: give the output_dir "
            "of a finished run (the folder that holds selection/)"
        )
    out.write_text(render_report(runs), encoding="utf-8")
    return out


def add_report_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write an HTML report of a finished selection run")
    parser.add_argument("output_dir", help="the run's output directory (holds selection/ and selection_<method>/)")
    parser.add_argument("--output", default=None, help="where to write the HTML (default: <output_dir>/report.html)")
    parser.set_defaults(func=lambda args: print(write_report(args.output_dir, args.output)))
