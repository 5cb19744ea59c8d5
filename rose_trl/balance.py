"""How the selection is shared between subtasks (`ROSEConfig.subtask_balance`).

- `max` (the paper): score(z) = max_j S(z, j), the top k rows overall. A subtask whose scores run higher
  (its pairs' gradients agree more with each other, say) can crowd the others out.
- `round_robin`: subtasks in turn (validation-set order) each take their best remaining row: equal shares.
- `proportional`: subtask j gets k * n_j / n of the rows (n_j of its n validation pairs; largest-remainder
  rounding, so the counts sum to k), taken in turns like round_robin.

k always comes from `selection.selection_size`. Every subtask ranks the whole pool, so a subtask can run
out of rows only when the pool does: with k <= n every quota is met and no row is taken twice.
"""

from __future__ import annotations

import logging

import numpy as np

from .selection import selection_size, top_fraction

logger = logging.getLogger(__name__)


def largest_remainder_quotas(k: int, weights: list[int]) -> np.ndarray:
    """Integer shares of k proportional to `weights`, summing to k: floors, then one more for the
    largest remainders (earlier subtask first on ties). Integer arithmetic: no float rounding."""
    weights = np.asarray(weights, dtype=np.int64)
    total = int(weights.sum())
    quotas, remainders = np.divmod(k * weights, total)
    extra = k - int(quotas.sum())
    quotas[np.argsort(-remainders, kind="stable")[:extra]] += 1
    return quotas


def take_in_turns(columns: np.ndarray, quotas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, taker): subtasks with quota left take, in turn, their best row not yet taken (ties: lower
    index). `columns` is [n, n_subtasks]."""
    n, n_subtasks = columns.shape
    orders = [np.lexsort((np.arange(n), -columns[:, j])) for j in range(n_subtasks)]
    taken = np.zeros(n, dtype=bool)
    position = np.zeros(n_subtasks, dtype=np.int64)
    left = np.asarray(quotas, dtype=np.int64).copy()
    rows, taker = [], []
    while left.any():
        for j in np.flatnonzero(left):
            while taken[orders[j][position[j]]]:
                position[j] += 1
            row = orders[j][position[j]]
            taken[row] = True
            rows.append(row)
            taker.append(j)
            left[j] -= 1
    return np.asarray(rows, dtype=np.int64), np.asarray(taker, dtype=np.int64)


def select_rows(table: dict[str, np.ndarray], subtasks: list[str], fraction: float, balance: str = "max",
                pair_counts: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(selected pool indices, best overall score first; the subtask each was selected for, or None when
    the table has no per-subtask scores). Under `max` a row counts for the subtask whose score is its max.
    A table without per-subtask scores (random, full) has nothing to balance: its top rows are taken."""
    if balance not in ("max", "round_robin", "proportional"):
        raise ValueError(f"unknown subtask_balance {balance!r}; use 'max', 'round_robin' or 'proportional'")
    scores = np.asarray(table["score"], dtype=np.float64)
    columns = [f"score_{name}" for name in subtasks]
    if not subtasks or not all(c in table for c in columns):
        if balance != "max":
            logger.warning("subtask_balance %r: the score table has no score_<subtask> column for each of %s "
                           "(columns: %s); taking the top rows by score", balance, subtasks, sorted(table))
        return top_fraction(scores, fraction), None
    if balance == "max":
        chosen = top_fraction(scores, fraction)
        per_subtask = np.stack([np.asarray(table[c], dtype=np.float64)[chosen] for c in columns], axis=1)
        return chosen, np.asarray(subtasks, dtype=object)[per_subtask.argmax(axis=1)]
    values = np.stack([np.asarray(table[c], dtype=np.float64) for c in columns], axis=1)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        raise FloatingPointError(f"non-finite subtask scores at pool indices {bad[:10].tolist()}")
    k = selection_size(len(scores), fraction)
    if balance == "round_robin":
        weights = [1] * len(subtasks)
    else:
        if pair_counts is None or any(pair_counts.get(name, 0) < 1 for name in subtasks):
            raise ValueError(f"subtask_balance 'proportional' needs the number of validation pairs of every subtask "
                             f"{subtasks}, got {pair_counts}")
        weights = [pair_counts[name] for name in subtasks]
    rows, taker = take_in_turns(values, largest_remainder_quotas(k, weights))
    order = np.lexsort((rows, -scores[rows]))  # saved best first, as under max
    return rows[order], np.asarray(subtasks, dtype=object)[taker[order]]
