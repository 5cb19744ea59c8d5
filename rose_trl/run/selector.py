"""The one pipeline behind the callback and the offline mode: checkpoints in, a selection out.

    selector = ROSESelector(pool, validation, tokenizer, config, output_dir)
    selector.add_checkpoint(model, "checkpoint-10", learning_rate, adam_state)   # once per checkpoint
    selector.finalize()                                                           # scores + selection

It coordinates the parts (docs/reference/architecture.md): the run ledger (`ledger`: rose/run.json, checkpoints.json,
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
from transformers import PreTrainedTokenizerBase

from rose_trl.config import ROSEConfig
from rose_trl.data.preferences import DEFAULT_SUBTASK, subsample_report, validate_preferences
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
from rose_trl.scoring.agreement import agreement_report
from rose_trl.scoring.scores import CheckpointGradients, ValidationTargets, score_checkpoints, validation_targets
from rose_trl.stores.extraction import extract_pool_store, rows_per_pass
from rose_trl.stores.store import GradientStore, store_bytes
from rose_trl.stores.validation import ValidationGradients
from rose_trl.utils.distributed import check_supported
from rose_trl.utils.modeling import model_id
from rose_trl.utils.timing import stage


logger = get_logger(__name__)


def with_subtasks(validation: Dataset) -> Dataset:
    """One subtask, "default", when the preference set names none."""
    if "subtask" in validation.column_names:
        return validation
    return validation.add_column("subtask", [DEFAULT_SUBTASK] * len(validation))


def pad_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """A tokenizer without a pad token pads with its eos token (as TRL's trainers do)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an eos token to pad with; set tokenizer.pad_token"
            )
        tokenizer.pad_token = tokenizer.eos_token


def _stores_to_write(folder: Path, names: list[str | None]) -> int:
    """How many of the checkpoints' stores in `folder` are not on disk yet (a None name: a checkpoint to come)."""
    return len([name for name in names if not name or not (folder / name).exists()])


def stores_to_write(selector: ROSESelector, names: list[str | None], extra: int = 0, extra_what: str = ""):
    """(bytes, what they hold) of the gradient stores `selector` still has to write for the checkpoints `names` (a
    None name: a checkpoint to come), with the first pass's own stores while it has not run, and `extra` bytes of
    `extra_what`."""
    c = selector.config
    pool_store = store_bytes(len(selector.pool_tokens), c.projection_dim, c.store_dtype)
    validation_store = store_bytes(len(selector.validation), c.projection_dim, c.store_dtype)
    if selector.prefilter is not None and names and selector.prefilter.checkpoint() is None:
        extra += pool_store + validation_store
        extra_what = " and ".join(filter(None, [extra_what, "the first pass's stores"]))
    needed = extra
    needed += pool_store * _stores_to_write(selector.rose_dir / "train", names)
    needed += validation_store * _stores_to_write(selector.validation_stores.folder, names)
    what = (
        f"the gradient stores of {len(names)} checkpoint(s) ({len(selector.pool_tokens)} pool rows and "
        f"{len(selector.validation)} validation pairs x {c.projection_dim} dims, {c.store_dtype})"
    )
    return needed, what + (f" and {extra_what}" if extra else "")


def selection_work(config: ROSEConfig, pool_rows: int, total_checkpoints: int | None, model) -> SelectionWork:
    """The pool gradient passes `config`'s cost options leave (resources/cost.py): of the warm-up's checkpoints when
    their number is known (`total_checkpoints`), else of each one."""
    total = total_checkpoints
    return SelectionWork(
        pool_rows=pool_rows,
        checkpoints=total,
        chosen=len(resolve_checkpoints(config.selection_checkpoints, total)) if total else 1,
        layers=config.gradient_layers,
        total_layers=lora_layers(model),
        prefilter_fraction=config.prefilter_fraction,
        prefilter_layers=config.prefilter_layers if config.prefilter_fraction else None,
    )


