"""DSIR importance weights (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling").

Each text becomes a vector of hashed unigram + bigram counts (the `data-selection` package's own
featurizer, so the features match the reference implementation). A bag-of-hashed-n-grams model is fit
on the target (validation prompt + chosen) and one on the raw data (the pool); a row's log importance
weight is sum_k count_k * (log p_target[k] - log p_raw[k]). We rank by it instead of resampling:
top-k by weight is the deterministic form the paper's `top_k` option uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from data_selection.hashed_ngram_dsir import get_ngram_counts
from nltk.tokenize import WordPunctTokenizer

from rose_trl.baselines.text import pool_texts, subtask_groups, validation_texts


@dataclass
class DSIROptions:
    num_buckets: int = 10000
    ngrams: int = 2
    # Added to both bag probabilities before the log, as the reference implementation does.
    smoothing: float = 1e-8


def hashed_ngram_features(texts: list[str], num_buckets: int, ngrams: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text, its non-zero (bucket ids, counts): sparse, since a dense pool x buckets matrix would
    not fit in memory for a real pool (270k rows x 10k buckets)."""
    tokenize = WordPunctTokenizer().tokenize
    out = []
    for text in texts:
        dense = get_ngram_counts(text, n=ngrams, num_buckets=num_buckets, tokenizer=tokenize)
        buckets = np.flatnonzero(dense)
        out.append((buckets, dense[buckets].astype(np.float64)))
    return out


def _bag(features: list[tuple[np.ndarray, np.ndarray]], num_buckets: int) -> np.ndarray:
    counts = np.zeros(num_buckets, dtype=np.float64)
    for buckets, values in features:
        counts[buckets] += values
    return counts


def _log_probs(counts: np.ndarray, smoothing: float) -> np.ndarray:
    total = counts.sum()
    return np.log((counts / total if total else counts) + smoothing)


def _weights(features: list[tuple[np.ndarray, np.ndarray]], log_ratio: np.ndarray) -> np.ndarray:
    return np.asarray([values @ log_ratio[buckets] for buckets, values in features], dtype=np.float64)


def dsir_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """`score`: log importance weight against the whole validation set; `score_<subtask>`: against
    that subtask's examples alone (diagnostic; the whole-set target is the method's score)."""
    opts = DSIROptions(**options)
    raw = hashed_ngram_features(pool_texts(pool), opts.num_buckets, opts.ngrams)
    target = hashed_ngram_features(validation_texts(validation), opts.num_buckets, opts.ngrams)
    log_raw = _log_probs(_bag(raw, opts.num_buckets), opts.smoothing)
    table = {}
    for name, rows in subtask_groups(validation).items():
        log_target = _log_probs(_bag([target[i] for i in rows], opts.num_buckets), opts.smoothing)
        table[f"score_{name}"] = _weights(raw, log_target - log_raw)
    table["score"] = _weights(raw, _log_probs(_bag(target, opts.num_buckets), opts.smoothing) - log_raw)
    return table
