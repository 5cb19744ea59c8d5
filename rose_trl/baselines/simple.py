"""Reference points that look at nothing: seeded random scores and the full pool."""

from __future__ import annotations

import numpy as np


def _no_options(method: str, options: dict) -> None:
    if options:
        raise TypeError(f"{method} takes no options, got {sorted(options)}")


def random_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """Uniform scores from a seeded generator: selecting the top k is a uniform random k-subset."""
    _no_options("random", options)
    return {"score": np.random.default_rng(seed).random(len(pool))}


def full_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """Every row scores the same: the "train on everything" reference (select with fraction 1.0)."""
    _no_options("full", options)
    return {"score": np.ones(len(pool), dtype=np.float64)}
