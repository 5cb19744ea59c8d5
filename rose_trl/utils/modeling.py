"""What every part that runs a model needs from it, whatever it computes (features, baselines, evaluation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout noise in gradient features, embeddings or generations; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_id(model) -> str:
    """The base model's name or path (what a gradient store records as its model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base.config, "_name_or_path", "") or type(base).__name__)
