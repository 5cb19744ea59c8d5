"""Pool -> gradient store: batched per-example gradients, Adam preconditioning, projection, resumable writes."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import max_over_ranks, partitioned, release_gathered
from .gradients import AdamState, UnsupportedParameterError, per_example_gradients
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


# float32 bytes held per parameter of one row during a pass: the captured gradient, the two Adam
# temporaries (numerator, denominator) and the preconditioned row handed to the projector.
BYTES_PER_PARAM_PER_ROW = 16


def rows_for_budget(num_params: int, batch_size: int, memory_gb: float | None) -> int:
    """Rows per gradient pass: `batch_size`, lowered so the per-example rows fit `memory_gb`."""
    if memory_gb is None:
        return batch_size
    fits = int(memory_gb * 1e9 // (BYTES_PER_PARAM_PER_ROW * num_params))
    if fits < 1:
        raise ValueError(f"gradient_memory_gb={memory_gb} cannot hold one gradient row of {num_params} parameters "
                         f"(needs {BYTES_PER_PARAM_PER_ROW * num_params / 1e9:.2f} GB)")
    return min(batch_size, fits)


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
                  device: torch.device, splittable: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Projected gradients of `rows` from one pass, or, when that pass runs out of device memory, from
    its two halves (recursively, down to one row)."""
    try:
        batch = {k: v.to(device) for k, v in collate([pool[int(i)] for i in rows], pad_token_id).items()}
        grads = per_example_gradients(model, batch, adam_state=adam)
        release_gathered(model)
        return [(rows, projector.project(grads).cpu().numpy())]
    except torch.OutOfMemoryError:
        if not splittable or len(rows) == 1:
            raise
    # Outside the handler: the failed pass's frames (and their tensors) are released by now.
    if device.type == "cuda":
        torch.cuda.empty_cache()
    half = len(rows) // 2
    logger.warning("gradient pass of %d rows ran out of memory: splitting it (lower max_batch_tokens or "
                   "gradient_memory_gb to avoid the retry)", len(rows))
    return (_project_rows(model, pool, rows[:half], projector, pad_token_id, adam, device, splittable)
            + _project_rows(model, pool, rows[half:], projector, pad_token_id, adam, device, splittable))


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
    with eval_mode(model):
        for batch_rows in batches:
            for rows, projected in _project_rows(model, pool, batch_rows, projector, pad_token_id, adam, device, splittable):
                store.write(rows, projected)
                bar.update(len(rows))
        # ZeRO-3 forwards and backwards are collectives: a rank dealt fewer batches runs discarded
        # passes so that every rank runs as many as the busiest one.
        for _ in range(lockstep_passes - len(batches)):
            batch = {k: v.to(device) for k, v in collate([pool[int(i)] for i in plan[0]], pad_token_id).items()}
            per_example_gradients(model, batch, adam_state=adam)
            release_gathered(model)
    bar.close()
    return len(wanted)
