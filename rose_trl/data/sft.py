"""Pool examples -> token ids with a response mask, the form every gradient and training step reads.

A pool row is either chat (`messages`: a list of {"role", "content"}) or `prompt`/`completion` strings
(or TRL's conversational prompt/completion: lists of messages). The loss covers the response: every
assistant turn for chat rows, the completion otherwise.

Truncation rule (sequences over `max_length` tokens, never an error): the prompt keeps its *last*
tokens, at most max(max_length - response length, max_length // 2) of them, and the response keeps
its *first* tokens up to the remaining budget. A response therefore always keeps at least
max_length - max_length // 2 tokens (or all of them when shorter).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


IGNORE_INDEX = -100


class BadRecordError(ValueError):
    """A dataset record that cannot be used; the message names the source, the record and the field."""

    def __init__(self, source: str, index: int, field: str, problem: str):
        super().__init__(f"{source}: record {index}, field '{field}': {problem}")
        self.source = source
        self.index = index
        self.field = field


def _check_messages(messages, source: str, index: int, field: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRecordError(source, index, field, "expected a non-empty list of {'role', 'content'} messages")
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecordError(source, index, f"{field}[{turn}]", "each message needs 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise BadRecordError(
                source, index, f"{field}[{turn}].content", f"expected a string, got {type(m['content']).__name__}"
            )
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise BadRecordError(source, index, f"{field}[{turn}].role", f"unknown role {m['role']!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecordError(source, index, field, "no non-empty assistant message to train on")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # sequences of any lengths: the prefix ends at the shorter
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in recent transformers
        out = out["input_ids"]
    return list(out)


def _segments(example: dict, tokenizer, source: str, index: int) -> list[tuple[list[int], bool]]:
    """The row as consecutive (token ids, is_response) segments."""
    if "messages" in example and example["messages"] is not None:
        messages = example["messages"]
        _check_messages(messages, source, index)
        segments = []
        done = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
            upto = _chat_ids(tokenizer, messages[: i + 1])
            start = _common_prefix(before, upto) if before else 0
            start = max(start, done)
            if start > done:
                segments.append((upto[done:start], False))
            segments.append((upto[start:], True))
            done = len(upto)
        return segments
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):  # TRL conversational prompt/completion
            _check_messages(prompt + completion, source, index, "prompt+completion")
            prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            full = _chat_ids(tokenizer, prompt + completion)
        else:
            for field, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str):
                    raise BadRecordError(source, index, field, f"expected a string, got {type(value).__name__}")
            if not completion.strip():
                raise BadRecordError(source, index, "completion", "empty completion: nothing to train on")
            prompt_ids = tokenizer(prompt)["input_ids"]
            full = tokenizer(prompt + completion)["input_ids"]
            if tokenizer.eos_token_id is not None and (not full or full[-1] != tokenizer.eos_token_id):
                full = full + [tokenizer.eos_token_id]
        cut = _common_prefix(prompt_ids, full)
        return [(full[:cut], False), (full[cut:], True)]
    raise BadRecordError(
        source,
        index,
        "messages|prompt,completion",
        f"a pool row needs 'messages' or 'prompt' and 'completion'; it has {sorted(example)}",
    )


def tokenize_sft_example(
    example: dict, tokenizer, max_length: int | None, source: str = "pool", index: int = 0
) -> dict:
    """-> {"input_ids": [...], "completion_mask": [...]} (1 on response tokens), truncated by the module rule."""
    segments = _segments(example, tokenizer, source, index)
    ids = [t for seg, _ in segments for t in seg]
    mask = [int(resp) for seg, resp in segments for _ in seg]
    if max_length is not None and len(ids) > max_length:
        first_resp = mask.index(1) if 1 in mask else len(mask)
        prompt_ids, prompt_mask = ids[:first_resp], mask[:first_resp]
        rest_ids, rest_mask = ids[first_resp:], mask[first_resp:]
        keep_prompt = min(len(prompt_ids), max(max_length - len(rest_ids), max_length // 2))
        ids = prompt_ids[len(prompt_ids) - keep_prompt :] + rest_ids[: max_length - keep_prompt]
        mask = prompt_mask[len(prompt_mask) - keep_prompt :] + rest_mask[: max_length - keep_prompt]
    if not any(mask):
        raise BadRecordError(source, index, "completion", "no response tokens after tokenization")
    return {"input_ids": ids, "completion_mask": mask}


def tokenize_pool(dataset, tokenizer, max_length: int | None, source: str = "pool", num_proc: int | None = None):
    """Tokenize a `datasets.Dataset` of pool rows; keeps the original columns (the selection returns them)."""
    if len(dataset) == 0:
        raise BadRecordError(source, 0, "*", "the pool is empty")
    return dataset.map(
        lambda ex, idx: tokenize_sft_example(ex, tokenizer, max_length, source, idx),
        with_indices=True,
        num_proc=num_proc,
        desc=f"Tokenizing {source}",
    )


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """Right-padded tensors with labels = input ids on response tokens, -100 elsewhere."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids = torch.tensor(r["input_ids"], dtype=torch.long)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(r["completion_mask"], dtype=torch.bool), ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def fingerprint_tokenized(dataset) -> str:
    """sha256 over every row's token ids and response mask: what the gradients depend on."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    for batch in dataset.select_columns(["input_ids", "completion_mask"]).iter(batch_size=4096):
        for ids, mask in zip(batch["input_ids"], batch["completion_mask"], strict=True):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.int8).tobytes())
            h.update(b"|")
    return h.hexdigest()[:32]