class ROSESelector:
    """The selection pipeline behind `ROSECallback` and `select_from_checkpoints`: checkpoints in, a selection out.

    Creating it tokenizes the pool, validates the preference set and opens the run's ledger (`rose/run.json`):
    an output folder left by a run on other inputs is refused (or cleared, with `overwrite_stores`). Then
    `add_checkpoint` is called once per warm-up checkpoint (the pool's and the pairs' projected gradients, stored
    under `rose/`, and the checkpoint's learning rate) and `finalize` scores the pool and writes the selection.
    Under several processes every process makes the same calls; each computes its share of the pool rows.

    Args:
        pool (`datasets.Dataset`):
            The training pool: `messages` (chat) or `prompt`/`completion` rows (`rose_trl.load_pool`).
        validation (`datasets.Dataset`):
            The few-shot preference set: `prompt`/`chosen`/`rejected` rows, with an optional `subtask` column
            (one subtask, "default", without it).
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            The warm-up model's tokenizer. Without a pad token it pads with its eos token.
        config (`ROSEConfig`):
            The selection options (method, fraction, projection, validation loss, memory budget, ...).
        output_dir (`str` or `pathlib.Path`):
            Where `rose/` (the stores and the ledger) and the selection folder go.
        max_length (`int` or `None`, *optional*, defaults to `1024`):
            Pool rows and pairs are truncated to this many tokens (`None`: not truncated).
        use_cpu (`bool`, *optional*, defaults to `False`):
            Run the validation passes on the CPU (as `TrainingArguments.use_cpu`).
        run_config (`dict`, *optional*):
            Extra settings the stores depend on, recorded in `rose/run.json` and the selection's `config.json`.
        progress (`bool`, *optional*, defaults to `True`):
            Show progress bars for the gradient passes.
        ddp_backend (`str`, *optional*):
            The validation trainer's `ddp_backend` (e.g. "gloo" for several CPU processes).

    Example:

    ```python
    from transformers import AutoTokenizer

    from rose_trl import ROSEConfig, ROSESelector, load_pool, load_preferences

    tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-hf")
    selector = ROSESelector(load_pool("pool.jsonl"), load_preferences("preferences.jsonl"), tokenizer,
                            ROSEConfig(selection_fraction=0.05), output_dir="outputs/run")
    for name, model, learning_rate, adam_state in checkpoints:  # e.g. a warm-up's saved checkpoints
        selector.add_checkpoint(model, name, learning_rate, adam_state)
    selector.finalize()  # -> outputs/run/selection/
    ```
    """

    def __init__(
        self,
        pool: Dataset,
        validation: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        config: ROSEConfig,
        output_dir: str | Path,
        max_length: int | None = 1024,
        use_cpu: bool = False,
        run_config: dict | None = None,
        progress: bool = True,
        ddp_backend: str | None = None,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.rose_dir = self.output_dir / "rose"
        pad_with_eos(tokenizer)
        self.max_length = max_length
        self.progress = progress
        self.run_config = run_config or {}
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
        self.ledger.compare(self.run_fingerprint(), config.overwrite_stores)  # a refusal stops every process
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

    @stage("projection and memory plan")
    def prepare_featurizer(self, model) -> Featurizer:
        """At the first checkpoint, build the run's featurizer (its projector sized to the adapter), plan the
        passes under the memory budget (`self.plan`) and size the validation passes by it; later calls change
        nothing and return the same featurizer."""
        if self._featurizer is None:
            device = next(p for p in model.parameters() if p.requires_grad).device
            c = self.config
            projector = build_projector(
                c.projection_type, num_trainable_parameters(model), c.projection_dim, c.projection_seed, device=device
            )
            logger.warning("projection in use: %s, %s", projector.implementation, projector.describe())
            self._featurizer = Featurizer(projector, gradient_layers=c.gradient_layers)
            self.plan = self.memory_plan(model, self._featurizer)
            self.validation_stores.size_passes(self.plan)
        return self._featurizer

    def memory_plan(self, model, featurizer: Featurizer) -> MemoryPlan:
        """Rows a pass for the pool's and the validation's gradient passes under the run's memory budget.

        The budget is planned by rose_trl.resources.budget; nothing is changed here.
        """
        c = self.config
        dpo = self.validation_stores.kind == "dpo"
        return plan_run(
            model,
            c,
            featurizer.fused,
            self.pool_width,
            self.validation_stores.longest() if dpo else None,
            rows_per_pass(model, featurizer, c.gradient_batch_size, c.gradient_memory_gb),
            counts={"gradient": len(self.pool_tokens), "validation": len(self.validation)},
            notes=[selection_work(c, len(self.pool_tokens), self.total_checkpoints, model).describe()],
        )

    def check_disk_space(self, checkpoints: int | list[str], extra: int = 0, extra_what: str = "") -> int:
        """Before any gradient work: refuse (DiskSpaceError: the path, the bytes needed, the bytes free) when the
        stores of `checkpoints` (names, or a number still to be saved), those on disk excepted, and `extra` bytes
        of `extra_what` do not fit on output_dir's disk (disk.py, store.store_bytes)."""
        names = [None] * checkpoints if isinstance(checkpoints, int) else checkpoints
        needed, what = stores_to_write(self, names, extra, extra_what)
        require_free_space(self.output_dir, needed, what)
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
        featurizer = self.prepare_featurizer(model)
        identity = checkpoint_identity(name, model)
        common = dict(
            model=model_id(model),
            checkpoint=identity,
            projection=featurizer.projector.describe(),
            dtype=self.config.store_dtype,
            extra={"gradient_layers": self.config.gradient_layers},
        )
        # With a first pass: it runs at the first checkpoint used, then the full features of its candidates only.
        rows = self.prefilter.run(model, name, common, adam_state) if self.prefilter is not None else None
        folder = self.rose_dir / "train" / name
        train = self.extract_pool(model, folder, featurizer, common, adam_state, f"Pool gradients @ {name}", rows)
        self.validation_stores.store(model, name, featurizer, common, write=state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            missing = train.missing_rows() if rows is None else np.intersect1d(train.missing_rows(), rows)
            if len(missing):
                raise RuntimeError(f"{name}: {len(missing)} pool rows are still missing after extraction")
            self.ledger.record_checkpoint(name, learning_rate, identity)
        state.wait_for_everyone()

    def extract_pool(
        self, model, folder: Path, featurizer: Featurizer, common: dict, adam_state, desc: str, rows=None
    ):
        """The pool's gradient store in `folder` (`rows` only, default every row), in the run's planned passes: the
        one call of `extract_pool_store` for the full features and the first pass alike."""
        return extract_pool_store(
            model,
            self.pool_rows,
            folder,
            featurizer,
            self.config,
            self.pool_fingerprint,
            self.tokenizer.pad_token_id,
            common,
            adam_state=adam_state if self.config.gradient_type == "adam" else None,
            progress=self.progress,
            desc=desc,
            batch_size=self.plan.passes["gradient"].rows,
            max_batch_tokens=self.plan.passes["gradient"].tokens,
            rows=rows,
        )

    def skip_checkpoint(self, model, name: str, learning_rate: float | None) -> None:
        """Record a checkpoint that selection_checkpoints leaves out: its learning rate and weights, no stores (so
        that positions count every checkpoint of the warm-up, and a later selection may still compute them)."""
        self.ledger.record_left_out(name, learning_rate, checkpoint_identity(name, model))

    @stage("scoring")
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
        if self.prefilter is None:
            table, first_pass = score_checkpoints(checkpoints, targets.subtasks), None
        else:  # full scores for the first pass's candidates only; every row keeps its first-pass score
            table, first_pass = self.prefilter.score(checkpoints, targets.subtasks)
        # The run's record last: its gguf_file is the resolved file (with gguf_sha256), ROSEConfig's only the option.
        config = {
            **self.config.to_dict(),
            **self.run_config,
            "checkpoints": [{"name": c.name, "learning_rate": c.learning_rate} for c in checkpoints],
            "pool_fingerprint": self.pool_fingerprint,
            "validation_fingerprint": self.validation_fingerprint,
            "projection": checkpoints[0].train.meta["projection"],
        }

        agreement, across, warnings = agreement_report(
            targets.vectors, [c.learning_rate for c in checkpoints], list(self.validation["subtask"]), targets.usable
        )
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
                "validation_agreement_across": across,
                "agreement_warnings": warnings,
                "validation_subsample": subsample_report(self.validation),  # validation_k's sample, or None
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
