"""Score table -> top fraction of the pool -> the selection folder, written atomically.

    <output_dir>/selection/
        scores.parquet   pool_index, score, score_<subtask>..., [score_ckpt<i>...], [source], selected
        selected/        datasets.Dataset.save_to_disk: selected pool rows + pool_index + score, best first
        config.json      the run's configuration
        summary.json     num_pool, num_selected, selection_method, subtasks, threshold, score stats
        fingerprint.json sha256 of all of the above: a re-run that would write the same folder leaves it as it is
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np


def check_fraction(fraction: float, name: str = "selection_fraction") -> float:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")
    return float(fraction)


def top_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the best ceil(fraction * n) rows, highest score first, ties broken by lower index."""
    check_fraction(fraction)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("cannot select from an empty pool")
    if not np.isfinite(scores).all():
        raise FloatingPointError(f"non-finite scores at pool indices {np.flatnonzero(~np.isfinite(scores))[:10].tolist()}")
    k = max(1, math.ceil(fraction * len(scores) - 1e-9))
    if k == len(scores) and fraction < 1:
        # Rounding up made a strict fraction take everything: the pool is too small to select from.
        raise ValueError(f"a pool of {len(scores)} rows is too small for selection_fraction={fraction}: "
                         f"ceil({fraction} * {len(scores)}) = {k} selects the whole pool")
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Swap the finished folder in; a reader sees the old complete folder or the new one, never half."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


FINGERPRINT_FILE = "fingerprint.json"


def selection_fingerprint(pool, table: dict[str, np.ndarray], chosen: np.ndarray, fraction: float, config: dict,
                          method: str, subtasks: list[str]) -> str:
    """sha256 of everything a selection folder is made of: the score table, the selected rows, the pool's
    `source` column and the configuration."""
    h = hashlib.sha256()
    for name, values in table.items():
        values = np.ascontiguousarray(values)
        h.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        h.update(values.tobytes())
    h.update(np.asarray(chosen, dtype=np.int64).tobytes())
    parts = [pool.select(chosen.tolist())] + ([pool.select_columns(["source"])] if "source" in pool.column_names else [])
    for part in parts:
        for batch in part.iter(batch_size=1024):
            h.update(json.dumps(batch, sort_keys=True, default=str).encode())
    h.update(json.dumps([fraction, config, method, list(subtasks)], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _holds(folder: Path, fingerprint: str) -> bool:
    path = folder / FINGERPRINT_FILE
    return path.exists() and json.loads(path.read_text()).get("sha256") == fingerprint


def write_selection(output_dir: str | Path, pool, table: dict[str, np.ndarray], fraction: float, config: dict,
                    method: str, subtasks: list[str], folder: str = "selection") -> Path:
    """Select the top `fraction` of `pool` (a datasets.Dataset of original rows) by `table["score"]`."""
    import pandas as pd

    scores = np.asarray(table["score"], dtype=np.float64)
    if len(scores) != len(pool):
        raise ValueError(f"{len(scores)} scores for a pool of {len(pool)} rows")
    chosen = top_fraction(scores, fraction)
    final = Path(output_dir) / folder
    fingerprint = selection_fingerprint(pool, table, chosen, fraction, config, method, subtasks)
    if _holds(final, fingerprint):
        return final  # a re-run: the folder already holds exactly this selection, left untouched
    tmp = _atomic_dir(final)
    frame = pd.DataFrame({"pool_index": np.arange(len(scores)), **{k: np.asarray(v) for k, v in table.items()}})
    if "source" in pool.column_names:  # lets reports compare the selection's composition with the pool's
        frame["source"] = pd.Series(pool["source"], dtype="string")
    frame["selected"] = False
    frame.loc[chosen, "selected"] = True
    frame.to_parquet(tmp / "scores.parquet", index=False)
    drop = [c for c in ("input_ids", "completion_mask", "pool_index", "score") if c in pool.column_names]
    selected = pool.remove_columns(drop).select(chosen.tolist())
    selected = selected.add_column("pool_index", chosen.tolist()).add_column("score", scores[chosen].tolist())
    selected.save_to_disk(str(tmp / "selected"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    picked = scores[chosen]
    summary = {
        "selection_method": method, "num_pool": len(scores), "num_selected": len(chosen),
        "selection_fraction": fraction, "subtasks": list(subtasks), "threshold": float(picked.min()),
        "score_stats": {"pool_mean": float(scores.mean()), "pool_min": float(scores.min()), "pool_max": float(scores.max()),
                        "selected_mean": float(picked.mean())},
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    (tmp / FINGERPRINT_FILE).write_text(json.dumps({"sha256": fingerprint}))
    _publish(tmp, final)
    return final
