"""Pool -> gradient store: length-sorted batches, the run's featurizer, resumable sharded writes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from rose_trl.config import ROSEConfig
from rose_trl.data.sft import collate
from rose_trl.gradients.capture import AdamState, UnsupportedParameterError, trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.projection import Projector
from rose_trl.resources.budget import halving_on_oom
from rose_trl.resources.memory import gradient_bytes_per_row
from rose_trl.stores.store import GradientStore
from rose_trl.utils.distributed import full_numel, max_over_ranks, partitioned, release_gathered
from rose_trl.utils.modeling import eval_mode


logger = logging.getLogger(__name__)


def rows_for_budget(bytes_per_row: int, batch_size: int, memory_gb: float | None) -> int:
    """Rows per gradient pass: `batch_size`, lowered so the rows' gradient path fits `memory_gb`."""
    if memory_gb is None:
        return batch_size
    fits = int(memory_gb * 1e9 // bytes_per_row)
    if fits < 1:
        raise ValueError(
            f"gradient_memory_gb={memory_gb} cannot hold one gradient row (needs {bytes_per_row / 1e9:.2f} GB)"
        )
    return min(batch_size, fits)


def rows_per_pass(model: torch.nn.Module, featurizer: Featurizer, batch_size: int, memory_gb: float | None) -> int:
    """`rows_for_budget` for this model's adapter on the path `featurizer` takes."""
    sizes = [full_numel(p) for _, p in trainable_parameters(model)]
    per_row = gradient_bytes_per_row(sum(sizes), max(sizes), featurizer.dim, fused=featurizer.fused)
    return rows_for_budget(per_row, batch_size, memory_gb)


def plan_batches(
    lengths: np.ndarray, rows: np.ndarray, batch_size: int, max_batch_tokens: int | None
) -> list[np.ndarray]:
    """Group `rows` longest first so that padding is small; a batch holds at most `batch_size` rows
    and, when set, at most `max_batch_tokens` padded tokens (the memory budget)."""
    order = rows[np.argsort(-lengths[rows], kind="stable")]
    batches = []
    current = []
    width = 0
    for r in order:
        w = max(width, int(lengths[r]))
        if current and (
            len(current) >= batch_size or (max_batch_tokens and w * (len(current) + 1) > max_batch_tokens)
        ):
            batches.append(np.array(current))
            current = []
            w = int(lengths[r])
        current.append(int(r))
        width = w
    if current:
        batches.append(np.array(current))
    return batches


def _project_rows(
    model,
    pool,
    rows: np.ndarray,
    featurizer: Featurizer,
    pad_token_id: int,
    adam: AdamState | None,
    device: torch.device,
) -> np.ndarray:
    """Projected gradients of `rows` from one pass: float32 [len(rows), dim]."""
    batch = {k: v.to(device) for k, v in collate([pool[int(i)] for i in rows], pad_token_id).items()}
    projected = featurizer(model, batch, adam)
    release_gathered(model)
    return projected.cpu().numpy()


def extract_gradients(
    model: torch.nn.Module,
    pool: Sequence[dict],
    store: GradientStore,
    projector: Featurizer | Projector,
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

    `pool` items carry `input_ids` and `completion_mask` (see `sft_data.tokenize_pool`). `projector`: the
    run's `Featurizer` (a bare projector gets one of its own, which says which path it takes).
    `shard=(rank, world_size)`: batches are planned over all missing rows, then dealt out round-robin,
    so a row lands in the same batch (and gets bit-identical numbers) whatever the number of
    processes; `missing` (default: the store's missing rows now) must then be the same on every rank.
    Returns the number of rows this call computed.
    """
    wanted = store.missing_rows() if missing is None else np.asarray(missing, dtype=np.int64)
    if len(wanted) == 0:
        return 0
    featurizer = projector if isinstance(projector, Featurizer) else Featurizer(projector)
    rank, world = shard
    lengths = np.zeros(store.num_rows, dtype=np.int64)
    lengths[wanted] = (
        [len(ids) for ids in pool.select(wanted.tolist())["input_ids"]]
        if hasattr(pool, "select")
        else [len(pool[int(i)]["input_ids"]) for i in wanted]
    )
    plan = plan_batches(lengths, wanted, batch_size, max_batch_tokens)
    batches = plan[rank::world]
    wanted = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
    device = next((p.device for p in model.parameters() if p.requires_grad), None)
    if device is None:
        raise UnsupportedParameterError(
            "the model has no trainable parameters (is the LoRA adapter attached and active?)"
        )
    adam = adam_state.to(device) if adam_state is not None else None
    bar = tqdm(total=len(wanted), desc=desc, unit="ex", disable=not progress)
    # Agreed before any pass: a collective issued while another rank is still in a forward would deadlock.
    lockstep_passes = max_over_ranks(len(batches)) if world > 1 and partitioned(model) else len(batches)
    # Rows are independent, so a pass that runs out of memory can be halved. Not under ZeRO-3/FSDP on several
    # processes: there every rank must run the same number of passes (collectives), so the error is raised.
    splittable = not (world > 1 and partitioned(model))
    pending = list(batches)

    def passes(rows_a_pass: int) -> None:
        """The pending batches, each in passes of at most `rows_a_pass` rows; what is written is not redone."""
        while pending:
            rows = pending[0][:rows_a_pass]
            store.write(rows, _project_rows(model, pool, rows, featurizer, pad_token_id, adam, device))
            bar.update(len(rows))
            if len(pending[0]) > rows_a_pass:
                pending[0] = pending[0][rows_a_pass:]
            else:
                pending.pop(0)

    with eval_mode(model):
        largest = max((len(b) for b in batches), default=1)
        if splittable:  # rows are independent: a pass that runs out of memory is halved and run again
            halving_on_oom(passes, largest, "a pool gradient pass")
        else:
            passes(largest)
        # ZeRO-3 forwards and backwards are collectives: a rank dealt fewer batches runs discarded
        # passes so that every rank runs as many as the busiest one.
        for _ in range(lockstep_passes - len(batches)):
            _project_rows(model, pool, plan[0], featurizer, pad_token_id, adam, device)
    bar.close()
    return len(wanted)


def extract_pool_store(
    model: torch.nn.Module,
    pool: Sequence[dict],
    path,
    featurizer: Featurizer,
    config: ROSEConfig,
    pool_fingerprint: str,
    pad_token_id: int,
    identity: dict,
    adam_state: AdamState | None = None,
    progress: bool = True,
    desc: str = "Pool gradients",
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
) -> GradientStore:
    """A checkpoint's pool store at `path`, opened (resumed) or created, with its missing rows computed.
    `identity`: the store's model, checkpoint, projection and dtype. `batch_size`, `max_batch_tokens`: rows and
    padded tokens a pass (the run's memory plan; default: the config's limits). Under several processes every
    one calls this: the main process creates the store, then each computes its share of the rows into it."""
    state = PartialState()
    with state.main_process_first():  # the main process creates; the others then open the same files
        store = GradientStore.open_or_create(
            path,
            gradient_type=config.gradient_type,
            pool_fingerprint=pool_fingerprint,
            num_rows=len(pool),
            # only the main process may delete a mismatched store; the others open what it made
            overwrite=config.overwrite_stores and state.is_main_process,
            **identity,
        )
    # Every rank plans its batches from the same missing rows: read them before any rank writes.
    missing = store.missing_rows()
    state.wait_for_everyone()
    extract_gradients(
        model,
        pool,
        store,
        featurizer,
        pad_token_id,
        missing=missing,
        adam_state=adam_state,
        batch_size=batch_size
        or rows_per_pass(model, featurizer, config.gradient_batch_size, config.gradient_memory_gb),
        max_batch_tokens=max_batch_tokens if batch_size else config.max_batch_tokens,
        shard=(state.process_index, state.num_processes),
        progress=progress and state.is_local_main_process,
        desc=desc,
    )
    return store
