"""Scores from gradient stores, and which rows they select: the formula lives here, once.

For a pool row z, a checkpoint i (learning rate eta_i, renormalized to sum to 1) and a validation pair p of
subtask j, with v_{i,p} the pair's vector (`pair_vectors`) and train_{i,z} the row's training gradient:

    c(z, p)  = sum_i eta_i * <v_{i,p}, unit(train_{i,z})>          the pair's contribution (`contribution_chunks`)
    S(z, j)  = sum_i eta_i * <target_{i,j}, unit(train_{i,z})>     target_{i,j} = mean of v_{i,p} over j's usable pairs
    score(z) = max_j S(z, j)                                       (`score_checkpoints`)

Both go through `unit_dots` with the same weights, and the target is the mean of the vectors, so
S(z, j) = mean over the usable pairs p of j of c(z, p): what `rose-trl explain` shows, by construction.
The selection takes the top rows by score, or shares them between subtasks (`select_rows`):
- `max` (the paper): score(z) = max_j S(z, j), the top k rows overall. A subtask whose scores run higher
  (its pairs' gradients agree more with each other, say) can crowd the others out.
- `round_robin`: subtasks in turn (validation-set order) each take their best remaining row: equal shares.
- `proportional`: subtask j gets k * n_j / n of the rows (n_j of its n validation pairs; largest-remainder
  rounding, so the counts sum to k), taken in turns like round_robin.
k always comes from `selection_size`. Every subtask ranks the whole pool, so a subtask can run out of rows
only when the pool does: with k <= n every quota is met and no row is taken twice.

The training stores are memory-mapped and streamed in row chunks, all checkpoints in lockstep, so memory
holds one chunk per checkpoint whatever the pool size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from rose_trl.scoring.columns import PREFILTERED_OUT, SCORE, ScoreColumns
from rose_trl.stores.store import GradientStore, StoreMismatchError
from rose_trl.utils.timing import stage


logger = logging.getLogger(__name__)


def unit_dots(rows: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """<d, unit(g)> for every row g of `rows` [n, dim] and column d of `directions` [dim, k]: [n, k].
    <d, unit(g)> = <d, g> / |g|: no normalized copy of the rows."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows)).clip(min=1e-30)
    return (rows @ directions) / norms[:, None]


# ---------------------------------------------------------------------------------- targets


def zero_gradient_pairs(grads: np.ndarray) -> np.ndarray:
    """Indices of the pairs whose gradient is exactly zero (e.g. hinge with the margin already met)."""
    return np.flatnonzero(~np.asarray(grads).any(axis=1))


