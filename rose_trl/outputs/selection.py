"""Score table -> top fraction of the pool -> the selection folder, written atomically.

<output_dir>/selection/
    scores.parquet   pool_index, score, score_<subtask>..., [score_ckpt<i>...], [source], selected,
                     [selected_for: the subtask a selected row was taken for]
    selected/        datasets.Dataset.save_to_disk: selected pool rows + pool_index + score, best first
    config.json      the run's configuration
    summary.json     num_pool, num_selected, selection_method, subtasks, threshold, score stats,
                     subtask_balance, subtask_counts
    ...              what `before_publish` adds (gradient methods: contributions.parquet, pairs.parquet)
    fingerprint.json sha256 of all of the above: a re-run that would write the same folder leaves it as it is
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rose_trl.scoring.columns import SCORE
from rose_trl.scoring.scores import select_rows
from rose_trl.utils.files import atomic_dir, publish
from rose_trl.utils.timing import stage


FINGERPRINT_FILE = "fingerprint.json"


def selection_fingerprint(
    pool,
    table: dict[str, np.ndarray],
    chosen: np.ndarray,
    fraction: float,
    config: dict,
    method: str,
    subtasks: list[str],
    balance: tuple = (),
) -> str:
    """sha256 of everything a selection folder is made of: the score table, the selected rows, the pool's
    `source` column, the configuration and how the rows were shared between subtasks (`balance`). The
    contributions derive from the same stores and learning rates as the score table."""
    h = hashlib.sha256()
    for name, values in table.items():
        values = np.ascontiguousarray(values)
        h.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        h.update(values.tobytes())
    h.update(np.asarray(chosen, dtype=np.int64).tobytes())
    parts = [pool.select(chosen.tolist())] + (
        [pool.select_columns(["source"])] if "source" in pool.column_names else []
    )
    for part in parts:
        for batch in part.iter(batch_size=1024):
            h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    h.update(json.dumps([fraction, config, method, list(subtasks), balance], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _holds(folder: Path, fingerprint: str) -> bool:
    path = folder / FINGERPRINT_FILE
    return path.exists() and json.loads(path.read_text()).get("sha256") == fingerprint


@stage("selection writing")
def write_selection(
    output_dir: str | Path,
    pool,
    table: dict[str, np.ndarray],
    fraction: float,
    config: dict,
    method: str,
    subtasks: list[str],
    folder: str = "selection",
    subtask_balance: str = "max",
    pair_counts: dict[str, int] | None = None,
    before_publish: Callable[[Path, np.ndarray], dict] | None = None,
) -> Path:
    """Select `fraction` of `pool` (a datasets.Dataset of original rows): the top rows by `table["score"]`,
    or shared between subtasks by `subtask_balance` (balance.py; `pair_counts`: validation pairs per
    subtask). `before_publish(folder, selected indices)` writes more files into the unpublished folder
    and returns entries for summary.json."""
    import pandas as pd

    scores = np.asarray(table[SCORE], dtype=np.float64)
    if len(scores) != len(pool):
        raise ValueError(f"{len(scores)} scores for a pool of {len(pool)} rows")
    chosen, selected_for = select_rows(table, subtasks, fraction, subtask_balance, pair_counts)
    final = Path(output_dir) / folder
    fingerprint = selection_fingerprint(
        pool,
        table,
        chosen,
        fraction,
        config,
        method,
        subtasks,
        balance=(subtask_balance, dict(pair_counts or {}), None if selected_for is None else list(selected_for)),
    )
    if _holds(final, fingerprint):
        return final  # a re-run: the folder already holds exactly this selection, left untouched
    tmp = atomic_dir(final)
    frame = pd.DataFrame({"pool_index": np.arange(len(scores)), **{k: np.asarray(v) for k, v in table.items()}})
    if "source" in pool.column_names:  # lets reports compare the selection's composition with the pool's
        frame["source"] = pd.Series(pool["source"], dtype="string")
    frame["selected"] = False
    frame.loc[chosen, "selected"] = True
    if selected_for is not None:
        frame["selected_for"] = pd.Series(pd.NA, index=frame.index, dtype="string")
        frame.loc[chosen, "selected_for"] = selected_for
    frame.to_parquet(tmp / "scores.parquet", index=False)
    drop = [c for c in ("input_ids", "completion_mask", "pool_index", "score") if c in pool.column_names]
    selected = pool.remove_columns(drop).select(chosen.tolist())
    selected = selected.add_column("pool_index", chosen.tolist()).add_column("score", scores[chosen].tolist())
    selected.save_to_disk(str(tmp / "selected"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    picked = scores[chosen]
    summary = {
        "selection_method": method,
        "num_pool": len(scores),
        "num_selected": len(chosen),
        "selection_fraction": fraction,
        "subtasks": list(subtasks),
        "threshold": float(picked.min()),
        # over the scored rows (a first pass, prefilter_fraction, leaves the others unscored: NaN)
        "score_stats": {
            "pool_mean": float(np.nanmean(scores)),
            "pool_min": float(np.nanmin(scores)),
            "pool_max": float(np.nanmax(scores)),
            "selected_mean": float(picked.mean()),
        },
        "subtask_balance": subtask_balance,
        "subtask_counts": None
        if selected_for is None
        else {name: int((selected_for == name).sum()) for name in subtasks},
    }
    if before_publish is not None:
        summary.update(before_publish(tmp, chosen) or {})
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / FINGERPRINT_FILE).write_text(json.dumps({"sha256": fingerprint}))
    publish(tmp, final)
    return final
