"""The SFT loss of a gradient pass: each row's own token-mean cross entropy over its response, from one
forward, with the model's inputs chosen so that a pass holds as little as it can (no padding mask for
right-padded rows, logits only at labelled positions, and above a budget the loss computed in chunks
from the final hidden states so that no [rows, T, vocab] logits tensor exists)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from rose_trl.data.sft import IGNORE_INDEX
from rose_trl.utils.distributed import partitioned


def model_inputs(model: nn.Module, batch: dict) -> tuple[dict, torch.Tensor | None]:
    """The model's keyword arguments for `batch`, and the positions its logits are computed for.

    Right-padded rows go in without their padding mask: under the causal mask a real token never
    attends to the padding after it, and padded positions carry no loss, so every row's gradient is the
    same (tested against unpadded rows). Without an explicit mask, attention runs its causal
    flash/memory-efficient kernels instead of building masked [rows, heads, T, T] scores, which for a
    7B model at 2048 tokens is the difference between fitting an 80 GB GPU and not.

    Logits are computed only where some row has a label (`logits_to_keep`, where the model takes it):
    the prompt positions every row shares and the padding carry no loss, and a [rows, T, vocab] logits
    tensor is the largest activation of a pass (Llama-3's 128k vocabulary: 0.5 MB a token in float32)."""
    mask = batch["attention_mask"]
    right_padded = bool((mask[:, :-1] >= mask[:, 1:]).all()) and bool(mask[:, 0].all())
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if not right_padded:
        inputs["attention_mask"] = mask
    positions = None
    labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0)
    if not bool(labelled.all()) and _takes_logits_to_keep(model):
        positions = torch.nonzero(labelled).flatten()
        inputs["logits_to_keep"] = positions
    return inputs, positions


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _shifted_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels (`labels` shifted left, -100 last) and each row's number of labelled tokens."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    counts = (shifted != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"batch rows {bad} have no response tokens (all labels are -100): their loss is undefined")
    return shifted, counts


def sft_per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's own token-mean next-token cross entropy over its labelled (response) tokens: [B].

    `positions`: the sequence positions `logits` were computed for (`logits_to_keep`), all when None.
    The labels are shifted, not the logits: a `logits[:, :-1]` view would make the backward allocate and
    zero-fill a second logits-sized gradient, and cross entropy over a flat [B*T, V] view runs its
    contiguous kernel (profiled in docs/results/extraction.md)."""
    shifted, counts = _shifted_labels(labels)
    if positions is not None:
        shifted = shifted[:, positions]
    rows, width, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits.reshape(-1, vocab).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(rows, width)
    return token_loss.sum(dim=1) / counts


# Logits elements ([tokens, vocab], float32) a pass's loss may hold at once before it is computed in chunks:
# 64 MiB. Above it (e.g. SmolLM2's 49k-word vocabulary at 4 rows of 256 tokens) the plain loss would keep
# about three logits-sized tensors alive through the backward; below it (every tiny model of the tests and
# the tiny recipe) the plain loss runs, so those numbers do not change.
LOSS_CHUNK_ELEMENTS = 2**24


class _TokenCrossEntropy(torch.autograd.Function):
    """Cross entropy of each token's logits `hidden @ weight.T` against its target: [tokens].

    Computed `chunk` tokens at a time, and each token's gradient with respect to its hidden state,
    `(softmax - onehot) @ weight`, is formed in the same chunk: a token's loss depends on its own hidden
    state only, so the backward just scales the saved [tokens, hidden] gradient, and no [tokens, vocab]
    tensor outlives its chunk. The same matmuls as the plain loss (none recomputed). The LM head's
    weight must be frozen: it gets no gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            target = targets[start:end, None]
            # The plain loss's own ops: the model's logits dtype, cast to float32, log-softmax.
            log_probs = F.log_softmax(F.linear(hidden[start:end], weight).float(), dim=-1)
            loss[start:end] = -log_probs.gather(1, target).squeeze(1)
            probs = log_probs.exp_()
            probs.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=probs.dtype))
            grad[start:end] = probs.to(weight.dtype) @ weight
            del log_probs, probs
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss[:, None].to(grad.dtype), None, None, None


# Models whose causal-LM forward is `lm_head(final hidden states)`, nothing else on the logits.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _chunkable_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, LM head) when the loss can be computed in chunks from the final hidden states, else None:
    a known plain-head model type, an unbiased frozen head, nothing partitioned (calling the backbone
    directly would skip ZeRO-3/FSDP's hooks on the whole model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if (
        config is None
        or config.model_type not in PLAIN_HEAD_MODEL_TYPES
        or type(head) is not nn.Linear
        or head.bias is not None
        or head.weight.requires_grad
        or partitioned(model)
    ):
        return None
    return getattr(base, base.base_model_prefix), head


def chunked_sft_per_example_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_elements: int = LOSS_CHUNK_ELEMENTS
) -> torch.Tensor:
    """`sft_per_example_loss(head(hidden), labels)` from the final hidden states [B, T, H], with at most
    about `chunk_elements` logits alive at once (`_TokenCrossEntropy`); only labelled tokens are scored.
    Equal to the plain loss and its gradient up to float summation order (tests/test_gradients.py)."""
    shifted, counts = _shifted_labels(labels)
    labelled = shifted != IGNORE_INDEX
    chunk = max(1, chunk_elements // head.out_features)
    token_loss = _TokenCrossEntropy.apply(hidden[labelled], head.weight, shifted[labelled], chunk)
    row_of_token = torch.nonzero(labelled)[:, 0]
    return (
        torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, row_of_token, token_loss)
        / counts
    )


def pass_loss(model: nn.Module, batch: dict, chunk_elements: int | None = None) -> torch.Tensor:
    """Sum over the rows of `batch` of their SFT losses, from one forward: the plain loss, or the chunked
    one when the pass's logits would exceed `chunk_elements` (default `LOSS_CHUNK_ELEMENTS`) and the model
    allows it."""
    chunk_elements = LOSS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    inputs, positions = model_inputs(model, batch)
    rows, length = batch["input_ids"].shape
    width = length if positions is None else len(positions)
    chunkable = _chunkable_head(model)
    if chunkable is not None and rows * width * chunkable[1].out_features > chunk_elements:
        backbone, head = chunkable
        inputs.pop("logits_to_keep", None)
        hidden = backbone(**inputs).last_hidden_state
        return chunked_sft_per_example_loss(hidden, head, batch["labels"], chunk_elements).sum()
    # No name for the logits: held through the backward they would be one more [rows, T, vocab] tensor.
    return sft_per_example_loss(model(**inputs).logits, batch["labels"], positions).sum()