def pair_vectors(
    grads: np.ndarray, subtasks: list[str], mode: str = "normalized_mean", usable: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """(subtask names in first-appearance order, [n_pairs, dim] vectors v_p) such that each subtask's
    target is the mean of v_p over its usable pairs (rows of left-out pairs are zero):

    - "normalized_mean" (default; what ROSE/LESS's released code computes): v_p = g_p / |g_p|, the target
      is the mean unit gradient, and scoring against it gives the mean cosine over the subtask's pairs.
    - "eq6" (the paper's Eq. 6 read literally: average the raw gradients, then normalize):
      v_p = g_p / |mean_{p' in j} g_p'|, so the target mean_p v_p is the unit mean gradient. Pairs with
      large gradients (e.g. where the policy already strongly prefers the rejected answer, or long
      responses) then weigh more, and the reference model's log-probs matter through the DPO weight
      sigma(r_l - r_w), which cancels in the default mode.

    `usable` (bool per pair, default all) leaves pairs out of their subtask's mean; a subtask left with
    no usable pair is an error naming it.
    """
    if mode not in ("normalized_mean", "eq6"):
        raise ValueError(f"unknown validation aggregation {mode!r}; use 'normalized_mean' or 'eq6'")
    names = list(dict.fromkeys(subtasks))
    labels = np.asarray(subtasks)
    grads = np.asarray(grads, dtype=np.float64)
    usable = np.ones(len(grads), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    vectors = np.zeros_like(grads)
    for name in names:
        rows = np.flatnonzero((labels == name) & usable)
        if len(rows) == 0:
            raise ValueError(
                f"subtask {name!r} has no usable validation pair: every one of its pairs "
                f"{np.flatnonzero(labels == name).tolist()} has a zero gradient (the loss gives it no "
                "direction, e.g. hinge with every margin met)"
            )
        g = grads[rows]
        if mode == "normalized_mean":
            vectors[rows] = g / np.linalg.norm(g, axis=1, keepdims=True).clip(min=1e-30)
        else:
            vectors[rows] = g / max(np.linalg.norm(g.mean(axis=0)), 1e-30)
    return names, vectors


def subtask_means(
    vectors: np.ndarray, subtasks: list[str], names: list[str], usable: np.ndarray | None = None
) -> np.ndarray:
    """[n_subtasks, dim] mean of the usable pairs' vectors per subtask."""
    labels = np.asarray(subtasks)
    usable = np.ones(len(labels), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    return np.stack([vectors[(labels == name) & usable].mean(axis=0) for name in names])


@dataclass
class ValidationTargets:
    """Every checkpoint's pair vectors and subtask targets, over one fixed set of usable pairs."""

    subtasks: list[str]
    vectors: list[np.ndarray]  # per checkpoint, [n_pairs, dim] (pair_vectors; zero rows for left-out pairs)
    targets: list[np.ndarray]  # per checkpoint, [n_subtasks, dim] float32
    usable: np.ndarray  # [n_pairs] bool
    zero_gradient_pairs: dict[str, list[int]]  # checkpoint -> pairs whose gradient is zero there


def validation_targets(
    grads: dict[str, np.ndarray], subtasks: list[str], mode: str = "normalized_mean"
) -> ValidationTargets:
    """Targets of every checkpoint (name -> [n_pairs, dim] validation gradients). A pair whose gradient is
    zero at any checkpoint is left out at all of them (with a warning), so that every subtask score is
    the mean of one fixed set of pairs' contributions (explain.py)."""
    zero = {name: zero_gradient_pairs(g).tolist() for name, g in grads.items()}
    zero = {name: rows for name, rows in zero.items() if rows}
    usable = np.ones(len(subtasks), dtype=bool)
    for rows in zero.values():
        usable[rows] = False
    if zero:
        logger.warning(
            "validation pairs %s have a zero gradient (checkpoint: pairs %s) and are left out of their subtask's mean",
            np.flatnonzero(~usable).tolist(),
            zero,
        )
    vectors, targets = [], []
    for name, g in grads.items():
        try:
            names, v = pair_vectors(g, subtasks, mode, usable)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        vectors.append(v)
        targets.append(subtask_means(v, subtasks, names, usable).astype(np.float32))
    return ValidationTargets(names, vectors, targets, usable, zero)


# ---------------------------------------------------------------------------------- scores


@dataclass
class CheckpointGradients:
    """One warm-up checkpoint: its training-gradient store, its per-subtask targets and its LR."""

    name: str
    train: GradientStore
    targets: np.ndarray  # [n_subtasks, dim] float32: ValidationTargets.targets
    learning_rate: float
    # [n_pairs, dim] pair_vectors, whose subtask means are `targets`: per-pair contributions (contribution_chunks)
    pair_vectors: np.ndarray | None = None


def normalized_weights(learning_rates: list[float]) -> np.ndarray:
    eta = np.asarray(learning_rates, dtype=np.float64)
    if (eta < 0).any() or not np.isfinite(eta).all() or eta.sum() <= 0:
        raise ValueError(f"checkpoint learning rates must be finite, >= 0 and not all 0, got {learning_rates}")
    return eta / eta.sum()


CHUNK_BYTES = 32 << 20  # float32 bytes of one checkpoint's chunk


@stage("scoring")
def score_checkpoints(
    checkpoints: list[CheckpointGradients],
    subtasks: list[str],
    chunk_rows: int | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Score table (columns.py): `score`, `score_<subtask>` (checkpoint-weighted) and `score_ckpt<i>` (each
    checkpoint's own max-over-subtask score, for agreement plots). Memory: a chunk of rows per
    checkpoint (32 MB of float32 each by default, whatever the dimension) plus the O(pool) score table.
    `rows` (a prefilter's candidates): only these rows are read and scored, every other row's scores are NaN."""
    if not checkpoints:
        raise ValueError("no warm-up checkpoints to score")
    first = checkpoints[0].train
    for c in checkpoints:
        if c.train.num_rows != first.num_rows or c.train.meta["pool_fingerprint"] != first.meta["pool_fingerprint"]:
            raise StoreMismatchError(
                f"checkpoint {c.name}'s store covers a different pool than {checkpoints[0].name}'s"
            )
        if c.train.meta["projection"] != first.meta["projection"]:
            raise StoreMismatchError(
                f"checkpoint {c.name}'s store uses another projection than {checkpoints[0].name}'s"
            )
        if c.targets.shape != (len(subtasks), c.train.dim):
            raise ValueError(
                f"checkpoint {c.name}: targets of shape {c.targets.shape}, expected {(len(subtasks), c.train.dim)}"
            )
    eta = normalized_weights([c.learning_rate for c in checkpoints])
    chunk_rows = chunk_rows or max(64, CHUNK_BYTES // (4 * first.dim))
    n = first.num_rows
    per_subtask = np.zeros((n, len(subtasks)), dtype=np.float64)
    per_ckpt = np.zeros((n, len(checkpoints)), dtype=np.float64)
    if rows is None:
        streams = zip(*[c.train.iter_chunks(chunk_rows) for c in checkpoints], strict=True)
        chunks = ((np.arange(parts[0][0], parts[0][0] + len(parts[0][1])), [r for _, r in parts]) for parts in streams)
    else:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        per_subtask[:], per_ckpt[:] = np.nan, np.nan
        per_subtask[rows], per_ckpt[rows] = 0.0, 0.0
        chunks = (
            (rows[i : i + chunk_rows], [c.train.read_rows(rows[i : i + chunk_rows]) for c in checkpoints])
            for i in range(0, len(rows), chunk_rows)
        )
    for index, parts in chunks:
        for i, (values, c) in enumerate(zip(parts, checkpoints, strict=True)):
            sims = unit_dots(values, c.targets.T.astype(np.float32))  # [chunk, n_subtasks]
            per_subtask[index] += eta[i] * sims
            per_ckpt[index, i] = sims.max(axis=1)
    columns = ScoreColumns.for_table(subtasks, len(checkpoints))
    table = {SCORE: per_subtask.max(axis=1)}
    for j, column in enumerate(columns.subtask_columns):
        table[column] = per_subtask[:, j]
    for i, column in enumerate(columns.checkpoints):
        table[column] = per_ckpt[:, i]
    return table


def contribution_chunks(
    checkpoints: list[CheckpointGradients], rows: np.ndarray, pairs: np.ndarray, chunk_rows: int | None = None
):
    """Yields (pool indices, float64 [chunk, len(pairs)] contributions) for the sorted `rows`."""
    eta = normalized_weights([c.learning_rate for c in checkpoints])
    vectors = [np.ascontiguousarray(c.pair_vectors[pairs].T, dtype=np.float32) for c in checkpoints]  # [dim, P]
    chunk_rows = chunk_rows or max(64, CHUNK_BYTES // (4 * checkpoints[0].train.dim))
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        total = np.zeros((len(chunk), len(pairs)), dtype=np.float64)
        for i, c in enumerate(checkpoints):
            total += eta[i] * unit_dots(c.train.read_rows(chunk), vectors[i])
        yield chunk, total


# ---------------------------------------------------------------------------------- selection


def check_fraction(fraction: float, name: str = "selection_fraction") -> float:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {fraction!r}")
    return float(fraction)


def selection_size(n: int, fraction: float) -> int:
    """k = ceil(fraction * n), at least 1: how many of n pool rows a selection takes."""
    check_fraction(fraction)
    if n == 0:
        raise ValueError("cannot select from an empty pool")
    k = max(1, math.ceil(fraction * n - 1e-9))
    if k == n and fraction < 1:
        # Rounding up made a strict fraction take everything: the pool is too small to select from.
        raise ValueError(
            f"a pool of {n} rows is too small for selection_fraction={fraction}: "
            f"ceil({fraction} * {n}) = {k} selects the whole pool"
        )
    return k


def top_fraction(scores: np.ndarray, fraction: float, k: int | None = None) -> np.ndarray:
    """Indices of the best ceil(fraction * n) rows (or `k`), highest score first, ties broken by lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    k = selection_size(len(scores), fraction) if k is None else k
    if not np.isfinite(scores).all():
        raise FloatingPointError(
            f"non-finite scores at pool indices {np.flatnonzero(~np.isfinite(scores))[:10].tolist()}"
        )
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


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


def select_rows(
    table: dict[str, np.ndarray],
    subtasks: list[str],
    fraction: float,
    balance: str = "max",
    pair_counts: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(selected pool indices, best overall score first; the subtask each was selected for, or None when
    the table has no per-subtask scores). Under `max` a row counts for the subtask whose score is its max.
    A table without per-subtask scores (random, full) has nothing to balance: its top rows are taken.
    A table with a `prefiltered_out` column (prefilter_fraction) selects ceil(fraction * pool) rows among the
    others only."""
    if balance not in ("max", "round_robin", "proportional"):
        raise ValueError(f"unknown subtask_balance {balance!r}; use 'max', 'round_robin' or 'proportional'")
    if PREFILTERED_OUT in table:
        kept = np.flatnonzero(~np.asarray(table[PREFILTERED_OUT], dtype=bool))
        k = selection_size(len(table[SCORE]), fraction)
        if k > len(kept):
            raise ValueError(f"the first pass kept {len(kept)} rows, fewer than the {k} to select")
        sub = {name: np.asarray(v)[kept] for name, v in table.items() if name != PREFILTERED_OUT}
        rows, taker = _select_rows(sub, subtasks, fraction, balance, pair_counts, k)
        return kept[rows], taker
    return _select_rows(table, subtasks, fraction, balance, pair_counts)


def _select_rows(
    table: dict[str, np.ndarray],
    subtasks: list[str],
    fraction: float,
    balance: str,
    pair_counts: dict[str, int] | None,
    k: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    scores = np.asarray(table[SCORE], dtype=np.float64)
    columns = ScoreColumns(tuple(subtasks)).subtask_columns
    if not subtasks or not all(c in table for c in columns):
        if balance != "max":
            logger.warning(
                "subtask_balance %r: the score table has no score_<subtask> column for each of %s "
                "(columns: %s); taking the top rows by score",
                balance,
                subtasks,
                sorted(table),
            )
        return top_fraction(scores, fraction, k), None
    if balance == "max":
        chosen = top_fraction(scores, fraction, k)
        per_subtask = np.stack([np.asarray(table[c], dtype=np.float64)[chosen] for c in columns], axis=1)
        return chosen, np.asarray(subtasks, dtype=object)[per_subtask.argmax(axis=1)]
    values = np.stack([np.asarray(table[c], dtype=np.float64) for c in columns], axis=1)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        raise FloatingPointError(f"non-finite subtask scores at pool indices {bad[:10].tolist()}")
    k = selection_size(len(scores), fraction) if k is None else k
    if balance == "round_robin":
        weights = [1] * len(subtasks)
    else:
        if pair_counts is None or any(pair_counts.get(name, 0) < 1 for name in subtasks):
            raise ValueError(
                f"subtask_balance 'proportional' needs the number of validation pairs of every subtask "
                f"{subtasks}, got {pair_counts}"
            )
        weights = [pair_counts[name] for name in subtasks]
    rows, taker = take_in_turns(values, largest_remainder_quotas(k, weights))
    order = np.lexsort((rows, -scores[rows]))  # saved best first, as under max
    return rows[order], np.asarray(subtasks, dtype=object)[taker[order]]
