"""SFT-only few shots -> preference pairs (the paper's section 4.2.1).

When a target task has good answers but no rejected ones, a model writes the losing response: the
given answer is `chosen`, a sample from the model is `rejected`. An optional judge confirms the order
(chosen better than the sample); a sample it does not confirm is redrawn, up to `max_attempts`, and a
row with no confirmed sample is dropped (and logged): a pair in the wrong order would push the
selection the wrong way.

Input rows: `prompt` and `completion` strings, or `messages` ending with the assistant answer; an
optional `subtask` column is kept ("default" when absent). Chat rows give TRL's conversational format
when the tokenizer has a chat template; without one, a [user, assistant] row is used as plain text
(this is the case of the released `_sft.json` files, whose user turn is already "\\n\\nHuman: ...\\n\\nAssistant:").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch

from rose_trl.data.preferences import DEFAULT_SUBTASK, validate_preferences
from rose_trl.data.sft import BadRecordError, _check_messages


logger = logging.getLogger(__name__)

Judge = Callable[[object, object, object], bool]  # (prompt, chosen, rejected) -> True if chosen is better


@dataclass
class RejectedSamplingConfig:
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated (rejected) response, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Row i, attempt a is sampled under seed (seed, i, a): results do not depend on row order or batch."
        },
    )
    max_attempts: int = field(
        default=3,
        metadata={
            "help": "Samples tried per row before dropping it (an empty "
            "sample, one equal to the answer, or one the judge "
            "does not confirm counts as a failed attempt)."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Keep only the last tokens of longer prompts (the end is what the answer follows)."},
    )


def _row_to_parts(row: dict, use_chat: bool, index: int):
    """-> (prompt, chosen) in the output format (strings, or message lists in chat mode)."""
    if row.get("messages") is not None:
        messages = row["messages"]
        _check_messages(messages, "sft", index)
        if messages[-1]["role"] != "assistant":
            raise BadRecordError("sft", index, "messages", "the last message must be the assistant answer")
        if use_chat:
            return messages[:-1], [messages[-1]]
        if len(messages) != 2 or messages[0]["role"] != "user":
            raise BadRecordError(
                "sft", index, "messages", "without a chat template only [user, assistant] rows can be used as text"
            )
        return messages[0]["content"], messages[1]["content"]
    for f in ("prompt", "completion"):
        if not isinstance(row.get(f), str) or not row[f].strip():
            raise BadRecordError("sft", index, f, "missing, empty or not a string")
    return row["prompt"], row["completion"]


def _prompt_ids(prompt, tokenizer, max_prompt_length: int | None) -> torch.Tensor:
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids)
    if max_prompt_length is not None:
        ids = ids[-max_prompt_length:]
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def generate_response(model, tokenizer, prompt, config: RejectedSamplingConfig, seed: tuple[int, ...]) -> str:
    """One sampled response to `prompt` (text or messages), reproducible from `seed`."""
    input_ids = _prompt_ids(prompt, tokenizer, config.max_prompt_length).to(model.device)
    greedy = config.temperature == 0
    kwargs = {} if greedy else {"temperature": config.temperature, "top_p": config.top_p}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=not greedy,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=pad,
            **kwargs,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def sft_to_preferences(
    dataset: datasets.Dataset,
    model,
    tokenizer,
    config: RejectedSamplingConfig | None = None,
    judge: Judge | None = None,
) -> datasets.Dataset:
    """Few-shot SFT rows -> Dataset(prompt, chosen, rejected, subtask) with model-written rejected responses."""
    config = config or RejectedSamplingConfig()
    use_chat = getattr(tokenizer, "chat_template", None) is not None
    was_training = model.training
    model.eval()
    rows, dropped = [], []
    try:
        for i, row in enumerate(dataset):
            prompt, chosen = _row_to_parts(row, use_chat, i)
            chosen_text = chosen[0]["content"] if isinstance(chosen, list) else chosen
            for attempt in range(config.max_attempts):
                text = generate_response(model, tokenizer, prompt, config, (config.seed, i, attempt))
                if not text.strip() or text.strip() == chosen_text.strip():
                    continue
                rejected = [{"role": "assistant", "content": text}] if isinstance(chosen, list) else text
                if judge is None or judge(prompt, chosen, rejected):
                    rows.append(
                        {
                            "prompt": prompt,
                            "chosen": chosen,
                            "rejected": rejected,
                            "subtask": row.get("subtask") or DEFAULT_SUBTASK,
                        }
                    )
                    break
            else:
                dropped.append(i)
    finally:
        model.train(was_training)
    if dropped:
        logger.warning(
            "sft_to_preferences: dropped %d of %d rows with no usable rejected sample: %s",
            len(dropped),
            len(dataset),
            dropped,
        )
    if not rows:
        raise BadRecordError("sft", 0, "*", f"no row got a usable rejected response in {config.max_attempts} attempts")
    out = datasets.Dataset.from_list(rows)
    validate_preferences(out, "sft_to_preferences")
    return out
