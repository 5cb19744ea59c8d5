"""Several `gradient_layers` settings from one gradient pass, for the frontier sweep (frontier.py).

A feature with `gradient_layers: n` is the projection of the Adam-transformed gradient restricted to the LoRA modules
of the last n decoder layers, with the run's one projector (`rose_trl.gradients.capture.GradientLayers`). The
projection being linear, the full pass's per-layer blocks give every n at once: each block is transformed and
projected once, and added to the accumulator of every n whose last n layers hold it. `LayeredFeaturizer` returns
those accumulators side by side, [rows, len(subsets) * dim], so that a ROSESelector stores them as one wide row;
`subset(rows, i)` takes the i-th back. This is a measuring device, not a cost option: its pass costs the full one
(the backward reaches every layer). tests/test_benchmarks.py checks it against Featurizer(gradient_layers=n).
"""

from __future__ import annotations

import torch

from rose_trl.gradients.capture import (
    PerExampleGradientCapture,
    ProjectedRows,
    activation_checkpointing_off,
    decoder_layers,
)
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.sft_loss import pass_loss


class LayeredProjector:
    """`projector`, `len(subsets)` times side by side: what a store of layered rows records (its dim, its subsets)."""

    supports_slices = True

    def __init__(self, projector, subsets: list[int]):
        self.inner, self.subsets = projector, list(subsets)
        self.dim = projector.dim * len(self.subsets)
        self.implementation = f"{projector.implementation}, layered {self.subsets}"

    def describe(self) -> dict:
        return {**self.inner.describe(), "dim": self.dim, "layer_subsets": self.subsets}


class LayeredRows(ProjectedRows):
    """A capture's sink: each layer's block preconditioned and projected once, then added to the accumulator of every
    subset that holds its layer (`rank_of`: a block's first coordinate -> its layer's rank from the top, 0 = last)."""

    def __init__(self, rows, layered: LayeredProjector, adam_state, device, rank_of: dict[int, int]):
        super().__init__(rows, layered.inner, adam_state, device)
        self.subsets, self.rank_of, self.width = layered.subsets, rank_of, layered.inner.dim
        self.rows = torch.zeros(rows, layered.dim, dtype=torch.float32, device=device)

    def _spread(self, projected: torch.Tensor, start: int) -> None:
        rank = self.rank_of[start]
        for i, n in enumerate(self.subsets):
            if rank < n:
                self.rows[:, i * self.width : (i + 1) * self.width] += projected

    def add(self, start: int, block: torch.Tensor) -> None:
        if self.adam is not None:
            block = self.adam.precondition_(block, start)
        projected = torch.zeros(block.shape[0], self.width, dtype=torch.float32, device=block.device)
        self.projector.add_projection(projected, block, start)
        self._spread(projected, start)

    def missing(self, start: int, n: int) -> None:
        if self.adam is None:
            return
        row = self.adam.precondition_(torch.zeros(1, n, dtype=torch.float32, device=self.rows.device), start)
        shared = torch.zeros(1, self.width, dtype=torch.float32, device=self.rows.device)
        self.projector.add_projection(shared, row, start)
        self._spread(shared, start)


def layer_ranks(model, capture: PerExampleGradientCapture) -> dict[int, int]:
    """First coordinate of each captured block -> the rank from the top of the decoder layer that holds it."""
    carrying = [layer for layer in decoder_layers(model) if any(p.requires_grad for p in layer.parameters())]
    ranks = {}
    for rank, layer in enumerate(reversed(carrying)):
        for module in layer.modules():
            for rng in capture._module_slices.get(id(module), ()):
                if rng is not None:
                    ranks[rng[0]] = rank
    return ranks


class LayeredFeaturizer(Featurizer):
    """`Featurizer` whose rows hold every subset's features side by side (LayeredProjector)."""

    def __init__(self, projector, subsets: list[int]):
        super().__init__(LayeredProjector(projector, subsets))

    def __call__(self, model, batch, adam_state=None, loss=None, combine=None) -> torch.Tensor:
        n, device = batch["input_ids"].shape[0], batch["input_ids"].device
        capture = PerExampleGradientCapture(model)
        sink = LayeredRows(n, self.projector, adam_state, device, layer_ranks(model, capture))
        with activation_checkpointing_off(model), capture, torch.enable_grad():
            capture.reset(n, device, sink)
            capture.backward(pass_loss(model, batch) if loss is None else loss(batch))
        return combine(sink.rows) if combine else sink.rows


def subset(rows, i: int, dim: int):
    """The i-th subset's [n, dim] features of layered rows."""
    return rows[:, i * dim : (i + 1) * dim]
