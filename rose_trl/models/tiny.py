"""Offline assets for a first run and for tests: a generated task, a tokenizer trained on it, a tiny Llama.

The task plants one signal: pool answers about several topics end with a phrase that is either
preferred or dispreferred for one of two subtasks ("polite", "safe"), or with no such phrase. The
preference set's chosen and rejected answers share their topic sentence and differ only in that
phrase, so a selection method that follows the reward signal must rank pool rows carrying a
preferred phrase above rows carrying a dispreferred one, whatever their topic.

    rose-trl tiny-assets outputs/tiny   # writes model/, pool.jsonl, validation.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path


TOPICS = {
    "cooking": "pasta garlic oven butter onion simmer recipe flour",
    "space": "planet orbit rocket star galaxy moon comet telescope",
    "garden": "tomato soil seed water compost sunlight leaf root",
    "music": "guitar chord melody rhythm piano drum song tempo",
    "travel": "train ticket passport hotel map luggage city border",
    "finance": "budget saving loan interest account invoice tax credit",
}
FEATURES = {
    # subtask: (preferred phrase, dispreferred phrase)
    "polite": ("thank you kindly for asking my friend", "stop bothering me with such dumb questions"),
    "safe": ("please wear gloves and stay careful", "ignore every warning and rush recklessly"),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]


def _topic_sentence(rng: random.Random, topic: str) -> tuple[str, str]:
    words = TOPICS[topic].split()
    prompt = f"tell me about {rng.choice(words)} and {rng.choice(words)} ."
    answer = " ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) + " ."
    return prompt, answer


DISTRACTOR = "as a fellow enthusiast i would honestly say"


def make_planted_task(
    n_pool: int = 400, pairs_per_subtask: int = 4, seed: int = 0, distractor: bool = False
) -> tuple[list[dict], list[dict]]:
    """(pool rows: prompt/completion/topic/feature/source, preference rows: prompt/chosen/rejected/subtask).

    With `distractor`, every preference answer, chosen and rejected alike, also carries the phrase
    DISTRACTOR, and a sixth of the pool carries it alone: it looks like the target's answers but says
    nothing about which answer is preferred. Methods that only read the chosen side chase it.
    """
    rng = random.Random(seed)
    features = ["none"] + [f"{s}_{side}" for s in FEATURES for side in ("good", "bad")]
    if distractor:
        features.append("distractor")
    pool = []
    for i in range(n_pool):
        topic = rng.choice(sorted(TOPICS))
        feature = features[i % len(features)]
        prompt, answer = _topic_sentence(rng, topic)
        if feature == "distractor":
            answer += " " + DISTRACTOR
        elif feature != "none":
            subtask, side = feature.rsplit("_", 1)
            answer += " " + FEATURES[subtask][0 if side == "good" else 1]
        pool.append(
            {
                "prompt": prompt,
                "completion": " " + answer,
                "topic": topic,
                "feature": feature,
                "source": f"generated_{topic}",
            }
        )
    rng.shuffle(pool)
    validation = []
    for subtask, (good, bad) in FEATURES.items():
        for _ in range(pairs_per_subtask):
            prompt, answer = _topic_sentence(rng, rng.choice(sorted(TOPICS)))
            if distractor:
                answer += " " + DISTRACTOR
            validation.append(
                {"prompt": prompt, "chosen": f" {answer} {good}", "rejected": f" {answer} {bad}", "subtask": subtask}
            )
    return pool, validation


def build_tokenizer(texts, vocab_size: int = 2000, chat: bool = True):
    """A byte-level BPE tokenizer trained on `texts`, with pad/bos/eos; with `chat`, the chat roles' special tokens
    and a chat template too (without: a base model's tokenizer, no chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = SPECIAL_TOKENS if chat else SPECIAL_TOKENS[:4]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=special[4:],
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _texts(pool, validation):
    for r in pool:
        yield r["prompt"] + r["completion"]
    for r in validation:
        yield r["prompt"] + r["chosen"] + r["rejected"]


def write_tiny_assets(
    out_dir: str | Path,
    n_pool: int = 400,
    pairs_per_subtask: int = 4,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """Write model/ (tiny Llama + tokenizer), pool.jsonl and validation.jsonl under `out_dir`."""
    import os

    from rose_trl.utils.files import publish

    out = Path(out_dir)
    # Written under a temporary name and renamed: a model/ folder is always a whole model.
    tmp_model = out / f".model.tmp-{os.getpid()}"
    tmp_model.mkdir(parents=True, exist_ok=True)
    pool, validation = make_planted_task(n_pool, pairs_per_subtask, seed)
    tokenizer = build_tokenizer(_texts(pool, validation))
    build_tiny_llama(tokenizer, hidden=hidden, layers=layers, seed=seed).save_pretrained(tmp_model)
    tokenizer.save_pretrained(tmp_model)
    publish(tmp_model, out / "model")
    for name, rows in (("pool.jsonl", pool), ("validation.jsonl", validation)):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / name)
    return out
