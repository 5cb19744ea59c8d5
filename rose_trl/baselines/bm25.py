"""BM25 relevance of pool rows to the validation set (Robertson & Zaragoza 2009), via `bm25s`."""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import numpy as np

from rose_trl.baselines.text import max_over_subtasks, pool_texts, subtask_groups, validation_texts


@dataclass
class BM25Options:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"


def bm25_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """Pool rows are the documents; every validation example (prompt + chosen) is a query. A row's
    subtask score is its mean BM25 score over that subtask's queries; `score` is the max over subtasks."""
    opts = BM25Options(**options)
    corpus = bm25s.tokenize(pool_texts(pool), stopwords=opts.stopwords, show_progress=False)
    retriever = bm25s.BM25(k1=opts.k1, b=opts.b, method=opts.method)
    retriever.index(corpus, show_progress=False)
    vocab = corpus.vocab
    queries = []
    for text in validation_texts(validation):
        # Words the pool never uses cannot match; bm25s wants known tokens only.
        words = bm25s.tokenize(text, stopwords=opts.stopwords, return_ids=False, show_progress=False)[0]
        queries.append([w for w in words if w in vocab])
    per_query = np.stack([retriever.get_scores(q) if q else np.zeros(len(pool)) for q in queries])
    return max_over_subtasks({name: per_query[rows].mean(axis=0) for name, rows in subtask_groups(validation).items()})
