"""A batch -> its rows' projected gradient features, [rows, dim] float32: what the pool and validation share.

The one place that decides between the two paths, once per run (per `Featurizer`), and says why:
- fused (sjlt, or trak with its matrix cached: projectors that take a slice of the parameters): each
  layer's per-row gradient block is Adam-preconditioned and projected inside the backward
  (`gradients.ProjectedRows`); no [rows, n_params] buffer exists;
- whole-row (any other projector): every row's whole gradient is built (`gradients.DenseRows`),
  preconditioned, then projected. Its memory per row grows with the adapter (see gradient_memory_gb).
Both give the same features up to float summation order (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import PartialState
from accelerate.logging import get_logger

from rose_trl.gradients.capture import (
    AdamState,
    DenseRows,
    PerExampleGradientCapture,
    ProjectedRows,
    activation_checkpointing_off,
    per_example_gradients,
    per_example_projected_gradients,
)
from rose_trl.gradients.projection import Projector


logger = get_logger(__name__)


def fused_path(projector: Projector) -> tuple[bool, str]:
    """(whether the fused path can run with `projector`, why)."""
    if getattr(projector, "supports_slices", False):
        return True, f"the projector ({projector.implementation}) projects each layer's slice of the parameters"
    return False, (
        f"the projector ({projector.implementation}) cannot project a slice of the parameters; sjlt, or "
        "trak with its matrix cached, can"
    )


class Featurizer:
    """Projected per-row gradients of a batch with `projector`, on the path chosen (and logged) once here."""

    def __init__(self, projector: Projector):
        self.projector = projector
        self.fused, self.reason = fused_path(projector)
        PartialState()  # the logger below needs accelerate's state; a no-op when a run has made it
        if self.fused:
            logger.info("per-layer fused gradient path: %s", self.reason)
        else:
            logger.warning(
                "per-layer fused gradient path off: %s; whole gradient rows are built and projected "
                "(memory per row grows with the adapter: see gradient_memory_gb)",
                self.reason,
            )

    @property
    def dim(self) -> int:
        return self.projector.dim

    def __call__(
        self,
        model: torch.nn.Module,
        batch: dict,
        adam_state: AdamState | None = None,
        loss: Callable[[dict], torch.Tensor] | None = None,
        combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[rows, dim] features of `batch` (`input_ids` gives the rows and the device).

        `loss`: None for each row's own SFT loss (labels -100 outside the response); else `loss(batch)`, run
        with the capture hooks on, must be a sum of per-row losses (a DPO loss: chosen and rejected rows).
        `combine` maps the [rows, ...] per-row gradients to the rows kept (a pair: its chosen plus its rejected
        row); projection being linear, it is applied to projected rows on the fused path, to whole rows before
        the projection otherwise.
        """
        if loss is None:
            if self.fused:
                rows = per_example_projected_gradients(model, batch, self.projector, adam_state)
                return combine(rows) if combine else rows
            grads = per_example_gradients(model, batch, adam_state=adam_state)
            return self.projector.project(combine(grads) if combine else grads)
        n = batch["input_ids"].shape[0]
        device = batch["input_ids"].device
        capture = PerExampleGradientCapture(model)
        sink = (
            ProjectedRows(n, self.projector, adam_state, device)
            if self.fused
            else DenseRows(n, capture.num_params, device)
        )
        with activation_checkpointing_off(model), capture, torch.enable_grad():
            capture.reset(n, device, sink)
            capture.backward(loss(batch))
        rows = sink.rows
        if not self.fused and adam_state is not None:
            rows = adam_state.precondition_(rows)
        rows = combine(rows) if combine else rows
        return rows if self.fused else self.projector.project(rows)
