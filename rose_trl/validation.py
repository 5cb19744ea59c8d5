"""Validation gradients: per-pair gradients of TRL's own DPO loss (ROSE), or of the SFT loss (LESS).

`ROSEDPOTrainer` is a `trl.DPOTrainer` used for one thing: TRL tokenizes and collates the preference
pairs and computes its DPO loss (`_compute_loss`, sigmoid by default, or any of TRL's loss types, see
`validation_dpo_config`); we run that loss for a batch of pairs with the per-example capture hooks on,
so each pair's gradient comes out of one forward/backward.

Reference model: the pretrained model, i.e. the policy with its LoRA adapters disabled. TRL copies an
existing adapter into a frozen "ref" adapter when it is handed a PEFT model, which would make the
reference the *warm-up checkpoint*; we remove that copy so TRL falls back to disabling adapters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from .distributed import gathered, release_gathered
from .extraction import eval_mode, fusion_unavailable
from .gradients import (PerExampleGradientCapture, ProjectedRows, activation_checkpointing_off, per_example_gradients,
                        per_example_projected_gradients, trainable_parameters)
from .projection import Projector
from .data.preferences import DEFAULT_SUBTASK, validate_preferences
from .sft_data import collate, tokenize_sft_example

logger = logging.getLogger(__name__)


# Losses that couple the pairs of a batch: aot/aot_unpaired sort the batch's log-ratios (a pair's loss term
# depends on where the others rank), sft takes one token-mean over all chosen answers of the batch (a pair's
# weight depends on the others' lengths). Their pairs run one per pass, so each gets its own gradient.
PAIR_COUPLED_LOSSES = frozenset({"aot", "aot_unpaired", "sft"})


def validation_loss_tag(loss_type: list[str], loss_weights: list[float] | None = None,
                        label_smoothing: float = 0.0) -> str:
    """"" for the paper's target (sigmoid alone), else a folder-name tag such as "ipo" or "sigmoid+sft_w1,0.2":
    stores of different targets live side by side (rose/val_dpo/ and rose/val_dpo_<tag>/)."""
    if list(loss_type) == ["sigmoid"] and not loss_weights and not label_smoothing:
        return ""
    tag = "+".join(loss_type)
    if loss_weights:
        tag += "_w" + ",".join(f"{w:g}" for w in loss_weights)
    if label_smoothing:
        tag += f"_ls{label_smoothing:g}"
    return tag


def validation_dpo_config(output_dir: str, beta: float = 0.1, batch_size: int = 4, max_length: int | None = 1024,
                          use_cpu: bool = False, bf16: bool = False, ddp_backend: str | None = None,
                          loss_type: list[str] | str = "sigmoid", loss_weights: list[float] | None = None,
                          label_smoothing: float = 0.0) -> DPOConfig:
    """A DPOConfig for gradient extraction only: TRL's loss of `loss_type` (the paper's sigmoid by
    default), no dropout changes, no checkpointing."""
    return DPOConfig(
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

    @property
    def pairs_per_pass(self) -> int:
        """One pair per pass for losses that couple the pairs of a batch (PAIR_COUPLED_LOSSES)."""
        return 1 if PAIR_COUPLED_LOSSES & set(self.loss_types) else self.args.per_device_train_batch_size

    def pair_gradients(self, projector: Projector | None = None, progress: bool = False) -> torch.Tensor:
        """[n_pairs, n_params] gradients (or [n_pairs, dim] when `projector` is given), in dataset order."""
        model = self.accelerator.unwrap_model(self.model)
        params = [p for _, p in trainable_parameters(model)]
        loader = DataLoader(self.train_dataset, batch_size=self.pairs_per_pass, shuffle=False,
                            collate_fn=self.data_collator)
        device = params[0].device
        # Projected rows come from the fused path (each layer projected inside the backward) when the
        # projector takes slices: no [rows, n_params] buffer, as for the pool. Projection is linear, so
        # projecting the chosen and rejected rows and adding them equals projecting their sum.
        fused = projector is not None and fusion_unavailable(projector) is None
        out = []
        capture = PerExampleGradientCapture(model)
        with eval_mode(model), activation_checkpointing_off(model), capture, torch.enable_grad():
            for inputs in loader:
                inputs = {k: v.to(device) for k, v in inputs.items()}
                pairs = inputs["input_ids"].shape[0] // 2
                sink = capture.reset(2 * pairs, device, ProjectedRows(2 * pairs, projector, None, device) if fused else None)
                loss = self.compute_loss(self.model, inputs)
                # TRL averages each loss over the pairs; the sum gives each pair its own full gradient.
                capture.backward(loss * pairs)
                release_gathered(model)
                rows = sink.out if fused else sink.grads
                grads = rows[:pairs] + rows[pairs:]  # rows are [chosen..., rejected...]
                out.append(projector.project(grads) if projector is not None and not fused else grads)
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
            if projector is not None and fusion_unavailable(projector) is None:
                out.append(per_example_projected_gradients(model, batch, projector))
            else:
                grads = per_example_gradients(model, batch)
                out.append(projector.project(grads) if projector is not None else grads)
            release_gathered(model)
    return torch.cat(out)


def zero_gradient_pairs(grads: np.ndarray) -> np.ndarray:
    """Indices of the pairs whose gradient is exactly zero (e.g. hinge with the margin already met)."""
    return np.flatnonzero(~np.asarray(grads).any(axis=1))


def pair_vectors(grads: np.ndarray, subtasks: list[str], mode: str = "normalized_mean",
                 usable: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """(subtask names in first-appearance order, [n_pairs, dim] vectors v_p) such that each subtask's
    target is the mean of v_p over its usable pairs (rows of left-out pairs are zero):

    - "normalized_mean" (default; what ROSE/LESS's released code computes): v_p = g_p / |g_p|, the target
      is the mean unit gradient, and scoring against it gives the mean cosine over the subtask's pairs.
    - "eq6" (the paper's Eq. 6 read literally: average the raw gradients, then normalize):
      v_p = g_p / |mean_{p' in j} g_p'|, so the target mean_p v_p is the unit mean gradient. Pairs with
      large gradients (e.g. where the policy already strongly prefers the rejected answer, or long
      responses) then weigh more, and the reference model's log-probs matter through the DPO weight
      sigma(r_l - r_w), which cancels in the default mode.

    `usable` (bool per pair, default all) leaves pairs out of their subtask's mean; a subtask left with
    no usable pair is an error naming it.
    """
    if mode not in ("normalized_mean", "eq6"):
        raise ValueError(f"unknown validation aggregation {mode!r}; use 'normalized_mean' or 'eq6'")
    names = list(dict.fromkeys(subtasks))
    labels = np.asarray(subtasks)
    grads = np.asarray(grads, dtype=np.float64)
    usable = np.ones(len(grads), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    vectors = np.zeros_like(grads)
    for name in names:
        rows = np.flatnonzero((labels == name) & usable)
        if len(rows) == 0:
            raise ValueError(f"subtask {name!r} has no usable validation pair: every one of its pairs "
                             f"{np.flatnonzero(labels == name).tolist()} has a zero gradient (the loss gives it no "
                             "direction, e.g. hinge with every margin met)")
        g = grads[rows]
        if mode == "normalized_mean":
            vectors[rows] = g / np.linalg.norm(g, axis=1, keepdims=True).clip(min=1e-30)
        else:
            vectors[rows] = g / max(np.linalg.norm(g.mean(axis=0)), 1e-30)
    return names, vectors


def subtask_means(vectors: np.ndarray, subtasks: list[str], names: list[str], usable: np.ndarray | None = None) -> np.ndarray:
    """[n_subtasks, dim] mean of the usable pairs' vectors per subtask."""
    labels = np.asarray(subtasks)
    usable = np.ones(len(labels), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    return np.stack([vectors[(labels == name) & usable].mean(axis=0) for name in names])


def aggregate_by_subtask(grads: np.ndarray, subtasks: list[str], mode: str = "normalized_mean",
                         usable: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """One target direction per subtask, [n_subtasks, dim] float32: the mean of `pair_vectors` over each
    subtask's usable pairs (see there for the two modes)."""
    names, vectors = pair_vectors(grads, subtasks, mode, usable)
    return names, subtask_means(vectors, subtasks, names, usable).astype(np.float32)


@dataclass
class ValidationTargets:
    """Every checkpoint's pair vectors and subtask targets, over one fixed set of usable pairs."""

    subtasks: list[str]
    vectors: list[np.ndarray]  # per checkpoint, [n_pairs, dim] (pair_vectors; zero rows for left-out pairs)
    targets: list[np.ndarray]  # per checkpoint, [n_subtasks, dim] float32
    usable: np.ndarray  # [n_pairs] bool
    zero_gradient_pairs: dict[str, list[int]]  # checkpoint -> pairs whose gradient is zero there


def validation_targets(grads: dict[str, np.ndarray], subtasks: list[str], mode: str = "normalized_mean") -> ValidationTargets:
    """Targets of every checkpoint (name -> [n_pairs, dim] validation gradients). A pair whose gradient is
    zero at any checkpoint is left out at all of them (with a warning), so that every subtask score is
    the mean of one fixed set of pairs' contributions (explain.py)."""
    zero = {name: zero_gradient_pairs(g).tolist() for name, g in grads.items()}
    zero = {name: rows for name, rows in zero.items() if rows}
    usable = np.ones(len(subtasks), dtype=bool)
    for rows in zero.values():
        usable[rows] = False
    if zero:
        logger.warning("validation pairs %s have a zero gradient (checkpoint: pairs %s) and are left out of their "
                       "subtask's mean", np.flatnonzero(~usable).tolist(), zero)
    vectors, targets = [], []
    for name, g in grads.items():
        try:
            names, v = pair_vectors(g, subtasks, mode, usable)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        vectors.append(v)
        targets.append(subtask_means(v, subtasks, names, usable).astype(np.float32))
    return ValidationTargets(names, vectors, targets, usable, zero)
