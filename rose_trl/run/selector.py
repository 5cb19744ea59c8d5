"""The one pipeline behind the callback and the offline mode: checkpoints in, a selection out.

    selector = ROSESelector(pool, validation, tokenizer, config, output_dir)
    selector.add_checkpoint(model, "checkpoint-10", learning_rate, adam_state)   # once per checkpoint
    selector.finalize()                                                           # scores + selection

It coordinates the parts (docs/architecture.md): the run ledger (`ledger`: rose/run.json, checkpoints.json,
step_lrs.json and every learning rate), the featurizer (`featurizer`, one per run), the pool's gradient stores
(`extraction`, rose/train/<checkpoint>/), the validation stores (`validation`), the scores and the selection
(`scoring`, `selection`, `explain`). Every store is resumed when it matches and refused when it does not.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.logging import get_logger
from datasets import Dataset

from rose_trl.config import ROSEConfig
from rose_trl.data.preferences import DEFAULT_SUBTASK, validate_preferences
from rose_trl.data.sft import fingerprint_tokenized, tokenize_pool
from rose_trl.gradients.capture import AdamState, lora_layers, num_trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.gradients.projection import build_projector
from rose_trl.outputs.explain import write_contributions
from rose_trl.outputs.selection import write_selection
from rose_trl.resources.budget import MemoryPlan, plan_run
from rose_trl.resources.cost import SelectionWork
from rose_trl.resources.disk import require_free_space
from rose_trl.run.ledger import RunLedger, checkpoint_identity, resolve_checkpoints
from rose_trl.run.prefilter import Prefilter
from rose_trl.scoring.agreement import agreement_warnings, validation_agreement
from rose_trl.scoring.columns import PREFILTER_SCORE, PREFILTERED_OUT, SCORE
from rose_trl.scoring.scores import CheckpointGradients, ValidationTargets, score_checkpoints, validation_targets
from rose_trl.stores.extraction import extract_pool_store, rows_per_pass
from rose_trl.stores.store import GradientStore, store_bytes
from rose_trl.stores.validation import ValidationGradients
from rose_trl.utils.distributed import check_supported
from rose_trl.utils.modeling import model_id


logger = get_logger(__name__)


def with_subtasks(validation: Dataset) -> Dataset:
    """One subtask, "default", when the preference set names none."""
    if "subtask" in validation.column_names:
        return validation
    return validation.add_column("subtask", [DEFAULT_SUBTASK] * len(validation))


class ROSESelector:
    def __init__(
        self,
        pool: Dataset,
        validation: Dataset,
        tokenizer,
        config: ROSEConfig,
        output_dir: str | Path,
        max_length: int | None = 1024,
        use_cpu: bool = False,
        run_config: dict | None = None,
        progress: bool = True,
        ddp_backend: str | None = None,
    ):
        self.config, self.output_dir, self.tokenizer = config, Path(output_dir), tokenizer
        self.rose_dir = self.output_dir / "rose"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token"
                )
            tokenizer.pad_token = tokenizer.eos_token
        self.max_length, self.progress, self.run_config = max_length, progress, run_config or {}
        self.pool = pool
        self.pool_tokens = tokenize_pool(pool, tokenizer, max_length)
        self.pool_fingerprint = fingerprint_tokenized(self.pool_tokens)
        self.pool_rows = self.pool_tokens.select_columns(["input_ids", "completion_mask"])
        self.pool_width = max(len(ids) for ids in self.pool_rows["input_ids"])  # the longest row, for the plan
        self.plan: MemoryPlan | None = None
        self.validation = with_subtasks(validation)
        validate_preferences(self.validation, "validation")
        self.validation_fingerprint = hashlib.sha256(
            json.dumps(self.validation.to_list(), sort_keys=True, default=str).encode()
        ).hexdigest()[:32]
        self.validation_stores = ValidationGradients(
            self.validation,
            tokenizer,
            config,
            self.rose_dir,
            self.validation_fingerprint,
            max_length,
            use_cpu,
            ddp_backend,
        )
        self.ledger = RunLedger(self.rose_dir)
        self._featurizer: Featurizer | None = None
        # The warm-up's number of checkpoints, when the caller knows it (the memory plan's account of the passes).
        self.total_checkpoints: int | None = None
        self.prefilter = Prefilter(self) if config.prefilter_fraction else None
        with PartialState().main_process_first():  # the main process checks (and may clear) rose/ first
            self.cleared_previous_run = self.ledger.open(self.run_fingerprint(), config.overwrite_stores)

    def run_fingerprint(self) -> dict:
        """What every store under rose/ depends on. The selection method and fraction are left out on
        purpose: a LESS run reuses a ROSE run's pool stores, and scoring is redone on every run; so are
        selection_checkpoints and the prefilter's options (a checkpoint's stores, and the first pass's own,
        are the same whichever subset or fraction is scored)."""
        keys = (
            "projection_type",
            "projection_dim",
            "projection_seed",
            "gradient_type",
            "store_dtype",
            "validation_beta",
            "gradient_layers",
        )
        return {
            "pool_fingerprint": self.pool_fingerprint,
            "validation_fingerprint": self.validation_fingerprint,
            "max_length": self.max_length,
            **{k: getattr(self.config, k) for k in keys},
            **{f"run.{k}": v for k, v in sorted(self.run_config.items())},
        }

    def featurizer(self, model) -> Featurizer:
        """The run's featurizer (its projector sized to the adapter) and memory plan, made at the first checkpoint."""
        if self._featurizer is None:
            device = next(p for p in model.parameters() if p.requires_grad).device
            c = self.config
            projector = build_projector(
                c.projection_type, num_trainable_parameters(model), c.projection_dim, c.projection_seed, device=device
            )
            logger.warning("projection in use: %s, %s", projector.implementation, projector.describe())
            self._featurizer = Featurizer(projector, gradient_layers=c.gradient_layers)
            self.plan = self.memory_plan(model, self._featurizer)
        return self._featurizer

    def memory_plan(self, model, featurizer: Featurizer) -> MemoryPlan:
        """Rows a pass for the pool's and the validation's gradient passes under the run's memory budget.

        The budget is planned by rose_trl.resources.budget.
        """
        c, dpo = self.config, self.validation_stores.kind == "dpo"
        plan = plan_run(
            model,
            c,
            featurizer.fused,
            self.pool_width,
            self.validation_stores.longest() if dpo else None,
            rows_per_pass(model, featurizer, c.gradient_batch_size, c.gradient_memory_gb),
            notes=[self.work(model).describe()],
        )
        if dpo:
            self.validation_stores.pairs_per_pass = plan.passes["validation"].rows
            self.validation_stores.head_tokens = plan.passes["validation"].head_tokens
        self.validation_stores.sft_rows_per_pass = min(8, plan.passes["gradient"].rows)
        return plan

    def work(self, model) -> SelectionWork:
        """The pool gradient passes this run's cost options leave (resources/cost.py), for the memory plan's log: of
        the warm-up's checkpoints when the caller knows how many (`total_checkpoints`), else of each one."""
        c, total = self.config, self.total_checkpoints
        chosen = len(resolve_checkpoints(c.selection_checkpoints, total)) if total else 1
        return SelectionWork(
            pool_rows=len(self.pool_tokens),
            checkpoints=total,
            chosen=chosen,
            layers=c.gradient_layers,
            total_layers=lora_layers(model),
            prefilter_fraction=c.prefilter_fraction,
            prefilter_layers=c.prefilter_layers if c.prefilter_fraction else None,
        )

    def check_disk_space(self, checkpoints: int | list[str], extra: int = 0, extra_what: str = "") -> int:
        """Before any gradient work: refuse (DiskSpaceError: the path, the bytes needed, the bytes free) when the
        stores of `checkpoints` (names, or a number still to be saved), those on disk excepted, and `extra` bytes
        of `extra_what` do not fit on output_dir's disk (disk.py, store.store_bytes)."""
        names = [None] * checkpoints if isinstance(checkpoints, int) else checkpoints
        dim, dtype, val = self.config.projection_dim, self.config.store_dtype, self.validation_stores.folder
        if self.prefilter is not None and names and self.prefilter.checkpoint() is None:
            extra += store_bytes(len(self.pool_tokens), dim, dtype) + store_bytes(len(self.validation), dim, dtype)
            extra_what = " and ".join(filter(None, [extra_what, "the first pass's stores"]))
        needed = extra + sum(
            store_bytes(len(self.pool_tokens), dim, dtype) * (not (name and (self.rose_dir / "train" / name).exists()))
            + store_bytes(len(self.validation), dim, dtype) * (not (name and (val / name).exists()))
            for name in names
        )
        require_free_space(
            self.output_dir,
            needed,
            f"the gradient stores of {len(names)} checkpoint(s) ("
            f"{len(self.pool_tokens)} pool rows and {len(self.validation)} validation pairs x {dim} dims, "
            f"{dtype})" + (f" and {extra_what}" if extra else ""),
        )
        return needed

    def add_checkpoint(
        self, model, name: str, learning_rate: float | None, adam_state: AdamState | None = None
    ) -> None:
        """Extract (or resume) this checkpoint's pool and validation gradients and record its learning rate.

        Under several processes (accelerate/torchrun) every process calls this: each computes its share of
        the pool rows into the shared memory-mapped store, and the main process creates the stores and
        writes the validation gradients and the ledger.
        """
        if self.config.gradient_type == "adam" and adam_state is None:
            raise ValueError(f"{name}: gradient_type='adam' needs the checkpoint's Adam state")
        check_supported(model)
        state = PartialState()
        featurizer = self.featurizer(model)
        identity = checkpoint_identity(name, model)
        common = dict(
            model=model_id(model),
            checkpoint=identity,
            projection=featurizer.projector.describe(),
            dtype=self.config.store_dtype,
            extra={"gradient_layers": self.config.gradient_layers},
        )
        rows = None
        if self.prefilter is not None:  # the first pass at the first checkpoint used, then its candidates only
            self.prefilter.run(model, name, common, adam_state)
            rows = self.prefilter.candidates()
        passes = self.plan.passes["gradient"]
        train = extract_pool_store(
            model,
            self.pool_rows,
            self.rose_dir / "train" / name,
            featurizer,
            self.config,
            self.pool_fingerprint,
            self.tokenizer.pad_token_id,
            common,
            adam_state=adam_state if self.config.gradient_type == "adam" else None,
            progress=self.progress,
            desc=f"Pool gradients @ {name}",
            batch_size=passes.rows,
            max_batch_tokens=passes.tokens,
            rows=rows,
        )
        self.validation_stores.store(model, name, featurizer, common, write=state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            missing = train.missing_rows() if rows is None else np.intersect1d(train.missing_rows(), rows)
            if len(missing):
                raise RuntimeError(f"{name}: {len(missing)} pool rows are still missing after extraction")
            self.ledger.record_checkpoint(name, learning_rate, identity)
        state.wait_for_everyone()

    def skip_checkpoint(self, model, name: str, learning_rate: float | None) -> None:
        """Record a checkpoint that selection_checkpoints leaves out: its learning rate and weights, no stores (so
        that positions count every checkpoint of the warm-up, and a later selection may still compute them)."""
        state = PartialState()
        identity = checkpoint_identity(name, model)  # every process: the hash gathers sharded weights
        if state.is_main_process and not self.ledger.has_stores(name):
            self.ledger.record_checkpoint(name, learning_rate, identity, stores=False)
        state.wait_for_everyone()

    def checkpoints(self) -> tuple[list[CheckpointGradients], ValidationTargets]:
        """Every recorded checkpoint's stores, targets and eta_i, and the validation targets they share."""
        names, learning_rates = self.ledger.scoring_learning_rates(
            self.config.checkpoint_learning_rates, self.config.selection_checkpoints
        )
        trains = [GradientStore.open(self.rose_dir / "train" / name) for name in names]
        grads = {
            name: self.validation_stores.read(name, train.meta["projection"])
            for name, train in zip(names, trains, strict=True)
        }
        targets = validation_targets(grads, list(self.validation["subtask"]), self.config.validation_aggregation)
        return [
            CheckpointGradients(name, train, targets.targets[i], lr, pair_vectors=targets.vectors[i])
            for i, (name, train, lr) in enumerate(zip(names, trains, learning_rates, strict=True))
        ], targets

    def finalize(self, folder: str = "selection") -> Path:
        """Score every recorded checkpoint and write `<output_dir>/<folder>/` (main process only; the
        others wait and get the same path back)."""
        state = PartialState()
        if state.is_main_process:
            self._finalize(folder)
        state.wait_for_everyone()
        return self.output_dir / folder

    def _finalize(self, folder: str) -> Path:
        checkpoints, targets = self.checkpoints()
        first_pass = None
        if self.prefilter is None:
            table = score_checkpoints(checkpoints, targets.subtasks)
        else:  # full scores for the first pass's candidates only; every row keeps its first-pass score
            candidates = self.prefilter.candidates()
            table = score_checkpoints(checkpoints, targets.subtasks, rows=candidates)
            table[PREFILTER_SCORE] = self.prefilter.table()[0][SCORE]
            table[PREFILTERED_OUT] = np.isnan(table[SCORE])
            first_pass = {
                "checkpoint": self.prefilter.checkpoint(),
                "layers": self.config.prefilter_layers,
                "fraction": self.config.prefilter_fraction,
                "candidates": len(candidates),
            }
        # The run's record last: its gguf_file is the resolved file (with gguf_sha256), ROSEConfig's only the option.
        config = {
            **self.config.to_dict(),
            **self.run_config,
            "checkpoints": [{"name": c.name, "learning_rate": c.learning_rate} for c in checkpoints],
            "pool_fingerprint": self.pool_fingerprint,
            "validation_fingerprint": self.validation_fingerprint,
            "projection": checkpoints[0].train.meta["projection"],
        }

        agreement = validation_agreement(
            targets.vectors, [c.learning_rate for c in checkpoints], list(self.validation["subtask"]), targets.usable
        )
        warnings = agreement_warnings(agreement)
        for warning in warnings:
            logger.warning(warning)

        def explain(tmp: Path, chosen: np.ndarray) -> dict:
            """contributions.parquet and pairs.parquet of the selected rows; summary entries on left-out pairs and
            on how much each subtask's validation pairs agree (agreement.py)."""
            write_contributions(tmp, checkpoints, chosen, self.validation, targets.usable, progress=self.progress)
            return {
                **({"prefilter": first_pass} if first_pass else {}),
                "left_out_pairs": np.flatnonzero(~targets.usable).tolist(),
                "zero_gradient_pairs": targets.zero_gradient_pairs,
                "validation_agreement": agreement,
                "agreement_warnings": warnings,
            }

        return write_selection(
            self.output_dir,
            self.pool,
            table,
            self.config.selection_fraction,
            config,
            self.config.selection_method,
            targets.subtasks,
            folder=folder,
            subtask_balance=self.config.subtask_balance,
            pair_counts=Counter(self.validation["subtask"]),
            before_publish=explain,
        )
