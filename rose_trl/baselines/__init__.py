"""Selection baselines the paper compares ROSE with. Every entry has the signature
`fn(pool, validation, *, seed=0, model=None, tokenizer=None, **options) -> {"score": ..., "score_<subtask>": ...}`,
one float per pool row, higher = selected first."""

from rose_trl.baselines.bm25 import BM25Options, bm25_scores
from rose_trl.baselines.dsir import DSIROptions, dsir_scores, hashed_ngram_features
from rose_trl.baselines.rds import RDSOptions, mean_hidden_states, rds_scores
from rose_trl.baselines.simple import full_scores, random_scores
from rose_trl.baselines.text import pool_text, pool_texts, subtask_groups, validation_texts


BASELINES = {
    "random": random_scores,
    "bm25": bm25_scores,
    "rds": rds_scores,
    "dsir": dsir_scores,
    "full": full_scores,
}

__all__ = [
    "BASELINES",
    "BM25Options",
    "DSIROptions",
    "RDSOptions",
    "bm25_scores",
    "dsir_scores",
    "full_scores",
    "hashed_ngram_features",
    "mean_hidden_states",
    "pool_text",
    "pool_texts",
    "random_scores",
    "rds_scores",
    "subtask_groups",
    "validation_texts",
]
