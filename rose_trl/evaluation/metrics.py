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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from rose_trl.data.sft import IGNORE_INDEX, collate, tokenize_sft_example
from rose_trl.gradients.sft_loss import model_inputs
from rose_trl.utils.modeling import eval_mode


if TYPE_CHECKING:  # names for the signatures only: importing this module stays light
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PreferenceMetricsOptions:
    """Options of `preference_metrics`.

    Args:
        beta (`float`, defaults to `0.1`):
            The DPO beta scaling the implicit rewards and the DPO loss (the selection's).
        batch_size (`int`, defaults to `8`):
            Rows a forward pass, at most: the memory budget may lower it.
        max_length (`int`, *optional*, defaults to `1024`):
            Rows are truncated to this many tokens (`None`: not truncated).
        tie_tolerance (`float`, defaults to `1e-6`):
            A margin smaller than this in absolute value is a tie (counted half).
        memory_budget_gb (`float`, *optional*):
            The memory (GB) the process may use; `None`: the machine's default share.
    """

    beta: float = 0.1
    batch_size: int = 8  # rows a pass, at most: the memory budget may lower it
    max_length: int | None = 1024
    # |margin| below this is a tie (policy == reference gives exactly 0, up to float noise).
    tie_tolerance: float = 1e-6
    # The memory (GB) the process may use; None: the machine's default share (rose_trl.resources.budget).
    memory_budget_gb: float | None = None


@torch.no_grad()
def sequence_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    responses: Sequence,
    batch_size: int = 8,
    max_length: int | None = 1024,
    memory_budget_gb: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The summed log-probability of each response given its prompt, and its number of tokens.

    Logits are computed only at the positions where some row of a pass has a response token (the model
    inputs of the gradient passes, `sft_loss.model_inputs`): a [rows, T, vocab] tensor is the largest of
    a forward (SmolLM2's 49k words: 0.2 MB a token in float32).

    Args:
        model (`transformers.PreTrainedModel`):
            The causal LM that scores the responses.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer. Rows are tokenized as the pool is: prompt + response + EOS, the response scored;
            conversational rows through the chat template.
        prompts (`Sequence`):
            The prompts (strings, or lists of messages).
        responses (`Sequence`):
            One response per prompt (strings, or lists of messages).
        batch_size (`int`, *optional*, defaults to `8`):
            Rows a pass, at most; the memory budget may lower it.
        max_length (`int`, *optional*, defaults to `1024`):
            Rows are truncated to this many tokens (`None`: not truncated).
        memory_budget_gb (`float`, *optional*):
            The memory (GB) the process may use; `None`: the machine's default share (rose_trl.resources.budget).

    Returns:
        `tuple[np.ndarray, np.ndarray]`: the summed response-token log-probs (float64) and the response-token
        counts (int64), one per (prompt, response).
    """
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    options: PreferenceMetricsOptions | None = None,
    ref_model: PreTrainedModel | None = None,
) -> dict:
    """Held-out preference accuracy, DPO loss and rewards of a tuned model, judge-free.

    The implicit reward `r(x, y) = log pi(y|x) - log ref(y|x)` of the chosen response is compared with the
    rejected one's (ties count half). It is relative to the reference: a model evaluated against itself scores
    0.5 by construction. `likelihood_accuracy` needs no reference: how often the policy's mean per-token log-prob
    of the chosen response beats the rejected one's (what a base model can be compared on).

    Args:
        model (`transformers.PreTrainedModel`):
            The policy; a PEFT model unless `ref_model` is given (the reference is then the same model with its
            adapters disabled, as in the selection's DPO loss).
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer.
        dataset (`datasets.Dataset`):
            `prompt`/`chosen`/`rejected` rows, with an optional `subtask` column.
        options (`PreferenceMetricsOptions`, *optional*):
            beta, batch size, max length, tie tolerance and memory budget.
        ref_model (`transformers.PreTrainedModel`, *optional*):
            The reference model, when it is not the policy's base.

    Returns:
        `dict`: `n`, `accuracy`, `dpo_loss`, `reward_margin`, `chosen_reward`, `rejected_reward` (rewards scaled by
        beta, as TRL logs them), `likelihood_accuracy`, the 95% bootstrap intervals `accuracy_ci`,
        `reward_margin_ci` and `likelihood_accuracy_ci`, and `per_subtask` (the same per subtask) when the
        dataset has a `subtask` column.

    Example:

    ```python
    from rose_trl.evaluation import PreferenceMetricsOptions, preference_metrics

    metrics = preference_metrics(peft_model, tokenizer, heldout_pairs, PreferenceMetricsOptions(beta=0.1))
    print(metrics["accuracy"], metrics["accuracy_ci"])
    ```
    """
    policy, counts = pair_logps(model, tokenizer, dataset, options)
    with _reference_context(model, ref_model) as ref:
        reference, _ = pair_logps(ref, tokenizer, dataset, options)
    return summarize_pairs(policy, counts, reference, dataset, options)


def reference_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence,
    references: Sequence,
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> float:
    """The token-weighted mean negative log-likelihood of reference answers under the model.

    Args:
        model (`transformers.PreTrainedModel`):
            The causal LM to evaluate.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer.
        prompts (`Sequence`):
            The test prompts.
        references (`Sequence`):
            One reference (best) answer per prompt.
        batch_size (`int`, *optional*, defaults to `8`):
            Rows a pass, at most.
        max_length (`int`, *optional*, defaults to `1024`):
            Rows are truncated to this many tokens (`None`: not truncated).

    Returns:
        `float`: nats per response token, over all the references' tokens together.

    Example:

    ```python
    from rose_trl.evaluation import reference_nll

    nll = reference_nll(model, tokenizer, test["prompt"], test["chosen"])
    ```
    """
    logps, counts = sequence_logps(model, tokenizer, prompts, references, batch_size, max_length)
    return float(-logps.sum() / counts.sum())
