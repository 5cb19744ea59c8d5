"""Validation gradients: per-pair gradients of TRL's own DPO loss (ROSE), or of the SFT loss (LESS).

`ROSEDPOTrainer` is a `trl.DPOTrainer` used for one thing: TRL tokenizes and collates the preference
pairs and computes its DPO loss (`_compute_loss`, sigmoid by default, or any of TRL's loss types, see
`validation_dpo_config`); we run that loss for a batch of pairs with the per-example capture hooks on,
so each pair's gradient comes out of one forward/backward.

Reference model: the pretrained model, i.e. the policy with its LoRA adapters disabled. TRL copies an
existing adapter into a frozen "ref" adapter when it is handed a PEFT model, which would make the
reference the *warm-up checkpoint*; we remove that copy so TRL falls back to disabling adapters. The
reference's log-probs of the pairs do not change from one checkpoint to the next: they are computed once
per run (`ROSEDPOTrainer.reference_logps`, kept by `ValidationGradients`) and handed to TRL's loss as
precomputed ones, instead of a reference forward in every pass of every checkpoint.

`ValidationGradients` keeps a run's validation stores (rose/val_dpo[_<loss tag>]/ or rose/val_sft/, one per
checkpoint); the rows come from the run's `Featurizer`, like the pool's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from rose_trl.config import ROSEConfig
from rose_trl.data.preferences import DEFAULT_SUBTASK, validate_preferences
from rose_trl.data.sft import collate, tokenize_sft_example
from rose_trl.gradients.capture import trainable_parameters
from rose_trl.gradients.featurizer import Featurizer
from rose_trl.resources.budget import MemoryPlan, halving_on_oom
from rose_trl.stores.store import GradientStore
from rose_trl.utils.distributed import all_true, gathered, partitioned, release_gathered
from rose_trl.utils.modeling import eval_mode
from rose_trl.utils.timing import stage


# Losses that couple the pairs of a batch: aot/aot_unpaired sort the batch's log-ratios (a pair's loss term
# depends on where the others rank), sft takes one token-mean over all chosen answers of the batch (a pair's
# weight depends on the others' lengths). Their pairs run one per pass, so each gets its own gradient.
PAIR_COUPLED_LOSSES = frozenset({"aot", "aot_unpaired", "sft"})


def validation_loss_tag(
    loss_type: list[str], loss_weights: list[float] | None = None, label_smoothing: float = 0.0
) -> str:
    """ "" for the paper's target (sigmoid alone), else a folder-name tag such as "ipo" or "sigmoid+sft_w1,0.2":
    stores of different targets live side by side (rose/val_dpo/ and rose/val_dpo_<tag>/)."""
    if list(loss_type) == ["sigmoid"] and not loss_weights and not label_smoothing:
        return ""
    tag = "+".join(loss_type)
    if loss_weights:
        tag += "_w" + ",".join(f"{w:g}" for w in loss_weights)
    if label_smoothing:
        tag += f"_ls{label_smoothing:g}"
    return tag


@dataclass
class ValidationDPOConfig(DPOConfig):
    """A DPOConfig whose sequences this package truncates, keeping their end (`KeepLastTokens`)."""

    keep_last_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Cut each preference sequence (prompt + answer) to its last N tokens: long "
            "prompts lose their start, no pair is dropped. TRL's own max_length is None."
        },
    )


@contextlib.contextmanager
def fused_head_tokens(tokens: int | None):
    """Inside the block, TRL's fused LM head scores `tokens` positions a tile (`TOKEN_CHUNK_SIZE` of
    trl.kernels.chunked_logprob, 4096, read at each call): fewer hold less memory, the same log-probs up to float
    summation order. None leaves TRL's own."""
    if tokens is None:
        yield
        return
    from trl.kernels import chunked_logprob

    before, chunked_logprob.TOKEN_CHUNK_SIZE = chunked_logprob.TOKEN_CHUNK_SIZE, tokens
    try:
        yield
    finally:
        chunked_logprob.TOKEN_CHUNK_SIZE = before


