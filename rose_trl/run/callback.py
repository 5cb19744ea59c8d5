"""ROSECallback: drop into an existing SFTTrainer/Trainer script to select data during its warm-up.

    trainer = SFTTrainer(model, args=SFTConfig(..., save_strategy="epoch"), train_dataset=warmup,
                         peft_config=LoraConfig(...),
                         callbacks=[ROSECallback(pool, validation, config=ROSEConfig(...))])
    trainer.train()   # -> <output_dir>/selection/

The tokenizer defaults to the trainer's `processing_class` and `max_length` to the training arguments'
(SFTConfig.max_length), so that the callback is all an existing SFT script needs (recipes/trl_sft_with_rose.py
is TRL's own scripts/sft.py with it).

At every checkpoint save it extracts the pool's Adam-preconditioned gradients with the live model and
optimizer, and the validation gradients; its learning rate is the mean LR of the optimizer steps since
the previous save (one epoch with save_strategy="epoch", as the paper), kept by the run ledger
(ledger.py). At the end of training it scores and writes the selection.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, TrainerCallback

from rose_trl.config import ROSEConfig
from rose_trl.gradients.capture import AdamState, num_trainable_parameters, trainable_parameters
from rose_trl.resources.budget import MemoryBudget, check_training
from rose_trl.run.selector import ROSESelector
from rose_trl.utils.files import checkpoint_name


@contextlib.contextmanager
def preserved_rng():
    """Run ROSE work inside training without touching the training's random streams: building the
    validation DPOTrainer reseeds them (Trainer.__init__ calls set_seed), which would make a warm-up
    with the callback differ from one resumed from a checkpoint (whose RNG state was saved before)."""
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        yield
    random.setstate(states[0])
    np.random.set_state(states[1])


def expected_saves(args, state) -> int:
    """Checkpoints the Trainer will still save from `state.global_step` on, by its own rules
    (DefaultFlowCallback): one per epoch, or one every save_steps and one at the last step."""
    strategy = str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "epoch":
        per_epoch = state.max_steps / max(state.num_train_epochs, 1)
        return max(0, math.ceil(state.num_train_epochs) - int(state.global_step // max(per_epoch, 1)))
    if strategy == "steps" and state.max_steps > 0:
        every = args.save_steps if args.save_steps >= 1 else math.ceil(state.max_steps * args.save_steps)
        return max(0, math.ceil(state.max_steps / every) - state.global_step // every)
    return 1  # "best": as many as improvements, at least one


def longest_row(dataloader, args) -> int | None:
    """Tokens of the longest training row (at most args.max_length), when the Trainer's dataset is tokenized."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or "input_ids" not in (getattr(dataset, "column_names", None) or []):
        return None
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    limit = getattr(args, "max_length", None)
    return min(longest, limit) if limit else longest


# `max_length` default: the training arguments' own (SFTConfig.max_length), or this without one.
_FROM_ARGS = "from training arguments"
DEFAULT_MAX_LENGTH = 1024


