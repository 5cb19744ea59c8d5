"""Why was this row picked: exact per-pair contributions of the selected rows, and `rose-trl explain`.

For a selected pool row z and a validation pair p of subtask j,

    c(z, p) = sum_i eta_i * <v_{i,p}, unit(train_{i,z})>

with eta the renormalized checkpoint weights of the scoring and v_{i,p} = scoring.pair_vectors at
checkpoint i, whose mean over the usable pairs of j is the subtask's target. So, exactly (by construction:
scoring.py computes both with one formula), score_j(z) = mean over the usable pairs p of j of c(z, p):
- under `normalized_mean`, v = unit(g_p) and c(z, p) is the checkpoint-weighted cosine between the
  pair's validation gradient and the row's training gradient;
- under `eq6`, v = g_p / |mean_{p' in j} g_p'| and c(z, p) is the pair's raw gradient along the row's
  direction, in units of the norm of the subtask's mean gradient (a pair with a large gradient can
  then carry its subtask alone).

Written into the selection folder before it is published (selection.write_selection's `before_publish`):
    contributions.parquet   pool_index, pair_index, subtask, contribution: selected rows x usable pairs
    pairs.parquet           pair_index, subtask, prompt, chosen, rejected (text), usable
Only the selected rows are read back from the stores, sorted, in bounded chunks, all checkpoints in
lockstep (scoring.contribution_chunks; benchmarks/speed/contributions.py measures the cost).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rose_trl.scoring.agreement import WHAT_HELPS
from rose_trl.scoring.columns import ScoreColumns
from rose_trl.scoring.scores import CheckpointGradients, contribution_chunks
from rose_trl.utils.errors import UserError


CONTRIBUTIONS = "contributions.parquet"
PAIRS = "pairs.parquet"


def _text(value) -> str:
    # conversational pairs hold lists of messages
    return "\n".join(f"{m['role']}: {m['content']}" for m in value) if isinstance(value, list) else str(value)


def write_contributions(
    folder: str | Path,
    checkpoints: list[CheckpointGradients],
    rows: np.ndarray,
    validation,
    usable: np.ndarray,
    chunk_rows: int | None = None,
    progress: bool = False,
) -> None:
    """contributions.parquet and pairs.parquet in `folder`, for the selected pool `rows`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if any(c.pair_vectors is None for c in checkpoints):
        raise ValueError("contributions need every checkpoint's pair_vectors")
    folder = Path(folder)
    subtasks = np.asarray(validation["subtask"], dtype=object)
    pairs = np.flatnonzero(usable)
    pd.DataFrame(
        {
            "pair_index": np.arange(len(validation)),
            "subtask": subtasks.astype(str),
            "prompt": [_text(v) for v in validation["prompt"]],
            "chosen": [_text(v) for v in validation["chosen"]],
            "rejected": [_text(v) for v in validation["rejected"]],
            "usable": np.asarray(usable, dtype=bool),
        },
    ).to_parquet(folder / PAIRS, index=False)
    schema = pa.schema(
        [
            ("pool_index", pa.int64()),
            ("pair_index", pa.int32()),
            ("subtask", pa.string()),
            ("contribution", pa.float64()),
        ]
    )
    bar = tqdm(total=len(rows), desc="Contributions", unit="row", disable=not progress)
    with pq.ParquetWriter(folder / CONTRIBUTIONS, schema) as writer:
        for chunk, values in contribution_chunks(checkpoints, rows, pairs, chunk_rows):
            writer.write_table(
                pa.table(
                    {
                        "pool_index": np.repeat(chunk, len(pairs)),
                        "pair_index": np.tile(pairs, len(chunk)).astype(np.int32),
                        "subtask": np.tile(subtasks[pairs], len(chunk)).astype(str),
                        "contribution": values.reshape(-1),
                    },
                    schema=schema,
                )
            )
            bar.update(len(chunk))
    bar.close()


# ---------------------------------------------------------------------------------- reading


def load_contributions(folder: str | Path, pool_indices=None) -> pd.DataFrame | None:
    """The folder's contributions (of `pool_indices` only, when given), or None when it has none."""
    path = Path(folder) / CONTRIBUTIONS
    if not path.exists():
        return None
    filters = None if pool_indices is None else [("pool_index", "in", [int(i) for i in pool_indices])]
    return pd.read_parquet(path, filters=filters)