@contextlib.contextmanager
def labelled_positions_only():
    """Inside the block, TRL's fused LM head scores only the positions that have a label (the answers' tokens) on
    every device. TRL does so where Triton runs (CUDA) and scores every position elsewhere (its reason: the tile
    shapes of compiled kernels, for devices such as Neuron); on a CPU, the prompt's and the padding's positions are
    computed and then masked to 0, in the forward and in the backward: about a fifth of a validation pass's time
    at SmolLM2 on the SE pairs (docs/results/extraction.md). The scored positions' log-probs are the same
    numbers (each position's row of the head's product and its log-softmax do not depend on the others: checked
    bit for bit, tests/test_validation.py), so are the gradients. Only the choice of positions changes
    (trl.trainer.utils reads `_use_triton` for it); the kernels stay TRL's torch ones."""
    import trl.trainer.utils as trl_utils

    before = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = before


class KeepLastTokens:
    """TRL's preference collator, then each sequence cut to its last `max_length` tokens: what TRL's
    truncation_mode="keep_end" did before its deprecation (it goes in TRL 2.0). TRL's keep_start would drop
    the pairs whose prompt fills max_length, and every gradient row must line up with its subtask label."""

    def __init__(self, collate_fn, max_length: int, pad_token_id: int):
        self.collate_fn = collate_fn
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate_fn(examples)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # right-padded rows
        if max(lengths) <= self.max_length:
            return batch
        width = min(max(lengths), self.max_length)
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("completion_mask", 0)):
            rows = batch[key]
            cut = rows.new_full((rows.shape[0], width), fill)
            for r, n in enumerate(lengths):
                kept = rows[r, max(0, n - self.max_length) : n]
                cut[r, : len(kept)] = kept
            batch[key] = cut
        return batch


def validation_dpo_config(
    output_dir: str,
    beta: float = 0.1,
    batch_size: int = 4,
    max_length: int | None = 1024,
    use_cpu: bool = False,
    bf16: bool = False,
    ddp_backend: str | None = None,
    loss_type: list[str] | str = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
) -> ValidationDPOConfig:
    """A DPOConfig for gradient extraction only: TRL's loss of `loss_type` (the paper's sigmoid by
    default), no dropout changes, no checkpointing, sequences cut to their last `max_length` tokens."""
    return ValidationDPOConfig(
        output_dir=output_dir,
        beta=beta,
        loss_type=[loss_type] if isinstance(loss_type, str) else list(loss_type),
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
        # The policy may be a live warm-up model: TRL must not zero its dropout or turn on checkpointing.
        disable_dropout=False,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=use_cpu,
        # Building a TrainingArguments re-creates accelerate's process state: it must name the same
        # backend as the run it lives in (gloo for DeepSpeed on a CPU machine, see docs/guides/multi_gpu.md).
        ddp_backend=ddp_backend,
        per_device_train_batch_size=batch_size,
        # Truncation is ours (KeepLastTokens): with a max_length, TRL would drop the pairs whose prompt fills it.
        max_length=None,
        keep_last_tokens=max_length,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataset_num_proc=None,
    )


