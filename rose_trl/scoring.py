"""Scores from gradient stores: S(z, j) = sum_i eta_i * <target_{i,j}, unit(train_{i,z})>, score = max_j.

Streams the memory-mapped training stores in row chunks, all checkpoints in lockstep, so memory
holds one chunk per checkpoint whatever the pool size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .store import GradientStore, StoreMismatchError


@dataclass
class CheckpointGradients:
    """One warm-up checkpoint: its training-gradient store, its per-subtask targets and its LR."""

    name: str
    train: GradientStore
    targets: np.ndarray  # [n_subtasks, dim], from validation.aggregate_by_subtask
    learning_rate: float
    # [n_pairs, dim] validation.pair_vectors, whose subtask means are `targets`: per-pair contributions (explain.py)
    pair_vectors: np.ndarray | None = None


def normalized_weights(learning_rates: list[float]) -> np.ndarray:
    eta = np.asarray(learning_rates, dtype=np.float64)
    if (eta < 0).any() or not np.isfinite(eta).all() or eta.sum() <= 0:
        raise ValueError(f"checkpoint learning rates must be finite, >= 0 and not all 0, got {learning_rates}")
    return eta / eta.sum()


CHUNK_BYTES = 32 << 20  # float32 bytes of one checkpoint's chunk


def score_checkpoints(checkpoints: list[CheckpointGradients], subtasks: list[str], chunk_rows: int | None = None) -> dict[str, np.ndarray]:
    """Score table: `score`, `score_<subtask>` (checkpoint-weighted) and `score_ckpt<i>` (each
    checkpoint's own max-over-subtask score, for agreement plots). Memory: a chunk of rows per
    checkpoint (32 MB of float32 each by default, whatever the dimension) plus the O(pool) score table."""
    if not checkpoints:
        raise ValueError("no warm-up checkpoints to score")
    first = checkpoints[0].train
    for c in checkpoints:
        if c.train.num_rows != first.num_rows or c.train.meta["pool_fingerprint"] != first.meta["pool_fingerprint"]:
            raise StoreMismatchError(f"checkpoint {c.name}'s store covers a different pool than {checkpoints[0].name}'s")
        if c.train.meta["projection"] != first.meta["projection"]:
            raise StoreMismatchError(f"checkpoint {c.name}'s store uses another projection than {checkpoints[0].name}'s")
        if c.targets.shape != (len(subtasks), c.train.dim):
            raise ValueError(f"checkpoint {c.name}: targets of shape {c.targets.shape}, expected {(len(subtasks), c.train.dim)}")
    eta = normalized_weights([c.learning_rate for c in checkpoints])
    chunk_rows = chunk_rows or max(64, CHUNK_BYTES // (4 * first.dim))
    n = first.num_rows
    per_subtask = np.zeros((n, len(subtasks)), dtype=np.float64)
    per_ckpt = np.zeros((n, len(checkpoints)), dtype=np.float64)
    streams = [c.train.iter_chunks(chunk_rows) for c in checkpoints]
    for chunks in zip(*streams):
        start = chunks[0][0]
        for i, ((_, rows), c) in enumerate(zip(chunks, checkpoints)):
            # <t, unit(g)> = <t, g> / |g|: no normalized copy of the chunk.
            norms = np.sqrt(np.einsum("ij,ij->i", rows, rows)).clip(min=1e-30)
            sims = (rows @ c.targets.T.astype(np.float32)) / norms[:, None]  # [chunk, n_subtasks]
            per_subtask[start : start + len(rows)] += eta[i] * sims
            per_ckpt[start : start + len(rows), i] = sims.max(axis=1)
    table = {"score": per_subtask.max(axis=1)}
    for j, name in enumerate(subtasks):
        table[f"score_{name}"] = per_subtask[:, j]
    for i in range(len(checkpoints)):
        table[f"score_ckpt{i}"] = per_ckpt[:, i]
    return table
