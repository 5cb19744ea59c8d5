"""What a selection's gradient passes cost, before any runs: the passes its cost options (gradient_layers,
selection_checkpoints, prefilter_fraction) leave, in units of the full method's pass (a forward and a backward of
every decoder layer, for every pool row at every checkpoint). The memory plan's log states it (budget.py).

A pass whose backward stops below the last n of L decoder layers costs about
`FORWARD_SHARE + (1 - FORWARD_SHARE) * n / L` of a full one: the forward of every layer, the LM head and the loss
are paid whatever n, the backward in proportion to the layers it crosses (measured:
docs/results/cost_frontier.md, "Each option's pass against the floor").
"""

from __future__ import annotations

import math
from dataclasses import dataclass


# The share of a full pass that does not shrink with the layers the backward crosses (forward, LM head, loss),
# measured at SmolLM2-135M's shape (30 layers, 256 tokens) on a CPU: docs/results/cost_frontier.md.
FORWARD_SHARE = 0.45


def pass_cost(layers: int | None, total: int) -> float:
    """A pass with its backward stopped below the last `layers` of `total` decoder layers, in full passes."""
    if layers is None or layers >= total:
        return 1.0
    return FORWARD_SHARE + (1 - FORWARD_SHARE) * layers / total


@dataclass(frozen=True)
class SelectionWork:
    """The pool gradient passes of a selection (the validation passes scale alike, over far fewer rows)."""

    pool_rows: int
    checkpoints: int | None  # of the warm-up (None: not known yet; the work is then given per checkpoint)
    chosen: int  # the checkpoints selection_checkpoints keeps
    layers: int | None  # gradient_layers (None: all)
    total_layers: int  # decoder layers with LoRA modules
    prefilter_fraction: float | None = None
    prefilter_layers: int | None = None

    @property
    def candidates(self) -> int:
        if self.prefilter_fraction is None:
            return self.pool_rows
        return max(1, math.ceil(self.prefilter_fraction * self.pool_rows - 1e-9))

    @property
    def row_passes(self) -> float:
        """In full row passes: the first pass over every row at one checkpoint, then the (candidate) rows at every
        chosen checkpoint."""
        first = self.pool_rows * pass_cost(self.prefilter_layers, self.total_layers) if self.prefilter_fraction else 0
        return first + self.candidates * self.chosen * pass_cost(self.layers, self.total_layers)

    @property
    def share(self) -> float:
        """Of the full method's (every row, every checkpoint, every layer)."""
        return self.row_passes / (self.pool_rows * (self.checkpoints or 1))

    def describe(self) -> str:
        layers = self.layers or self.total_layers
        parts = []
        if self.prefilter_fraction:
            parts.append(
                f"a first pass over {self.pool_rows} rows ({self.prefilter_layers} of {self.total_layers} layers) at "
                f"1 checkpoint"
            )
        rows = f"the {self.candidates} rows it keeps" if self.prefilter_fraction else f"{self.pool_rows} rows"
        plural = "s" if self.checkpoints != 1 else ""
        where = f"{self.chosen} of {self.checkpoints} checkpoint{plural}" if self.checkpoints else "each checkpoint"
        parts.append(f"{rows} at {where} ({layers} of {self.total_layers} layers)")
        if not self.checkpoints:
            return (
                f"selection passes, per checkpoint: {'; '.join(parts)}: about {self.share:.2f} of the full method's "
                f"pool gradient work ({self.pool_rows} row passes of every layer a checkpoint)"
            )
        full = self.pool_rows * self.checkpoints
        return (
            f"selection passes: {'; '.join(parts)}: about {self.share:.2f} of the full method's pool gradient work "
            f"({full} row passes of every layer; a pass of n of {self.total_layers} layers costs about "
            f"{FORWARD_SHARE:g} + {1 - FORWARD_SHARE:g} n/{self.total_layers} of one; stores already complete are "
            "reused, not computed again)"
        )
