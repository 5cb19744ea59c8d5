"""Batched sampling of responses to test prompts: the model outputs that the judge compares.

Defaults follow the paper's evaluation: sampling with temperature 1.0 and top-p 1.0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rose_trl.utils.modeling import eval_mode


if TYPE_CHECKING:  # names for the signatures only: importing this module stays light
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerationOptions:
    """How `generate_responses` samples. The defaults follow the paper's evaluation (sampling, temperature 1.0,
    top-p 1.0).

    Args:
        max_new_tokens (`int`, defaults to `512`):
            Tokens generated per response, at most.
        do_sample (`bool`, defaults to `True`):
            Sample (`temperature`, `top_p`); `False`: greedy decoding.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature.
        top_p (`float`, defaults to `1.0`):
            Nucleus sampling's probability mass.
        batch_size (`int`, defaults to `8`):
            Prompts a `generate` call.
        use_chat_template (`bool`, defaults to `True`):
            Wrap each prompt as one user turn with the tokenizer's chat template, when it has one.
        max_prompt_length (`int`, *optional*):
            Prompts are cut to their last this many tokens (the generation prompt at their end is kept).
        seed (`int`, *optional*, defaults to `0`):
            `torch.manual_seed` before generating (`None`: not seeded).
    """

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 8
    # Wrap prompts with the tokenizer's chat template (as a user turn) when it has one.
    use_chat_template: bool = True
    max_prompt_length: int | None = None
    seed: int | None = 0


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    """Decoder-only generation continues from the last position, so the padding must come first; an
    over-long prompt loses its start, never the generation prompt at its end."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


def format_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: GenerationOptions | None = None,
) -> list[str]:
    """Generate one response per prompt, in batches of similar length with left padding.

    Args:
        model (`transformers.PreTrainedModel`):
            The causal LM to evaluate (a PEFT model included); put in eval mode for the call.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer, with a pad token. Its padding and truncation sides are restored afterwards.
        prompts (`Sequence[str]`):
            The test prompts.
        options (`GenerationOptions`, *optional*):
            Sampling options; defaults to `GenerationOptions()` (the paper's sampling).

    Returns:
        `list[str]`: the decoded responses (special tokens and surrounding whitespace removed), in the prompts'
        order.

    Example:

    ```python
    from rose_trl.evaluation import GenerationOptions, generate_responses

    responses = generate_responses(model, tokenizer, test["prompt"], GenerationOptions(max_new_tokens=256))
    ```
    """
    opts = options or GenerationOptions()
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer needs a pad token to batch prompts (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    texts = [format_prompt(tokenizer, p, opts.use_chat_template) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device = next(model.parameters()).device
    sampling = (
        {"do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p}
        if opts.do_sample
        else {"do_sample": False}
    )
    out: list[str | None] = [None] * len(texts)
    with eval_mode(model), left_padding(tokenizer):
        for start in range(0, len(order), opts.batch_size):
            rows = order[start : start + opts.batch_size]
            enc = tokenizer(
                [texts[i] for i in rows],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=opts.max_prompt_length is not None,
                max_length=opts.max_prompt_length,
            ).to(device)
            generated = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=opts.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            for i, text in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                out[i] = text.strip()
    return out
