"""Validation gradients: per-pair gradients of TRL's own DPO loss (ROSE), or of the SFT loss (LESS).

`ROSEDPOTrainer` is a `trl.DPOTrainer` used for one thing: TRL tokenizes and collates the preference
pairs and computes its sigmoid DPO loss (`_compute_loss`); we run that loss for a batch of pairs with
the per-example capture hooks on, so each pair's gradient comes out of one forward/backward.

Reference model: the pretrained model, i.e. the policy with its LoRA adapters disabled. TRL copies an
existing adapter into a frozen "ref" adapter when it is handed a PEFT model, which would make the
reference the *warm-up checkpoint*; we remove that copy so TRL falls back to disabling adapters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from .distributed import gathered, release_gathered
from .extraction import eval_mode
from .gradients import PerExampleGradientCapture, activation_checkpointing_off, per_example_gradients, trainable_parameters
from .projection import Projector
from .data.preferences import DEFAULT_SUBTASK, validate_preferences
from .sft_data import collate, tokenize_sft_example


def validation_dpo_config(output_dir: str, beta: float = 0.1, batch_size: int = 4, max_length: int | None = 1024,
                          use_cpu: bool = False, bf16: bool = False, ddp_backend: str | None = None) -> DPOConfig:
    """A DPOConfig for gradient extraction only: sigmoid loss, no dropout changes, no checkpointing."""
    return DPOConfig(
        output_dir=output_dir,
        beta=beta,
        loss_type=["sigmoid"],
        # The policy may be a live warm-up model: TRL must not zero its dropout or turn on checkpointing.
        disable_dropout=False,
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        use_cpu=use_cpu,
        # Building a TrainingArguments re-creates accelerate's process state: it must name the same
        # backend as the run it lives in (gloo for DeepSpeed on a CPU machine, see docs/distributed.md).
        ddp_backend=ddp_backend,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        # keep_end never drops a pair (keep_start drops prompts longer than max_length), so every
        # gradient row still lines up with its subtask label: long prompts lose their start.
        truncation_mode="keep_end",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataset_num_proc=None,
    )


class ROSEDPOTrainer(DPOTrainer):
    """A DPOTrainer that returns per-pair gradients of its DPO loss instead of training.

    `train_dataset` is the preference validation set (prompt/chosen/rejected, standard or
    conversational). The model is the policy at a warm-up checkpoint (a PEFT model).
    """

    def __init__(self, model, args: DPOConfig, train_dataset, processing_class, **kwargs):
        validate_preferences(train_dataset if "subtask" in train_dataset.column_names
                             else train_dataset.add_column("subtask", [DEFAULT_SUBTASK] * len(train_dataset)), "validation")
        params_before = [n for n, _ in trainable_parameters(model)]
        # TRL copies the adapter's values into its "ref" adapter (deleted below): under ZeRO-3/FSDP2 they must be whole.
        with gathered(model):
            super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")  # reference = base model (adapters disabled), not a copy of the policy
            unwrapped.set_adapter("default")
        if [n for n, _ in trainable_parameters(unwrapped)] != params_before:
            raise RuntimeError("building the DPO trainer changed the model's trainable parameters")
        if len(self.train_dataset) != len(train_dataset):
            raise RuntimeError(f"TRL kept {len(self.train_dataset)} of {len(train_dataset)} preference pairs")

    def pair_gradients(self, projector: Projector | None = None, progress: bool = False) -> torch.Tensor:
        """[n_pairs, n_params] gradients (or [n_pairs, dim] when `projector` is given), in dataset order."""
        model = self.accelerator.unwrap_model(self.model)
        params = [p for _, p in trainable_parameters(model)]
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                            shuffle=False, collate_fn=self.data_collator)
        device = params[0].device
        out = []
        capture = PerExampleGradientCapture(model)
        with eval_mode(model), activation_checkpointing_off(model), capture, torch.enable_grad():
            for inputs in loader:
                inputs = {k: v.to(device) for k, v in inputs.items()}
                pairs = inputs["input_ids"].shape[0] // 2
                capture.reset(2 * pairs, device)
                loss = self.compute_loss(self.model, inputs)
                # TRL averages over pairs; the sum gives each pair its own full gradient.
                capture.backward(loss * pairs)
                release_gathered(model)
                grads = capture.grads[:pairs] + capture.grads[pairs:]  # rows are [chosen..., rejected...]
                out.append(projector.project(grads) if projector is not None else grads.clone())
        return torch.cat(out)

    def reference_logps(self) -> torch.Tensor:
        """[n_pairs, 2] summed completion log-probs (chosen, rejected) under TRL's reference."""
        loader = DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size,
                            shuffle=False, collate_fn=self.data_collator)
        device = next(self.model.parameters()).device
        rows = []
        with eval_mode(self.model):
            for inputs in loader:
                inputs = {k: v.to(device) for k, v in inputs.items()}
                chosen, rejected = self.compute_ref_log_probs(self.model, inputs)
                rows.append(torch.stack([chosen, rejected], dim=1).float())
        return torch.cat(rows)


def sft_validation_gradients(model, validation, tokenizer, projector: Projector | None = None,
                             max_length: int | None = 1024, batch_size: int = 8) -> torch.Tensor:
    """LESS's validation gradients: plain SFT-loss gradients on prompt + chosen, one row per pair."""
    rows = []
    for i, ex in enumerate(validation):
        rows.append(tokenize_sft_example({"prompt": ex["prompt"], "completion": ex["chosen"]} if isinstance(ex["prompt"], str)
                                         else {"messages": ex["prompt"] + ex["chosen"]},
                                         tokenizer, max_length, source="validation", index=i))
    device = next(p for p in model.parameters() if p.requires_grad).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad).items()}
            grads = per_example_gradients(model, batch)
            release_gathered(model)
            out.append(projector.project(grads) if projector is not None else grads)
    return torch.cat(out)


def aggregate_by_subtask(grads: np.ndarray, subtasks: list[str], mode: str = "normalized_mean") -> tuple[list[str], np.ndarray]:
    """One target direction per subtask, [n_subtasks, dim], subtasks in first-appearance order.

    - "normalized_mean" (default; what ROSE/LESS's released code computes): unit-normalize each pair's
      gradient, then average. Scoring against it gives the mean cosine over the subtask's pairs.
    - "eq6" (the paper's Eq. 6 read literally): average the raw gradients, then unit-normalize. Pairs
      with large gradients (e.g. where the policy already strongly prefers the rejected answer, or
      long responses) then weigh more, and the reference model's log-probs matter through the DPO
      weight sigma(r_l - r_w), which cancels in the default mode.
    """
    names = list(dict.fromkeys(subtasks))
    labels = np.asarray(subtasks)
    grads = np.asarray(grads, dtype=np.float64)
    out = []
    for name in names:
        g = grads[labels == name]
        if mode == "normalized_mean":
            out.append((g / np.linalg.norm(g, axis=1, keepdims=True).clip(min=1e-30)).mean(axis=0))
        elif mode == "eq6":
            mean = g.mean(axis=0)
            out.append(mean / max(np.linalg.norm(mean), 1e-30))
        else:
            raise ValueError(f"unknown validation aggregation {mode!r}; use 'normalized_mean' or 'eq6'")
    return names, np.stack(out).astype(np.float32)
