"""The one pipeline behind the callback and the offline mode: checkpoints in, a selection out.

    selector = ROSESelector(pool, validation, tokenizer, config, output_dir)
    selector.add_checkpoint(model, "checkpoint-10", learning_rate, adam_state)   # once per checkpoint
    selector.finalize()                                                           # scores + selection

On disk, under `<output_dir>/rose/`: `train/<checkpoint>/` (pool gradient store), `val_<dpo|sft>/<checkpoint>/`
(validation gradient store; `val_dpo_<loss tag>/` for a validation loss other than sigmoid),
`checkpoints.json` (name, learning rate, order). Every store is resumed
when it matches and refused when it does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset

from .config import ROSEConfig
from .distributed import check_supported, gathered
from .extraction import extract_gradients, rows_per_pass
from .gradients import AdamState, num_trainable_parameters, trainable_parameters
from .projection import build_projector
from .schedules import mean_over_steps
from .scoring import CheckpointGradients, score_checkpoints
from .selection import write_selection
from .sft_data import fingerprint_tokenized, tokenize_pool
from .store import GradientStore, StoreMismatchError, _atomic_write_json, describe_mismatch, remove_tree
from .data.preferences import DEFAULT_SUBTASK, validate_preferences
from .validation import (ROSEDPOTrainer, sft_validation_gradients, validation_dpo_config, validation_loss_tag,
                         validation_targets)

logger = logging.getLogger(__name__)


def with_subtasks(validation: Dataset) -> Dataset:
    """One subtask, "default", when the preference set names none."""
    if "subtask" in validation.column_names:
        return validation
    return validation.add_column("subtask", [DEFAULT_SUBTASK] * len(validation))


def adapter_fingerprint(model) -> str:
    """Hash of the trainable weights: a checkpoint name alone does not say which weights produced a store."""
    h = hashlib.sha256()
    with gathered(model):  # ZeRO-3/FSDP2: whole weights (a collective: every rank hashes)
        for name, p in trainable_parameters(model):
            h.update(name.encode())
            # a copy: numpy must not hold (and pin) the storage FSDP2 frees when it reshards
            h.update(p.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
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
        validate_preferences(self.validation, "validation")
        self.subtasks_per_pair = list(self.validation["subtask"])
        self.validation_fingerprint = hashlib.sha256(
            json.dumps(self.validation.to_list(), sort_keys=True, default=str).encode()).hexdigest()[:32]
        self._projector = None
        self._dpo_trainers: dict[int, ROSEDPOTrainer] = {}
        with PartialState().main_process_first():  # the main process checks (and may clear) rose/ first
            self.cleared_previous_run = self._check_run()

    def run_fingerprint(self) -> dict:
        """What every store under rose/ depends on. The selection method and fraction are left out on
        purpose: a LESS run reuses a ROSE run's pool stores, and scoring is redone on every run."""
        keys = ("projection_type", "projection_dim", "projection_seed", "gradient_type", "store_dtype", "validation_beta")
        return {"pool_fingerprint": self.pool_fingerprint, "validation_fingerprint": self.validation_fingerprint,
                "max_length": self.max_length, **{k: getattr(self.config, k) for k in keys},
                **{f"run.{k}": v for k, v in sorted(self.run_config.items())}}

    def _check_run(self) -> bool:
        """Refuse (or, with overwrite_stores, clear: returns True) a rose/ folder left by a run on other
        inputs, before any of its checkpoints or stores could be mixed into this one."""
        path = self.rose_dir / "run.json"
        wanted = json.loads(json.dumps(self.run_fingerprint(), default=str))
        cleared = False
        if path.exists():
            found = json.loads(path.read_text())
            diff = describe_mismatch(found, wanted, keys=sorted(set(found) | set(wanted)))
            if not diff:
                return False
            if not self.config.overwrite_stores:
                raise StoreMismatchError(f"{self.rose_dir} holds the gradients of a run on other inputs:\n  "
                                         + "\n  ".join(d.replace("store has", "found") for d in diff)
                                         + "\n(use another output_dir, or set overwrite_stores: true to recompute)")
            remove_tree(self.rose_dir)
            cleared = True
        self.rose_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(path, wanted)
        return cleared

    # ---- per checkpoint --------------------------------------------------------------------------
    def projector(self, model):
        if self._projector is None:
            n = num_trainable_parameters(model)
            device = next(p for p in model.parameters() if p.requires_grad).device
            self._projector = build_projector(self.config.projection_type, n, self.config.projection_dim,
                                              self.config.projection_seed, device=device)
            if PartialState().is_local_main_process:
                logger.warning("projection in use: %s, %s", self._projector.implementation, self._projector.describe())
        return self._projector

    def _val_kind(self) -> str:
        return "dpo" if self.config.selection_method == "rose" else "sft"

    def _val_dir(self) -> Path:
        """val_dpo/ for the paper's sigmoid target, val_dpo_<tag>/ for another loss (switching back and forth
        reuses both), val_sft/ for LESS."""
        kind = self._val_kind()
        c = self.config
        tag = validation_loss_tag(c.validation_loss_type, c.validation_loss_weights, c.validation_label_smoothing) \
            if kind == "dpo" else ""
        return self.rose_dir / (f"val_{kind}_{tag}" if tag else f"val_{kind}")

    def _validation_loss(self) -> dict:
        """What the DPO validation gradients depend on besides the model: recorded in their stores' meta."""
        c = self.config
        return {"validation_beta": c.validation_beta, "validation_loss_type": list(c.validation_loss_type),
                "validation_loss_weights": c.validation_loss_weights or [1.0] * len(c.validation_loss_type),
                "validation_label_smoothing": c.validation_label_smoothing}

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
            pool_fingerprint=self.pool_fingerprint, num_rows=len(self.pool_tokens),
            # only the main process may delete a mismatched store; the others open what it made
            overwrite=self.config.overwrite_stores and state.is_main_process, **common)
        with state.main_process_first():  # the main process creates; the others then open the same files
            train = open_train()
        # Every rank plans its batches from the same missing rows: read them before any rank writes.
        missing = train.missing_rows()
        state.wait_for_everyone()
        extract_gradients(model, self._pool_rows, train, projector, self.tokenizer.pad_token_id, missing=missing,
                          adam_state=adam_state if self.config.gradient_type == "adam" else None,
                          batch_size=rows_per_pass(model, projector, self.config.gradient_batch_size,
                                                   self.config.gradient_memory_gb),
                          max_batch_tokens=self.config.max_batch_tokens,
                          shard=(state.process_index, state.num_processes),
                          progress=self.progress and state.is_local_main_process, desc=f"Pool gradients @ {name}")
        self._validation_store(model, name, common, write=state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            if not train.is_complete:
                raise RuntimeError(f"{name}: {len(train.missing_rows())} pool rows are still missing after extraction")
            self._record_checkpoint(name, learning_rate, checkpoint)
        state.wait_for_everyone()

    def _validation_store(self, model, name: str, common: dict, write: bool = True) -> GradientStore:
        """The validation set is small: every process computes it (TRL's loss gathers metrics across
        processes, so all must run it), the main process writes it."""
        kind = self._val_kind()
        extra = self._validation_loss() if kind == "dpo" else {}
        state = PartialState()
        with state.main_process_first():
            store = GradientStore.open_or_create(
                self._val_dir() / name, gradient_type=f"validation_{kind}",
                pool_fingerprint=self.validation_fingerprint, num_rows=len(self.validation), extra=extra,
                overwrite=self.config.overwrite_stores and state.is_main_process, **common)
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
            c = self.config
            args = validation_dpo_config(str(self.rose_dir / "dpo"), beta=c.validation_beta,
                                         batch_size=c.validation_batch_size, max_length=self.max_length,
                                         use_cpu=self.use_cpu, ddp_backend=self.ddp_backend,
                                         loss_type=c.validation_loss_type, loss_weights=c.validation_loss_weights,
                                         label_smoothing=c.validation_label_smoothing)
            columns = [c for c in ("prompt", "chosen", "rejected") if c in self.validation.column_names]
            self._dpo_trainers[id(model)] = ROSEDPOTrainer(model, args, self.validation.select_columns(columns),
                                                           self.tokenizer)
        return self._dpo_trainers[id(model)]

    def _manifest(self) -> dict:
        path = self.rose_dir / "checkpoints.json"
        return json.loads(path.read_text()) if path.exists() else {"checkpoints": []}

    def _record_checkpoint(self, name: str, learning_rate: float | None, checkpoint: str) -> None:
        """`checkpoint`: name@adapter-hash, so that a recorded rate is reused only for the same weights. A rate
        of None (given only by checkpoint_learning_rates) is recorded as unknown."""
        manifest = self._manifest()
        entry = {"name": name, "learning_rate": None if learning_rate is None else float(learning_rate),
                 "checkpoint": checkpoint}
        if entry in manifest["checkpoints"]:
            return  # a re-run: nothing to rewrite
        names = [c["name"] for c in manifest["checkpoints"]]
        if name in names:  # in place: the manifest's order is the checkpoints' (step) order
            manifest["checkpoints"][names.index(name)] = entry
        else:
            manifest["checkpoints"].append(entry)
        self.rose_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.rose_dir / "checkpoints.json", manifest)

    def recorded_learning_rate(self, name: str, model) -> float | None:
        """The learning rate rose/checkpoints.json records for `name`, if recorded for the weights `model` holds."""
        entry = next((c for c in self._manifest()["checkpoints"] if c["name"] == name), None)
        if entry is None or entry.get("learning_rate") is None:
            return None
        if "checkpoint" in entry and entry["checkpoint"] != f"{name}@{adapter_fingerprint(model)}":
            return None  # recorded for other weights under the same name
        return entry["learning_rate"]

    def is_recorded(self, name: str) -> bool:
        return any(c["name"] == name for c in self._manifest()["checkpoints"])

    # The learning rate of every optimizer step, kept on disk so that a checkpoint whose extraction was
    # killed can be finished after a resume with the same eta_i (the steps before it are not replayed).
    def log_step_lr(self, step: int, learning_rate: float) -> None:
        path = self.rose_dir / "step_lrs.json"
        lrs = json.loads(path.read_text()) if path.exists() else {}
        lrs[str(step)] = float(learning_rate)
        _atomic_write_json(path, lrs)

    def step_learning_rates(self) -> dict[int, float]:
        """rose/step_lrs.json: optimizer step -> the LR it applied."""
        path = self.rose_dir / "step_lrs.json"
        return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}

    def logged_mean_lr(self, name: str, step: int) -> float:
        """Mean logged LR of the steps since the previous recorded checkpoint, up to `step`."""
        done = [int(c["name"].rsplit("-", 1)[-1]) for c in self._manifest()["checkpoints"]
                if c["name"].rsplit("-", 1)[-1].isdigit()]
        after = max([s for s in done if s < step], default=0)
        lr = mean_over_steps(self.step_learning_rates(), after, step)
        if lr is None:
            raise ValueError(f"{name} was saved but its gradients were never extracted, and the learning rates of steps "
                             f"{after + 1}-{step} were not all logged in {self.rose_dir / 'step_lrs.json'}: cannot "
                             "weight it; start a new output_dir or set checkpoint_learning_rates")
        return lr

    # ---- end -------------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointGradients]:
        manifest = self._manifest()["checkpoints"]
        if not manifest:
            raise ValueError(f"no warm-up checkpoint was recorded under {self.rose_dir}: did the warm-up save any?")
        learning_rates = self._scoring_learning_rates(manifest)
        trains, vals = [], {}
        for c in manifest:
            trains.append(GradientStore.open(self.rose_dir / "train" / c["name"]))
            val = GradientStore.open(self._val_dir() / c["name"])
            if val.meta["projection"] != trains[-1].meta["projection"]:
                raise ValueError(f"{c['name']}: validation and pool gradients were projected differently")
            vals[c["name"]] = val.read_all()
        self.targets = validation_targets(vals, self.subtasks_per_pair, self.config.validation_aggregation)
        self.subtasks = self.targets.subtasks
        return [CheckpointGradients(c["name"], train, self.targets.targets[i], learning_rate,
                                    pair_vectors=self.targets.vectors[i])
                for i, (c, train, learning_rate) in enumerate(zip(manifest, trains, learning_rates))]

    def _scoring_learning_rates(self, manifest: list[dict]) -> list[float]:
        """The recorded rates, or checkpoint_learning_rates (which override them) when given."""
        names = [c["name"] for c in manifest]
        explicit = self.config.checkpoint_learning_rates
        if explicit is None:
            unknown = [c["name"] for c in manifest if c.get("learning_rate") is None]
            if unknown:
                raise ValueError(f"{self.rose_dir / 'checkpoints.json'} records no learning rate for {unknown}: set "
                                 f"checkpoint_learning_rates (one per checkpoint, in step order: {names})")
            return [c["learning_rate"] for c in manifest]
        if len(explicit) != len(manifest):
            raise ValueError(f"checkpoint_learning_rates has {len(explicit)} values but {len(manifest)} checkpoints were "
                             f"recorded ({names})")
        if PartialState().is_main_process:
            logger.warning("checkpoint_learning_rates given: %s used for %s, overriding the recorded learning rates",
                           list(explicit), names)
        return [float(lr) for lr in explicit]

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
        # The run's record last: its gguf_file is the resolved file (with gguf_sha256), ROSEConfig's only the option.
        config = {**self.config.to_dict(), **self.run_config,
                  "checkpoints": [{"name": c.name, "learning_rate": c.learning_rate} for c in checkpoints],
                  "pool_fingerprint": self.pool_fingerprint, "validation_fingerprint": self.validation_fingerprint,
                  "projection": checkpoints[0].train.meta["projection"]}
        return write_selection(self.output_dir, self.pool, table, self.config.selection_fraction, config,
                               self.config.selection_method, self.subtasks, folder=folder,
                               subtask_balance=self.config.subtask_balance,
                               pair_counts=Counter(self.subtasks_per_pair),
                               before_publish=lambda tmp, chosen: self._explain(tmp, checkpoints, chosen))

    def _explain(self, folder: Path, checkpoints: list[CheckpointGradients], chosen: np.ndarray) -> dict:
        """contributions.parquet and pairs.parquet of the selected rows; summary entries on left-out pairs."""
        from .explain import write_contributions

        write_contributions(folder, checkpoints, chosen, self.validation, self.targets.usable, progress=self.progress)
        return {"left_out_pairs": np.flatnonzero(~self.targets.usable).tolist(),
                "zero_gradient_pairs": self.targets.zero_gradient_pairs}


def _all_true(flag: bool) -> bool:
    """AND of a flag over all processes."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0