def preference_batch(validation, tokenizer, config: DPOConfig, rows: list[int] | None = None) -> dict:
    """The pairs `rows` (default: all) of `validation` as the validation passes feed them to TRL's DPO loss: TRL's
    own tokenization (`DPOTrainer._prepare_dataset`: the prompt's chat template or text, the eos TRL adds) and its
    collator (`DataCollatorForPreference`), cut by `KeepLastTokens` when `config` says so; [chosen rows...,
    rejected rows...] with `completion_mask` on the tokens whose log-probabilities the loss reads. No model."""
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DataCollatorForPreference

    columns = [c for c in ("prompt", "chosen", "rejected") if c in validation.column_names]
    pairs = validation.select_columns(columns)
    if rows is not None:
        pairs = pairs.select(rows)
    stand_in = SimpleNamespace(_tokenizer=tokenizer)  # all _prepare_dataset reads of the trainer
    tokenized = DPOTrainer._prepare_dataset(stand_in, pairs, tokenizer, config, "validation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate_fn = DataCollatorForPreference(pad_token_id=pad)
    if getattr(config, "keep_last_tokens", None) is not None:
        collate_fn = KeepLastTokens(collate_fn, config.keep_last_tokens, pad)
    return collate_fn([tokenized[i] for i in range(len(tokenized))])


class ROSEDPOTrainer(DPOTrainer):
    """A `trl.DPOTrainer` that returns per-pair gradients of its DPO loss instead of training.

    TRL tokenizes and collates the preference pairs and computes its own DPO loss (`_compute_loss`: sigmoid with
    beta 0.1 by default, or any of TRL's loss types and their weighted mix); `pair_gradients` runs that loss over
    the pairs with the per-example capture hooks on, so each pair's gradient (of its chosen and its rejected row)
    comes out of one batched forward and backward. The reference model is the pretrained model (the policy with
    its adapters disabled): the copy of the adapter TRL would make into a "ref" adapter is removed. Its log-probs
    are computed once (`reference_logps`) and reused by every pass.

    Args:
        model (`peft.PeftModel`):
            The policy: the warm-up checkpoint's model with its LoRA adapter (trainable parameters unchanged).
        args (`trl.DPOConfig`):
            The loss and the passes: `beta`, `loss_type`, `loss_weights`, `label_smoothing`,
            `per_device_train_batch_size` (pairs a pass). `validation_dpo_config` makes one for gradient
            extraction (no dropout change, no gradient checkpointing, sequences cut to their last tokens).
        train_dataset (`datasets.Dataset`):
            The preference validation set: `prompt`/`chosen`/`rejected`, standard or conversational. Every pair
            is kept (an error otherwise).
        processing_class (`transformers.PreTrainedTokenizerBase`):
            The policy's tokenizer.
        **kwargs:
            Passed on to `trl.DPOTrainer`.

    Example:

    ```python
    from rose_trl import ROSEDPOTrainer
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from rose_trl.stores.validation import validation_dpo_config

    trainer = ROSEDPOTrainer(peft_model, validation_dpo_config("outputs/dpo"), preferences, tokenizer)
    featurizer = Featurizer(build_projector("sjlt", n_lora_params, 8192, seed=0))
    features = trainer.pair_gradients(featurizer)  # [len(preferences), 8192], in dataset order
    ```
    """

    def __init__(
        self,
        model: PeftModel,
        args: DPOConfig,
        train_dataset: Dataset,
        processing_class: PreTrainedTokenizerBase,
        **kwargs,
    ):
        validate_preferences(
            train_dataset
            if "subtask" in train_dataset.column_names
            else train_dataset.add_column("subtask", [DEFAULT_SUBTASK] * len(train_dataset)),
            "validation",
        )
        params_before = [n for n, _ in trainable_parameters(model)]
        # TRL copies the adapter's values into its "ref" adapter (deleted below): under ZeRO-3/FSDP2 they must be
        # whole.
        with gathered(model):
            super().__init__(
                model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")  # reference = base model (adapters disabled), not a copy of the policy
            unwrapped.set_adapter("default")
        if [n for n, _ in trainable_parameters(unwrapped)] != params_before:
            raise RuntimeError("building the DPO trainer changed the model's trainable parameters")
        if len(self.train_dataset) != len(train_dataset):
            raise RuntimeError(f"TRL kept {len(self.train_dataset)} of {len(train_dataset)} preference pairs")
        if getattr(args, "keep_last_tokens", None) is not None:  # a plain DPOConfig truncates as TRL does
            self.data_collator = KeepLastTokens(
                self.data_collator, args.keep_last_tokens, self.data_collator.pad_token_id
            )
        # The reference's (chosen, rejected) log-probs of every pair: computed on first use, or handed over by
        # the run (ValidationGradients) when an earlier trainer of the same run computed them.
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self.head_tokens: int | None = None  # positions a tile of TRL's fused LM head (None: TRL's 4096)

    @property
    def pairs_per_pass(self) -> int:
        """One pair per pass for losses that couple the pairs of a batch (PAIR_COUPLED_LOSSES)."""
        return 1 if PAIR_COUPLED_LOSSES & set(self.loss_types) else self.args.per_device_train_batch_size

    def _passes(self, pairs: int | None = None):
        """The validation passes, in dataset order: `pairs` (default `pairs_per_pass`) pairs each, on the
        adapter's device."""
        model = self.accelerator.unwrap_model(self.model)
        device = next(p for _, p in trainable_parameters(model)).device
        loader = DataLoader(
            self.train_dataset, batch_size=pairs or self.pairs_per_pass, shuffle=False, collate_fn=self.data_collator
        )
        for inputs in loader:
            yield {k: v.to(device) for k, v in inputs.items()}

    def _halving(self, function, what: str):
        """`function(pairs)` at `pairs_per_pass`, halved and run again when it runs out of memory, except where
        every process must run the same passes (ZeRO-3/FSDP on several processes)."""
        model = self.accelerator.unwrap_model(self.model)
        with fused_head_tokens(self.head_tokens), labelled_positions_only():
            if partitioned(model) and PartialState().num_processes > 1:
                return function(self.pairs_per_pass)
            return halving_on_oom(function, self.pairs_per_pass, what)

    @stage("reference log-probs")
    def reference_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's (the base model: adapters disabled) summed response log-probs of every pair's chosen
        and of its rejected answer, [n_pairs] each, by TRL's own `compute_ref_log_probs` over the same passes
        `pair_gradients` runs (so the same numbers TRL's loss would compute inside each pass). Computed once,
        then kept (`self.reference`)."""
        if self.reference is None:
            model = self.accelerator.unwrap_model(self.model)

            def passes(pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
                chosen, rejected = [], []
                with eval_mode(model):
                    for inputs in self._passes(pairs):
                        c, r = self.compute_ref_log_probs(self.model, inputs)
                        chosen.append(c.detach())
                        rejected.append(r.detach())
                        release_gathered(model)
                return torch.cat(chosen), torch.cat(rejected)

            self.reference = self._halving(passes, "a reference pass")
        return self.reference

    @stage("validation gradients")
    def pair_gradients(self, featurizer: Featurizer, reuse_reference: bool = True) -> torch.Tensor:
        """[n_pairs, dim] features of each pair's gradient (its chosen row's plus its rejected row's), in
        dataset order. The reference log-probs come from `reference_logps` (computed at most once per trainer,
        or handed over); `reuse_reference=False` lets TRL's loss run the reference forward in every pass."""
        reference = self.reference_logps() if reuse_reference else None
        return self._halving(lambda pairs: self._pair_gradients(featurizer, reference, pairs), "a validation pass")

    def _pair_gradients(self, featurizer: Featurizer, reference, pairs_a_pass: int) -> torch.Tensor:
        model = self.accelerator.unwrap_model(self.model)
        out = []
        start = 0
        precomputed = self.precompute_ref_logps
        self.precompute_ref_logps = reference is not None  # TRL's loss then reads ref_*_logps from the batch
        try:
            with eval_mode(model):
                for inputs in self._passes(pairs_a_pass):
                    pairs = inputs["input_ids"].shape[0] // 2
                    if reference is not None:
                        device = inputs["input_ids"].device
                        inputs["ref_chosen_logps"] = reference[0][start : start + pairs].to(device)
                        inputs["ref_rejected_logps"] = reference[1][start : start + pairs].to(device)
                    start += pairs
                    # TRL averages each loss over the pairs; the sum gives each pair its own full gradient.
                    out.append(
                        featurizer(
                            model,
                            inputs,
                            loss=lambda batch, n=pairs: self.compute_loss(self.model, batch) * n,
                            combine=lambda rows, n=pairs: rows[:n] + rows[n:],
                        )
                    )  # [chosen..., rejected...]
                    release_gathered(model)
        finally:
            self.precompute_ref_logps = precomputed
        return torch.cat(out)


@stage("validation gradients")
def sft_validation_gradients(
    model, validation, tokenizer, featurizer: Featurizer, max_length: int | None = 1024, batch_size: int = 8
) -> torch.Tensor:
    """LESS's validation features: plain SFT-loss gradients on prompt + chosen, one row per pair."""
    rows = []
    for i, ex in enumerate(validation):
        rows.append(
            tokenize_sft_example(
                {"prompt": ex["prompt"], "completion": ex["chosen"]}
                if isinstance(ex["prompt"], str)
                else {"messages": ex["prompt"] + ex["chosen"]},
                tokenizer,
                max_length,
                source="validation",
                index=i,
            )
        )
    device = next(p for p in model.parameters() if p.requires_grad).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad).items()}
            out.append(featurizer(model, batch))
            release_gathered(model)
    return torch.cat(out)


def validation_loss(config: ROSEConfig) -> dict:
    """What the DPO validation gradients depend on besides the model: recorded in their stores' meta."""
    return {
        "validation_beta": config.validation_beta,
        "validation_loss_type": list(config.validation_loss_type),
        "validation_loss_weights": config.validation_loss_weights or [1.0] * len(config.validation_loss_type),
        "validation_label_smoothing": config.validation_label_smoothing,
    }


class ValidationGradients:
    """A run's validation gradient stores, one per checkpoint: rose/val_dpo/ for the paper's sigmoid target,
    rose/val_dpo_<tag>/ for another loss (switching back and forth reuses both), rose/val_sft/ for LESS."""

    def __init__(
        self,
        validation,
        tokenizer,
        config: ROSEConfig,
        rose_dir: Path,
        fingerprint: str,
        max_length: int | None,
        use_cpu: bool = False,
        ddp_backend: str | None = None,
    ):
        self.validation = validation
        self.tokenizer = tokenizer
        self.config = config
        self.rose_dir = rose_dir
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.use_cpu = use_cpu
        self.ddp_backend = ddp_backend
        self.kind = "dpo" if config.selection_method == "rose" else "sft"
        tag = (
            validation_loss_tag(
                config.validation_loss_type, config.validation_loss_weights, config.validation_label_smoothing
            )
            if self.kind == "dpo"
            else ""
        )
        self.folder = rose_dir / (f"val_{self.kind}_{tag}" if tag else f"val_{self.kind}")
        self._dpo_trainers: dict[int, ROSEDPOTrainer] = {}
        # The reference's log-probs of the pairs (ROSEDPOTrainer.reference_logps): the same at every checkpoint.
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        # Rows a pass (the run's memory plan, set by the selector): DPO pairs, or LESS's SFT rows.
        self.pairs_per_pass: int = config.validation_batch_size
        self.sft_rows_per_pass: int = 8
        self.head_tokens: int | None = None

    def size_passes(self, plan: MemoryPlan) -> None:
        """Pairs (DPO) and rows (SFT) a validation pass, and TRL's fused head's tile, as the run's memory plan says."""
        if self.kind == "dpo":
            self.pairs_per_pass = plan.passes["validation"].rows
            self.head_tokens = plan.passes["validation"].head_tokens
        self.sft_rows_per_pass = min(8, plan.passes["gradient"].rows)

    def longest(self) -> int:
        """Tokens of the longest validation row (prompt with its chosen or its rejected answer, cut to max_length
        as the passes cut it), for the memory plan."""
        longest = 0
        for i, ex in enumerate(self.validation):
            for answer in ("chosen", "rejected") if self.kind == "dpo" else ("chosen",):
                row = (
                    {"prompt": ex["prompt"], "completion": ex[answer]}
                    if isinstance(ex["prompt"], str)
                    else {"messages": ex["prompt"] + ex[answer]}
                )
                ids = tokenize_sft_example(row, self.tokenizer, None, source="validation", index=i)["input_ids"]
                longest = max(longest, len(ids) + 1)  # TRL may add one special token more than the pool's rule
        return min(longest, self.max_length) if self.max_length else longest

    def store(self, model, name: str, featurizer: Featurizer, identity: dict, write: bool = True) -> GradientStore:
        """The checkpoint's store, computed when incomplete. The validation set is small: every process
        computes it (TRL's loss gathers metrics across processes, so all must run it), `write` (the main
        process) writes it. `identity`: what the pool store of the checkpoint records (model, checkpoint,
        projection, dtype, and `extra`: gradient_layers)."""
        state = PartialState()
        identity = dict(identity)
        extra = {**identity.pop("extra", {}), **(validation_loss(self.config) if self.kind == "dpo" else {})}
        with state.main_process_first():
            store = GradientStore.open_or_create(
                self.folder / name,
                gradient_type=f"validation_{self.kind}",
                pool_fingerprint=self.fingerprint,
                num_rows=len(self.validation),
                extra=extra,
                overwrite=self.config.overwrite_stores and state.is_main_process,
                **identity,
            )
        # Every process must agree before running collectives.
        if not (all_true(store.is_complete) if state.num_processes > 1 else store.is_complete):
            grads = self.compute(model, featurizer)
            if write:
                store.write(np.arange(len(self.validation)), grads.cpu().numpy())
        return store

    def compute(self, model, featurizer: Featurizer) -> torch.Tensor:
        """[n_pairs, dim] features of every pair's gradient at `model`, without a store: TRL's DPO loss through the
        run's `ROSEDPOTrainer` (its reference log-probs computed once, then kept), or LESS's SFT rows."""
        if self.kind == "dpo":
            trainer = self._dpo_trainer(model)
            trainer.head_tokens = self.head_tokens
            if trainer.reference is None:
                trainer.reference = self.reference  # computed once per run, not per checkpoint
            grads = trainer.pair_gradients(featurizer)
            self.reference = trainer.reference
            return grads
        return sft_validation_gradients(
            model, self.validation, self.tokenizer, featurizer, self.max_length, batch_size=self.sft_rows_per_pass
        )

    def read(self, name: str, projection: dict) -> np.ndarray:
        """The checkpoint's [n_pairs, dim] rows, checked against the pool store's `projection`."""
        store = GradientStore.open(self.folder / name)
        if store.meta["projection"] != projection:
            raise ValueError(f"{name}: validation and pool gradients were projected differently")
        return store.read_all()

    @stage("validation setup (DPOTrainer)")
    def _dpo_trainer(self, model) -> ROSEDPOTrainer:
        if id(model) not in self._dpo_trainers:
            c = self.config
            args = validation_dpo_config(
                str(self.rose_dir / "dpo"),
                beta=c.validation_beta,
                batch_size=self.pairs_per_pass,
                max_length=self.max_length,
                use_cpu=self.use_cpu,
                ddp_backend=self.ddp_backend,
                loss_type=c.validation_loss_type,
                loss_weights=c.validation_loss_weights,
                label_smoothing=c.validation_label_smoothing,
            )
            columns = [c for c in ("prompt", "chosen", "rejected") if c in self.validation.column_names]
            self._dpo_trainers[id(model)] = ROSEDPOTrainer(
                model, args, self.validation.select_columns(columns), self.tokenizer
            )
        return self._dpo_trainers[id(model)]