def load_pairs(folder: str | Path) -> pd.DataFrame | None:
    path = Path(folder) / PAIRS
    return pd.read_parquet(path).set_index("pair_index") if path.exists() else None


def shorten(text: str, max_chars: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def top_pairs(contributions: pd.DataFrame, owners: pd.Series, n: int = 3) -> pd.DataFrame:
    """The `n` largest contributions to each row from the pairs of the subtask it was selected for
    (`owners`: pool_index -> subtask, see `selected_for`), largest first."""
    frame = contributions[
        contributions["subtask"].to_numpy() == owners.reindex(contributions["pool_index"]).to_numpy()
    ]
    frame = frame.sort_values(["pool_index", "contribution", "pair_index"], ascending=[True, False, True])
    return frame.groupby("pool_index", sort=False).head(n)


def top_contributor_counts(contributions: pd.DataFrame, owners: pd.Series) -> pd.DataFrame:
    """Per pair: for how many selected rows it is the top contributor among the pairs of the row's subtask
    (`owners`: pool_index -> subtask), out of that subtask's picks; `flagged` when it is more than half."""
    top = top_pairs(contributions, owners, n=1)
    pairs = contributions.drop_duplicates("pair_index")[["pair_index", "subtask"]]
    picks = owners.value_counts().reindex(pairs["subtask"], fill_value=0).to_numpy()
    top_for = top["pair_index"].value_counts().reindex(pairs["pair_index"], fill_value=0).to_numpy()
    out = pd.DataFrame(
        {
            "pair_index": pairs["pair_index"].to_numpy(),
            "subtask": pairs["subtask"].to_numpy(),
            "top_for": top_for,
            "subtask_picks": picks,
            "share": top_for / np.maximum(picks, 1),
        }
    )
    out["flagged"] = out["share"] > 0.5
    return out.sort_values(["subtask", "top_for", "pair_index"], ascending=[True, False, True], ignore_index=True)


def selected_for(scores: pd.DataFrame, subtasks: list[str] | None = None) -> pd.Series | None:
    """pool_index -> the subtask each selected row was taken for (older folders: its best subtask); None
    without per-subtask scores. `subtasks`: summary.json's (columns.ScoreColumns.read)."""
    chosen = scores[scores["selected"]]
    if "selected_for" in chosen.columns:
        return pd.Series(chosen["selected_for"].astype(str).to_numpy(), index=chosen["pool_index"].to_numpy())
    columns = ScoreColumns.read(scores.columns, subtasks)
    if not columns.subtasks:
        return None
    best = chosen[columns.subtask_columns].to_numpy(dtype=float).argmax(axis=1)
    return pd.Series(np.asarray(columns.subtasks, dtype=object)[best], index=chosen["pool_index"].to_numpy())


# ---------------------------------------------------------------------------------- rose-trl explain


class ExplainError(UserError, ValueError):
    """The row or the folder cannot be explained at all (unknown index, no selection folder)."""


def explain_row(
    output_dir: str | Path, pool_index: int, folder: str = "selection", top: int = 3, max_chars: int = 300
) -> tuple[str, str | None]:
    """(the row's explanation, a problem or None): its scores always; for a selected row of a gradient
    method, its top pairs with their texts and contributions."""
    path = Path(output_dir) / folder
    if not (path / "scores.parquet").exists():
        raise ExplainError(f"{path} is not a finished selection folder (no scores.parquet)")
    scores = pd.read_parquet(path / "scores.parquet")
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
    hit = scores[scores["pool_index"] == pool_index]
    if hit.empty:
        raise ExplainError(
            f"pool index {pool_index} is not in {path}: the pool has {len(scores)} rows (0..{len(scores) - 1})"
        )
    row = hit.iloc[0]
    method = summary.get("selection_method", "?")
    columns = ScoreColumns.read(scores.columns, summary.get("subtasks"))
    lines = [f"pool row {pool_index} in {path} ({method}, subtask_balance {summary.get('subtask_balance', 'max')})"]
    rank = int((scores["score"] > row["score"]).sum()) + 1
    lines.append(
        f"  score {row['score']:.6g} (rank {rank} of {len(scores)}; selection threshold "
        f"{summary.get('threshold', float('nan')):.6g})"
    )
    if columns.subtasks:
        lines.append(
            "  per-subtask scores: " + ", ".join(f"{s} {row[columns.subtask(s)]:.6g}" for s in columns.subtasks)
        )
    if bool(row.get("prefiltered_out", False)):
        first = scores["prefilter_score"]
        rank = int((first > row["prefilter_score"]).sum()) + 1
        lines.append(
            f"  left out by the first pass (prefilter_fraction {summary.get('prefilter', {}).get('fraction')}): its "
            f"first-pass score {row['prefilter_score']:.6g} ranks {rank} of {len(scores)}, so its full features were "
            "not computed"
        )
    if not bool(row["selected"]):
        lines.append("  not selected")
        return "\n".join(lines), (
            f"row {pool_index} was not selected, so it has no contributions: only selected rows are explained"
        )
    owners = selected_for(scores, summary.get("subtasks"))
    owner = None if owners is None else owners.get(pool_index)
    lines.append("  selected" + (f", for subtask {owner!r}" if owner is not None else ""))
    if (path / "selected").exists():
        from datasets import load_from_disk

        from rose_trl.baselines.text import pool_text

        rows = load_from_disk(str(path / "selected"))
        record = rows[rows["pool_index"].index(pool_index)]
        lines.append("  text: " + shorten(pool_text(record, pool_index), max_chars))
    contributions = load_contributions(path, [pool_index])
    if contributions is None:
        return "\n".join(lines), (
            f"{path} has no {CONTRIBUTIONS}: {method} is not a gradient method, only rose and "
            "less selections are explained pair by pair"
        )
    pairs = load_pairs(path)
    mine = contributions[contributions["subtask"] == owner]
    agreement = (summary.get("validation_agreement") or {}).get(owner)
    if agreement is not None:
        lines.append(agreement_line(owner, agreement))
    lines.append(
        f"  {columns.subtask(owner)} = mean of the contributions of its {len(mine)} pairs = "
        f"{mine['contribution'].mean():.6g}"
    )
    lines.append(f"  top {min(top, len(mine))} pairs of {owner!r}:")
    for _, c in top_pairs(contributions, pd.Series({pool_index: owner}), top).iterrows():
        pair = pairs.loc[int(c["pair_index"])]
        lines += [
            f"    pair {int(c['pair_index'])}: contribution {c['contribution']:+.6g}",
            f"      prompt:   {shorten(pair['prompt'], max_chars)}",
            f"      chosen:   {shorten(pair['chosen'], max_chars)}",
            f"      rejected: {shorten(pair['rejected'], max_chars)}",
        ]
    left_out = summary.get("left_out_pairs") or []
    if left_out:
        lines.append(f"  pairs {left_out} have a zero validation gradient and are left out of every mean")
    return "\n".join(lines), None


def agreement_line(subtask: str, s: dict) -> str:
    """How much the subtask's validation pairs agree (summary.json's validation_agreement), and the warning."""
    if s["agrees"] is None:
        return (
            f"  warning: {subtask!r} has a single validation pair: its agreement cannot be measured and the picks "
            f"follow that one pair. What helps: {WHAT_HELPS}"
        )
    text = (
        f"  validation pairs of {subtask!r}: {s['pairs']}, agreement {s['agreement']:+.3f}, reliability "
        f"{s['reliability']:.2f} (threshold {s['threshold']:.2f})"
    )
    if not s["agrees"]:
        need = f"; about {s['pairs_needed']} such pairs would reach it" if s["pairs_needed"] else ""
        text += (
            f"\n  warning: the pairs do not agree: the picks follow single pairs rather than what they share{need}."
            f" What helps: {WHAT_HELPS}"
        )
    return text


def _explain(args) -> int:
    text, problem = explain_row(args.output_dir, args.pool_index, args.folder, args.top)  # ExplainError: exit 2
    print(text)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def add_explain_parser(subparsers) -> None:
    p = subparsers.add_parser("explain", help="print why one pool row was selected: its scores and top pairs")
    p.add_argument("output_dir", help="the run's output directory")
    p.add_argument("pool_index", type=int, help="the row's index in the pool")
    p.add_argument("--folder", default="selection", help="selection folder under output_dir (default: selection)")
    p.add_argument("--top", type=int, default=3, help="how many of its subtask's pairs to show (default: 3)")
    p.set_defaults(func=_explain)
