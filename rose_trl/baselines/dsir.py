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

from .text import pool_texts, subtask_groups, validation_texts


@dataclass
class DSIROptions:
    num_buckets: int = 10000
    ngrams: int = 2
    # Added to both bag probabilities before the log, as the reference implementation does.
    smoothing: float = 1e-8


def hashed_ngram_features(texts: list[str], num_buckets: int, ngrams: int) -> np.ndarray:
    tokenize = WordPunctTokenizer().tokenize
    out = np.zeros((len(texts), num_buckets), dtype=np.float64)
    for i, text in enumerate(texts):
        out[i] = get_ngram_counts(text, n=ngrams, num_buckets=num_buckets, tokenizer=tokenize)
    return out


def _log_probs(counts: np.ndarray, smoothing: float) -> np.ndarray:
    total = counts.sum()
    return np.log((counts / total if total else counts) + smoothing)


def dsir_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """`score`: log importance weight against the whole validation set; `score_<subtask>`: against
    that subtask's examples alone (diagnostic; the whole-set target is the method's score)."""
    opts = DSIROptions(**options)
    raw = hashed_ngram_features(pool_texts(pool), opts.num_buckets, opts.ngrams)
    target = hashed_ngram_features(validation_texts(validation), opts.num_buckets, opts.ngrams)
    log_raw = _log_probs(raw.sum(axis=0), opts.smoothing)
    table = {}
    for name, rows in subtask_groups(validation).items():
        table[f"score_{name}"] = raw @ (_log_probs(target[rows].sum(axis=0), opts.smoothing) - log_raw)
    table["score"] = raw @ (_log_probs(target.sum(axis=0), opts.smoothing) - log_raw)
    return table
