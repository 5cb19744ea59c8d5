"""Pool -> gradient store: batched per-example gradients, Adam preconditioning, projection, resumable writes."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import full_numel, max_over_ranks, partitioned, release_gathered
from .gradients import (AdamState, UnsupportedParameterError, per_example_gradients,
                        per_example_projected_gradients, trainable_parameters)
from .projection import Projector
from .sft_data import collate
from .store import GradientStore

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Gradients are features: no dropout noise in them. The model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# float32 bytes one row costs in a pass's gradient path, beyond the forward/backward's own activations:
# - dense (unfused) path: 16 per trainable parameter: the captured row, the Adam denominator, the
#   preconditioned row and the projection's input;
# - fused path: 16 per parameter of the largest layer only (its block, the Adam denominator, the
#   projection's signed copy, slack), plus the [dim] accumulator. benchmarks/extraction_memory.py
#   measures it (docs/performance.md).
DENSE_BYTES_PER_PARAM = 16
FUSED_BYTES_PER_LAYER_PARAM = 16


def gradient_bytes_per_row(num_params: int, largest_layer: int, dim: int, fused: bool) -> int:
    if fused:
        return FUSED_BYTES_PER_LAYER_PARAM * largest_layer + 4 * dim
    return DENSE_BYTES_PER_PARAM * num_params + 4 * dim


def rows_for_budget(bytes_per_row: int, batch_size: int, memory_gb: float | None) -> int:
    """Rows per gradient pass: `batch_size`, lowered so the rows' gradient path fits `memory_gb`."""
    if memory_gb is None:
        return batch_size
    fits = int(memory_gb * 1e9 // bytes_per_row)
    if fits < 1:
        raise ValueError(f"gradient_memory_gb={memory_gb} cannot hold one gradient row "
                         f"(needs {bytes_per_row / 1e9:.2f} GB)")
    return min(batch_size, fits)


def rows_per_pass(model: torch.nn.Module, projector: Projector, batch_size: int, memory_gb: float | None) -> int:
    """`rows_for_budget` for this model's adapter on the path extraction will take with `projector`."""
    sizes = [full_numel(p) for _, p in trainable_parameters(model)]
    per_row = gradient_bytes_per_row(sum(sizes), max(sizes), projector.dim, fused=fusion_unavailable(projector) is None)
    return rows_for_budget(per_row, batch_size, memory_gb)


def fusion_unavailable(projector: Projector) -> str | None:
    """Why the fused path (per-layer Adam + projection inside the backward) cannot run, or None."""
    if not getattr(projector, "supports_slices", False):
        return (f"the projector ({projector.implementation}) cannot project a slice of the parameters; "
                "sjlt, or trak with its matrix cached, can")
    return None


def plan_batches(lengths: np.ndarray, rows: np.ndarray, batch_size: int, max_batch_tokens: int | None) -> list[np.ndarray]:
    """Group `rows` longest first so that padding is small; a batch holds at most `batch_size` rows
    and, when set, at most `max_batch_tokens` padded tokens (the memory budget)."""
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    batches, current, width = [], [], 0
    for r in order:
        w = max(width, int(lengths[r]))
        if current and (len(current) >= batch_size or (max_batch_tokens and w * (len(current) + 1) > max_batch_tokens)):
            batches.append(np.array(current))
            current, w = [], int(lengths[r])
        current.append(int(r))
        width = w
    if current:
        batches.append(np.array(current))
    return batches


def _project_rows(model, pool, rows: np.ndarray, projector: Projector, pad_token_id: int, adam: AdamState | None,
                  device: torch.device, splittable: bool, fused: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Projected gradients of `rows` from one pass, or, when that pass runs out of device memory, from
    its two halves (recursively, down to one row)."""
    try:
        batch = {k: v.to(device) for k, v in collate([pool[int(i)] for i in rows], pad_token_id).items()}
        if fused:
            projected = per_example_projected_gradients(model, batch, projector, adam)
        else:
            projected = projector.project(per_example_gradients(model, batch, adam_state=adam))
        release_gathered(model)
        return [(rows, projected.cpu().numpy())]
    except torch.OutOfMemoryError:
        if not splittable or len(rows) == 1:
            raise
    # Outside the handler: the failed pass's frames (and their tensors) are released by now.
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(rows) // 2
    logger.warning("gradient pass of %d rows ran out of memory: splitting it (lower max_batch_tokens or "
                   "gradient_memory_gb to avoid the retry)", len(rows))
    return (_project_rows(model, pool, rows[:half], projector, pad_token_id, adam, device, splittable, fused)
            + _project_rows(model, pool, rows[half:], projector, pad_token_id, adam, device, splittable, fused))


def extract_gradients(
    model: torch.nn.Module,
    pool: Sequence[dict],
    store: GradientStore,
    projector: Projector,
    pad_token_id: int,
    adam_state: AdamState | None = None,
    batch_size: int = 16,
    max_batch_tokens: int | None = None,
    shard: tuple[int, int] = (0, 1),
    missing: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "Extracting gradients",
) -> int:
    """Compute, project and store the rows of `pool` that `store` does not hold yet.

    `pool` items carry `input_ids` and `completion_mask` (see `sft_data.tokenize_pool`).
    `shard=(rank, world_size)`: batches are planned over all missing rows, then dealt out round-robin,
    so a row lands in the same batch (and gets bit-identical numbers) whatever the number of
    processes; `missing` (default: the store's missing rows now) must then be the same on every rank.
    Returns the number of rows this call computed.
    """
    wanted = store.missing_rows() if missing is None else np.asarray(missing, dtype=np.int64)
    if len(wanted) == 0:
        return 0
    rank, world = shard
    lengths = np.zeros(store.num_rows, dtype=np.int64)
    lengths[wanted] = [len(ids) for ids in pool.select(wanted.tolist())["input_ids"]] if hasattr(pool, "select") \
        else [len(pool[int(i)]["input_ids"]) for i in wanted]
    plan = plan_batches(lengths, wanted, batch_size, max_batch_tokens)
    batches = plan[rank::world]
    wanted = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    device = next((p.device for p in model.parameters() if p.requires_grad), None)
    if device is None:
        raise UnsupportedParameterError("the model has no trainable parameters (is the LoRA adapter attached and active?)")
    adam = adam_state.to(device) if adam_state is not None else None
    bar = tqdm(total=len(wanted), desc=desc, unit="ex", disable=not progress)
    # Agreed before any pass: a collective issued while another rank is still in a forward would deadlock.
    lockstep_passes = max_over_ranks(len(batches)) if world > 1 and partitioned(model) else len(batches)
    # Rows are independent, so a pass that runs out of memory can be split. Not under ZeRO-3/FSDP:
    # there every rank must run the same number of passes (collectives), so the error is raised.
    splittable = not (world > 1 and partitioned(model))
    why_not = fusion_unavailable(projector)
    if why_not is not None and rank == 0:
        logger.warning("per-layer fused gradient path off: %s; whole gradient rows are built and projected "
                       "(memory per row grows with the adapter: see gradient_memory_gb)", why_not)
    with eval_mode(model):
        for batch_rows in batches:
            for rows, projected in _project_rows(model, pool, batch_rows, projector, pad_token_id, adam, device,
                                                 splittable, fused=why_not is None):
                store.write(rows, projected)
                bar.update(len(rows))
        # ZeRO-3 forwards and backwards are collectives: a rank dealt fewer batches runs discarded
        # passes so that every rank runs as many as the busiest one.
        for _ in range(lockstep_passes - len(batches)):
            _project_rows(model, pool, plan[0], projector, pad_token_id, adam, device, False, fused=why_not is None)
    bar.close()
    return len(wanted)
