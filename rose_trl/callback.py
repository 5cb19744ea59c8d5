"""ROSECallback: drop into an existing SFTTrainer/Trainer script to select data during its warm-up.

    trainer = SFTTrainer(model, args=SFTConfig(..., save_strategy="epoch"), train_dataset=warmup,
                         peft_config=LoraConfig(...),
                         callbacks=[ROSECallback(pool, validation, tokenizer, ROSEConfig(...))])
    trainer.train()   # -> <output_dir>/selection/

At every checkpoint save it extracts the pool's Adam-preconditioned gradients with the live model and
optimizer, and the validation gradients; its learning rate is the mean LR of the optimizer steps since
the previous save (one epoch with save_strategy="epoch", as the paper). At the end of training it
scores and writes the selection.
"""

from __future__ import annotations

import numpy as np
from transformers import TrainerCallback

from .config import ROSEConfig
from .gradients import AdamState, trainable_parameters
from .selector import ROSESelector


class ROSECallback(TrainerCallback):
    def __init__(self, pool, validation, tokenizer, config: ROSEConfig | None = None, output_dir: str | None = None,
                 max_length: int | None = 1024, run_config: dict | None = None):
        self.pool, self.validation, self.tokenizer = pool, validation, tokenizer
        self.config = config or ROSEConfig()
        self.output_dir, self.max_length, self.run_config = output_dir, max_length, run_config
        self.selector: ROSESelector | None = None
        self._step_lrs: list[float] = []
        self.selection_dir = None

    def _ensure_selector(self, args) -> ROSESelector:
        if self.selector is None:
            self.selector = ROSESelector(self.pool, self.validation, self.tokenizer, self.config,
                                         self.output_dir or args.output_dir, max_length=self.max_length,
                                         use_cpu=args.use_cpu, run_config=self.run_config,
                                         progress=not args.disable_tqdm, ddp_backend=args.ddp_backend)
        return self.selector

    def on_train_begin(self, args, state, control, **kwargs):
        self._ensure_selector(args)  # tokenize the pool and check both datasets before spending compute

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._step_lrs.append(float(optimizer.param_groups[0]["lr"]))  # the LR this step will apply

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        selector = self._ensure_selector(args)
        lr = float(np.mean(self._step_lrs)) if self._step_lrs else float(optimizer.param_groups[0]["lr"])
        self._step_lrs = []
        adam = None
        if self.config.gradient_type == "adam":
            adam = AdamState.from_optimizer(optimizer, trainable_parameters(model))
        selector.add_checkpoint(model, f"checkpoint-{state.global_step}", lr, adam)

    def on_train_end(self, args, state, control, **kwargs):
        if self.selector is not None and self.selector._manifest()["checkpoints"]:
            self.selection_dir = self.selector.finalize(self.config.selection_folder)
