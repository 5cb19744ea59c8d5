"""Offline metrics that need no judge, on held-out preference pairs and reference answers.

- Preference accuracy: how often the implicit DPO reward r(x, y) = log pi(y|x) - log ref(y|x) of the
  chosen response beats the rejected one's (ties count half). The policy is a PEFT model; the
  reference is the same model with its adapters disabled, as in the selection's DPO loss.
- DPO validation loss: mean of -log sigmoid(beta * (r(x, y_chosen) - r(x, y_rejected))), beta 0.1.
- Reference NLL: mean per-token negative log-likelihood of the reference (best) answers.

Rows are tokenized like the pool (`sft_data.tokenize_sft_example`): prompt + response + EOS, the
response alone scored; conversational rows (lists of messages) go through the chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rose_trl.data.sft import IGNORE_INDEX, collate, tokenize_sft_example
from rose_trl.gradients.sft_loss import model_inputs
from rose_trl.utils.modeling import eval_mode


@dataclass
class PreferenceMetricsOptions:
    beta: float = 0.1
    batch_size: int = 8  # rows a pass, at most: the memory budget may lower it
    max_length: int | None = 1024
    # |margin| below this is a tie (policy == reference gives exactly 0, up to float noise).
    tie_tolerance: float = 1e-6
    # The memory (GB) the process may use; None: the machine's default share (rose_trl.resources.budget).
    memory_budget_gb: float | None = None


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    batch_size: int = 8,
    max_length: int | None = 1024,
    memory_budget_gb: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of response-token log-probs, number of response tokens) per (prompt, response).

    Logits are computed only at the positions where some row of a pass has a response token (the model
    inputs of the gradient passes, `sft_loss.model_inputs`): a [rows, T, vocab] tensor is the largest of
    a forward (SmolLM2's 49k words: 0.2 MB a token in float32). Rows a pass: at most `batch_size`, and as many
    as the memory budget (`memory_budget_gb`, default the machine's share: rose_trl.resources.budget) lets fit."""
    from rose_trl.resources.budget import MemoryBudget, evaluation_rows

    rows = [
        tokenize_sft_example({"prompt": p, "completion": r}, tokenizer, max_length, "evaluation", i)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    if rows:
        budget = MemoryBudget.for_device(memory_budget_gb, device, processes=1)
        batch_size = evaluation_rows(model, budget, max(len(r["input_ids"]) for r in rows), batch_size).rows
    logps, counts = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    order = np.argsort([-len(r["input_ids"]) for r in rows], kind="stable")
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad).items()}
            batch_logps, batch_counts = response_logps(model, batch)
            logps[idx], counts[idx] = batch_logps.cpu().numpy(), batch_counts.cpu().numpy()
    return logps, counts


@torch.no_grad()
def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation pass: each row's summed response-token log-prob and its number of response tokens."""
    inputs, positions = model_inputs(model, batch)
    labels = batch["labels"][:, 1:]
    logits = model(**inputs).logits.float()
    if positions is None:
        logits = logits[:, :-1]
    else:
        labels = labels[:, positions]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def _reference_context(model, ref_model):
    if ref_model is not None:
        return contextlib.nullcontext(ref_model)
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "the policy must be a PEFT model (reference = adapters disabled) or `ref_model` must be given"
        )
    return _disabled(model)


@contextlib.contextmanager
def _disabled(model):
    with model.disable_adapter():
        yield model


def bootstrap_interval(
    values: np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (pairs resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def _wins(margin: np.ndarray, tolerance: float) -> np.ndarray:
    return np.where(np.abs(margin) <= tolerance, 0.5, (margin > 0).astype(np.float64))


def _summary(
    chosen_r: np.ndarray, rejected_r: np.ndarray, opts: PreferenceMetricsOptions, likelihood_margin: np.ndarray
) -> dict:
    margin = chosen_r - rejected_r
    wins = _wins(margin, opts.tie_tolerance)
    likelihood_wins = _wins(likelihood_margin, opts.tie_tolerance)
    # -log sigmoid(z) = softplus(-z), stable for large |z|.
    loss = np.logaddexp(0.0, -opts.beta * margin)
    return {
        "n": int(len(margin)),
        "accuracy": float(wins.mean()),
        "accuracy_ci": bootstrap_interval(wins),
        "dpo_loss": float(loss.mean()),
        "reward_margin": float(opts.beta * margin.mean()),
        "reward_margin_ci": bootstrap_interval(opts.beta * margin),
        "chosen_reward": float(opts.beta * chosen_r.mean()),
        "rejected_reward": float(opts.beta * rejected_r.mean()),
        "likelihood_accuracy": float(likelihood_wins.mean()),
        "likelihood_accuracy_ci": bootstrap_interval(likelihood_wins),
    }


def pair_logps(
    model, tokenizer, dataset, options: PreferenceMetricsOptions | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Response log-probs and token counts of every chosen row, then every rejected row ([2n] each)."""
    opts = options or PreferenceMetricsOptions()
    prompts = list(dataset["prompt"])
    return sequence_logps(
        model,
        tokenizer,
        prompts + prompts,
        list(dataset["chosen"]) + list(dataset["rejected"]),
        opts.batch_size,
        opts.max_length,
        opts.memory_budget_gb,
    )


def summarize_pairs(
    policy: np.ndarray,
    counts: np.ndarray,
    reference: np.ndarray,
    dataset,
    options: PreferenceMetricsOptions | None = None,
) -> dict:
    """preference_metrics' numbers from `pair_logps` of the policy and of the reference."""
    opts = options or PreferenceMetricsOptions()
    n = len(dataset)
    rewards = policy - reference
    chosen_r, rejected_r = rewards[:n], rewards[n:]
    per_token = policy / np.maximum(counts, 1)
    likelihood_margin = per_token[:n] - per_token[n:]
    out = _summary(chosen_r, rejected_r, opts, likelihood_margin)
    if "subtask" in dataset.column_names:
        subtasks = np.asarray([str(s) for s in dataset["subtask"]])
        out["per_subtask"] = {
            s: _summary(chosen_r[subtasks == s], rejected_r[subtasks == s], opts, likelihood_margin[subtasks == s])
            for s in dict.fromkeys(subtasks.tolist())
        }
    return out


def preference_metrics(
    model, tokenizer, dataset, options: PreferenceMetricsOptions | None = None, ref_model=None
) -> dict:
    """Accuracy, mean DPO loss and mean rewards (scaled by beta, as TRL logs them) on prompt/chosen/
    rejected rows, with 95% bootstrap intervals of the accuracy and of the mean margin (`*_ci`);
    `per_subtask` holds the same numbers per `subtask` when the column exists.

    The implicit reward is relative to the reference: a model evaluated against itself scores 0.5 by
    construction. `likelihood_accuracy` needs no reference: how often the policy's mean per-token
    log-prob of the chosen response beats the rejected one's (what a base model can be compared on)."""
    policy, counts = pair_logps(model, tokenizer, dataset, options)
    with _reference_context(model, ref_model) as ref:
        reference, _ = pair_logps(ref, tokenizer, dataset, options)
    return summarize_pairs(policy, counts, reference, dataset, options)


def reference_nll(
    model, tokenizer, prompts: Sequence, references: Sequence, batch_size: int = 8, max_length: int | None = 1024
) -> float:
    """Token-weighted mean NLL (nats per token) of the reference answers under the model."""
    logps, counts = sequence_logps(model, tokenizer, prompts, references, batch_size, max_length)
    return float(-logps.sum() / counts.sum())