class ROSECallback(TrainerCallback):
    """Select training data with ROSE while an existing `Trainer`/`SFTTrainer` runs the warm-up.

    The trainer's training set is the warm-up set (LoRA, AdamW, one checkpoint per epoch as the paper:
    `save_strategy="epoch"`). At every checkpoint save the callback extracts the pool's Adam-preconditioned
    gradients with the live model and optimizer and the preference pairs' DPO-loss gradients, and records the
    checkpoint's learning rate (the mean over the steps since the previous save). When training ends it scores
    the pool and writes the selection folder. The work is resumable: a run resumed from a checkpoint finishes
    that checkpoint's stores and reuses the others.

    Args:
        pool (`datasets.Dataset`):
            The training pool to select from: `messages` (chat) or `prompt`/`completion` rows
            (`rose_trl.load_pool`).
        validation (`datasets.Dataset`):
            The few-shot preference set: `prompt`/`chosen`/`rejected` rows (standard or conversational), with an
            optional `subtask` column (`rose_trl.load_preferences`).
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*):
            Tokenizes the pool and the pairs. Defaults to the trainer's `processing_class` (its tokenizer, for a
            multimodal processor).
        config (`ROSEConfig`, *optional*):
            The selection options; defaults to `ROSEConfig()` (ROSE, 5% selected, 8192-dimension projection).
        output_dir (`str`, *optional*):
            Where `rose/` (the gradient stores and the run's ledger) and the selection folder go. Defaults to the
            training arguments' `output_dir`.
        max_length (`int` or `None`, *optional*):
            Pool rows and pairs are truncated to this many tokens (`None`: not truncated). Defaults to the
            training arguments' `max_length` (`SFTConfig.max_length`), or 1024 when they have none.
        run_config (`dict`, *optional*):
            Extra settings the stores depend on (recorded in `rose/run.json` and the selection's `config.json`);
            a later run with other values is refused instead of mixing stores.

    Attributes:
        selection_dir (`pathlib.Path` or `None`):
            The selection folder, once training has ended (`<output_dir>/selection/` for ROSE).

    Example:

    ```python
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from rose_trl import ROSECallback, ROSEConfig, load_pool, load_preferences

    pool = load_pool("pool.jsonl")
    preferences = load_preferences("preferences.jsonl")
    warmup_subset = pool.shuffle(seed=0).select(range(len(pool) // 20))  # the warm-up trains on 5%
    trainer = SFTTrainer(
        "meta-llama/Llama-2-7b-hf",
        args=SFTConfig(output_dir="outputs/run", save_strategy="epoch", num_train_epochs=4),
        train_dataset=warmup_subset,
        peft_config=LoraConfig(r=128, lora_alpha=512, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        callbacks=[ROSECallback(pool, preferences, config=ROSEConfig(selection_fraction=0.05))],
    )
    trainer.train()  # -> outputs/run/selection/
    ```
    """

    def __init__(
        self,
        pool: Dataset,
        validation: Dataset,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config: ROSEConfig | None = None,
        output_dir: str | None = None,
        max_length: int | str | None = _FROM_ARGS,
        run_config: dict | None = None,
    ):
        self.pool = pool
        self.validation = validation
        self.tokenizer = tokenizer
        self.config = config or ROSEConfig()
        self.output_dir = output_dir
        self.max_length = max_length
        self.run_config = run_config
        self.selector: ROSESelector | None = None
        self.selection_dir: Path | None = None

    def ensure_selector(self, args, processing_class=None) -> ROSESelector:
        if self.selector is None:
            # A multimodal processor holds its tokenizer; the pool and the preference pairs are text.
            tokenizer = self.tokenizer or getattr(processing_class, "tokenizer", processing_class)
            if tokenizer is None:
                raise ValueError(
                    "ROSECallback needs a tokenizer: pass one, or train with a trainer that has a processing_class"
                )
            max_length = self.max_length
            if max_length == _FROM_ARGS:
                max_length = getattr(args, "max_length", DEFAULT_MAX_LENGTH)
            self.selector = ROSESelector(
                self.pool,
                self.validation,
                tokenizer,
                self.config,
                self.output_dir or args.output_dir,
                max_length=max_length,
                use_cpu=args.use_cpu,
                run_config=self.run_config,
                progress=not args.disable_tqdm,
                ddp_backend=args.ddp_backend,
            )
        return self.selector

    def on_train_begin(self, args, state, control, model=None, optimizer=None, processing_class=None, **kwargs):
        if args.save_strategy == "no":
            raise ValueError(
                "ROSECallback extracts gradients at each checkpoint save, and save_strategy is 'no': "
                "set save_strategy='epoch' (one checkpoint per epoch, as the paper)"
            )
        # Tokenize the pool and check both datasets, and the disk, before spending compute.
        selector = self.ensure_selector(args, processing_class)
        saves = expected_saves(args, state)
        adapter = num_trainable_parameters(model) if model is not None else 0
        # Each save also writes the adapter (its dtype, float32 at most) and its two Adam moments (float32).
        selector.check_disk_space(
            saves, extra=saves * adapter * 12, extra_what=f"{saves} warm-up checkpoint(s) (adapter and Adam state)"
        )
        if model is not None:  # the Trainer's batch is the user's: a warning if it would exceed the budget
            budget = MemoryBudget.for_device(self.config.memory_budget_gb, next(model.parameters()).device)
            check_training(model, args, budget, "warm-up", width=longest_row(kwargs.get("train_dataloader"), args))
        name = checkpoint_name(state.global_step)
        if state.global_step > 0 and model is not None and not selector.ledger.is_recorded(name):
            # Resumed from a checkpoint whose extraction was killed: on_save will not come again for it,
            # and the live model and optimizer hold exactly its weights and Adam state, so finish it now.
            self._add_checkpoint(
                selector, model, optimizer, name, selector.ledger.logged_mean_lr(name, state.global_step)
            )

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # the LR this step will apply
            self.ensure_selector(args).ledger.step_began(
                state.global_step + 1, float(optimizer.param_groups[0]["lr"]), write=state.is_world_process_zero
            )

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        selector = self.ensure_selector(args)
        lr = selector.ledger.pop_live_learning_rate()
        if lr is None:  # no step since the previous save: the LR the optimizer holds
            lr = float(optimizer.param_groups[0]["lr"])
        self._add_checkpoint(selector, model, optimizer, checkpoint_name(state.global_step), lr)

    def _add_checkpoint(self, selector, model, optimizer, name: str, lr: float) -> None:
        adam = None
        if self.config.gradient_type == "adam":
            adam = AdamState.from_optimizer(optimizer, trainable_parameters(model))
        with preserved_rng():
            selector.add_checkpoint(model, name, lr, adam)

    def on_train_end(self, args, state, control, **kwargs):
        if self.selector is not None and self.selector.ledger.checkpoints():
            self.selection_dir = self.selector.finalize(self.config.selection_folder)
