"""The one pipeline behind the callback and the offline mode: checkpoints in, a selection out.

    selector = ROSESelector(pool, validation, tokenizer, config, output_dir)
    selector.add_checkpoint(model, "checkpoint-10", learning_rate, adam_state)   # once per checkpoint
    selector.finalize()                                                           # scores + selection

On disk, under `<output_dir>/rose/`: `train/<checkpoint>/` (pool gradient store), `val_<dpo|sft>/<checkpoint>/`
(validation gradient store), `checkpoints.json` (name, learning rate, order). Every store is resumed
when it matches and refused when it does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from accelerate import PartialState
from datasets import Dataset

from .config import ROSEConfig
from .extraction import extract_gradients
from .distributed import check_supported, gathered
from .gradients import AdamState, num_trainable_parameters, trainable_parameters
from .projection import build_projector
from .scoring import CheckpointGradients, score_checkpoints
from .selection import write_selection
from .sft_data import BadRecordError, fingerprint_tokenized, tokenize_pool
from .store import GradientStore, _atomic_write_json
from .validation import (ROSEDPOTrainer, aggregate_by_subtask, check_preference_rows, sft_validation_gradients,
                         validation_dpo_config)

DEFAULT_SUBTASK = "default"


def with_subtasks(validation: Dataset) -> Dataset:
    if "subtask" in validation.column_names:
        for i, s in enumerate(validation["subtask"]):
            if not isinstance(s, str) or not s:
                raise BadRecordError("validation", i, "subtask", f"expected a non-empty string, got {s!r}")
        return validation
    return validation.add_column("subtask", [DEFAULT_SUBTASK] * len(validation))


def adapter_fingerprint(model) -> str:
    """Hash of the trainable weights: a checkpoint name alone does not say which weights produced a store."""
    h = hashlib.sha256()
    params = trainable_parameters(model)
    with gathered(p for _, p in params):  # ZeRO-3: whole weights (a collective: every rank hashes)
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_id(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(base.config, "_name_or_path", "") or type(base).__name__)


class ROSESelector:
    def __init__(self, pool: Dataset, validation: Dataset, tokenizer, config: ROSEConfig, output_dir: str | Path,
                 max_length: int | None = 1024, use_cpu: bool = False, run_config: dict | None = None,
                 progress: bool = True, ddp_backend: str | None = None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.rose_dir = self.output_dir / "rose"
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        self.max_length = max_length
        self.use_cpu = use_cpu
        self.ddp_backend = ddp_backend
        self.progress = progress
        self.run_config = run_config or {}
        self.pool = pool
        self.pool_tokens = tokenize_pool(pool, tokenizer, max_length)
        self.pool_fingerprint = fingerprint_tokenized(self.pool_tokens)
        self._pool_rows = self.pool_tokens.select_columns(["input_ids", "completion_mask"])
        self.validation = with_subtasks(validation)
        check_preference_rows(self.validation)
        self.subtasks_per_pair = list(self.validation["subtask"])
        self.validation_fingerprint = hashlib.sha256(
            json.dumps(self.validation.to_list(), sort_keys=True, default=str).encode()).hexdigest()[:32]
        self._projector = None
        self._dpo_trainers: dict[int, ROSEDPOTrainer] = {}

    # ---- per checkpoint --------------------------------------------------------------------------
    def projector(self, model):
        if self._projector is None:
            n = num_trainable_parameters(model)
            device = next(p for p in model.parameters() if p.requires_grad).device
            self._projector = build_projector(self.config.projection_type, n, self.config.projection_dim,
                                              self.config.projection_seed, device=device)
        return self._projector

    def _val_kind(self) -> str:
        return "dpo" if self.config.selection_method == "rose" else "sft"

    def add_checkpoint(self, model, name: str, learning_rate: float, adam_state: AdamState | None = None) -> None:
        """Extract (or resume) this checkpoint's pool and validation gradients and record its LR.

        Under several processes (accelerate/torchrun) every process calls this: each computes the pool
        rows `rank::world_size` into the shared memory-mapped store (disjoint rows), and the main
        process creates the stores and writes the validation gradients and the manifest.
        """
        if self.config.gradient_type == "adam" and adam_state is None:
            raise ValueError(f"{name}: gradient_type='adam' needs the checkpoint's Adam state")
        check_supported(model)
        state = PartialState()
        projector = self.projector(model)
        checkpoint = f"{name}@{adapter_fingerprint(model)}"
        common = dict(model=model_id(model), checkpoint=checkpoint, projection=projector.describe(),
                      dtype=self.config.store_dtype)
        open_train = lambda: GradientStore.open_or_create(  # noqa: E731
            self.rose_dir / "train" / name, gradient_type=self.config.gradient_type,
            pool_fingerprint=self.pool_fingerprint, num_rows=len(self.pool_tokens), **common)
        with state.main_process_first():  # the main process creates; the others then open the same files
            train = open_train()
        state.wait_for_everyone()  # no rank writes rows before every rank has read which ones are missing
        extract_gradients(model, self._pool_rows, train, projector, self.tokenizer.pad_token_id,
                          adam_state=adam_state if self.config.gradient_type == "adam" else None,
                          batch_size=self.config.gradient_batch_size, max_batch_tokens=self.config.max_batch_tokens,
                          shard=(state.process_index, state.num_processes),
                          progress=self.progress and state.is_local_main_process, desc=f"Pool gradients @ {name}")
        self._validation_store(model, name, common, write=state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            if not train.is_complete:
                raise RuntimeError(f"{name}: {len(train.missing_rows())} pool rows are still missing after extraction")
            self._record_checkpoint(name, learning_rate)
        state.wait_for_everyone()

    def _validation_store(self, model, name: str, common: dict, write: bool = True) -> GradientStore:
        """The validation set is small: every process computes it (TRL's loss gathers metrics across
        processes, so all must run it), the main process writes it."""
        kind = self._val_kind()
        extra = {"validation_beta": self.config.validation_beta} if kind == "dpo" else {}
        state = PartialState()
        with state.main_process_first():
            store = GradientStore.open_or_create(
                self.rose_dir / f"val_{kind}" / name, gradient_type=f"validation_{kind}",
                pool_fingerprint=self.validation_fingerprint, num_rows=len(self.validation), extra=extra, **common)
        # Every process must agree before running collectives.
        done = _all_true(store.is_complete) if state.num_processes > 1 else store.is_complete
        if not done:
            projector = self.projector(model)
            if kind == "dpo":
                grads = self._dpo_trainer(model).pair_gradients(projector)
            else:
                grads = sft_validation_gradients(model, self.validation, self.tokenizer, projector, self.max_length)
            if write:
                store.write(np.arange(len(self.validation)), grads.cpu().numpy())
        return store

    def _dpo_trainer(self, model) -> ROSEDPOTrainer:
        if id(model) not in self._dpo_trainers:
            args = validation_dpo_config(str(self.rose_dir / "dpo"), beta=self.config.validation_beta,
                                         batch_size=self.config.validation_batch_size, max_length=self.max_length,
                                         use_cpu=self.use_cpu, ddp_backend=self.ddp_backend)
            columns = [c for c in ("prompt", "chosen", "rejected") if c in self.validation.column_names]
            self._dpo_trainers[id(model)] = ROSEDPOTrainer(model, args, self.validation.select_columns(columns),
                                                           self.tokenizer)
        return self._dpo_trainers[id(model)]

    def _manifest(self) -> dict:
        path = self.rose_dir / "checkpoints.json"
        return json.loads(path.read_text()) if path.exists() else {"checkpoints": []}

    def _record_checkpoint(self, name: str, learning_rate: float) -> None:
        manifest = self._manifest()
        manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["name"] != name]
        manifest["checkpoints"].append({"name": name, "learning_rate": float(learning_rate)})
        self.rose_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.rose_dir / "checkpoints.json", manifest)

    # ---- end -------------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointGradients]:
        manifest = self._manifest()["checkpoints"]
        if not manifest:
            raise ValueError(f"no warm-up checkpoint was recorded under {self.rose_dir}: did the warm-up save any?")
        out = []
        for c in manifest:
            train = GradientStore.open(self.rose_dir / "train" / c["name"])
            val = GradientStore.open(self.rose_dir / f"val_{self._val_kind()}" / c["name"])
            if val.meta["projection"] != train.meta["projection"]:
                raise ValueError(f"{c['name']}: validation and pool gradients were projected differently")
            names, targets = aggregate_by_subtask(val.read_all(), self.subtasks_per_pair,
                                                  self.config.validation_aggregation)
            out.append(CheckpointGradients(c["name"], train, targets, c["learning_rate"]))
        self.subtasks = names
        return out

    def finalize(self, folder: str = "selection") -> Path:
        """Score every recorded checkpoint and write `<output_dir>/<folder>/` (main process only; the
        others wait and get the same path back)."""
        state = PartialState()
        path = self.output_dir / folder
        if state.is_main_process:
            path = self._finalize(folder)
        state.wait_for_everyone()
        return path

    def _finalize(self, folder: str) -> Path:
        checkpoints = self.checkpoints()
        table = score_checkpoints(checkpoints, self.subtasks)
        config = {**self.run_config, **self.config.to_dict(),
                  "checkpoints": [{"name": c.name, "learning_rate": c.learning_rate} for c in checkpoints],
                  "pool_fingerprint": self.pool_fingerprint, "validation_fingerprint": self.validation_fingerprint,
                  "projection": checkpoints[0].train.meta["projection"]}
        return write_selection(self.output_dir, self.pool, table, self.config.selection_fraction, config,
                               self.config.selection_method, self.subtasks, folder=folder)


def _all_true(flag: bool) -> bool:
    """AND of a flag over all processes."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def mean_lr_since(log_history: list[dict], after_step: int, upto_step: int) -> float | None:
    """Mean of the logged learning rates with after_step < step <= upto_step (Trainer log history)."""
    lrs = [e["learning_rate"] for e in log_history
           if "learning_rate" in e and after_step < e.get("step", -1) <= upto_step]
    return float(np.mean(lrs)) if lrs else None
