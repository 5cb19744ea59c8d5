"""Representation-based data selection (RDS, as in LESS's baselines): cosine similarity of the model's
mean-pooled last-layer hidden states of pool rows and validation examples (prompt + chosen)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rose_trl.baselines.text import max_over_subtasks, pool_texts, subtask_groups, validation_texts
from rose_trl.utils.modeling import eval_mode


@dataclass
class RDSOptions:
    batch_size: int = 16
    max_length: int = 1024


@torch.no_grad()
def mean_hidden_states(model, tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 1024) -> np.ndarray:
    """(len(texts), hidden) unit-norm mean of the last layer's states over each text's real tokens."""
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer needs a pad token to batch texts (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    device = next(model.parameters()).device
    order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths together: less padding
    out = [None] * len(texts)
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            mean = torch.nn.functional.normalize(mean, dim=-1).cpu().numpy()
            for j, i in enumerate(rows):
                out[i] = mean[j]
    return np.stack(out).astype(np.float64)


def rds_scores(pool, validation, *, seed: int = 0, model=None, tokenizer=None, **options) -> dict[str, np.ndarray]:
    """A row's subtask score is its mean cosine to that subtask's validation examples; `score` is the max."""
    if model is None or tokenizer is None:
        raise ValueError("rds needs `model` and `tokenizer`: it compares the model's hidden states")
    opts = RDSOptions(**options)
    pool_emb = mean_hidden_states(model, tokenizer, pool_texts(pool), opts.batch_size, opts.max_length)
    val_emb = mean_hidden_states(model, tokenizer, validation_texts(validation), opts.batch_size, opts.max_length)
    cos = pool_emb @ val_emb.T
    return max_over_subtasks({name: cos[:, rows].mean(axis=1) for name, rows in subtask_groups(validation).items()})
