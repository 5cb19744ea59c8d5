"""Tiny word-level tokenizers, models and text tasks for the baseline/evaluation tests: no Hub access."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


SPACE = "star planet orbit galaxy comet telescope nebula moon asteroid light".split()
COOKING = "flour butter oven bake sugar dough whisk pan salt garlic".split()
MATH = "integer prime sum divide equation fraction proof angle square root".split()
FILLER = "the a of and to is it this that with".split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(extra_words=()) -> PreTrainedTokenizerFast:
    words = SPACE + COOKING + MATH + FILLER + list(extra_words)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:.,!?")
    tok.train_from_iterator([" ".join(words + letters)] * 2, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _sentence(rng, vocab, n):
    return " ".join(rng.choice(vocab + FILLER) for _ in range(n))


def topic_task(n_per_topic: int = 6, seed: int = 0):
    """Pool of space / cooking / math rows (chat and prompt-completion mixed, with `source`) and a
    validation set with subtasks "space" and "math": cooking rows share none of its vocabulary."""
    rng = random.Random(seed)
    rows = []
    for topic, vocab in (("space", SPACE), ("cooking", COOKING), ("math", MATH)):
        for i in range(n_per_topic):
            q, a = _sentence(rng, vocab, 8), _sentence(rng, vocab, 12)
            if i % 2:
                rows.append(
                    {
                        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "source": topic,
                    }
                )
            else:
                rows.append({"prompt": q, "completion": a, "source": topic})
    # Row formats are either-or; a Dataset needs one schema, so split by format and keep both forms as columns.
    pool = Dataset.from_list(
        [
            {
                "messages": r.get("messages"),
                "prompt": r.get("prompt"),
                "completion": r.get("completion"),
                "source": r["source"],
            }
            for r in rows
        ]
    )
    val = []
    for subtask, vocab in (("space", SPACE), ("math", MATH)):
        for _ in range(3):
            val.append(
                {
                    "prompt": _sentence(rng, vocab, 8),
                    "chosen": _sentence(rng, vocab, 10),
                    "rejected": _sentence(rng, FILLER, 6),
                    "subtask": subtask,
                }
            )
    return pool, Dataset.from_list(val)
