import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rose_trl.data import RejectedSamplingConfig, generate_response, sft_to_preferences
from rose_trl.data.sft import BadRecordError


CORPUS = [
    "\n\nHuman: how do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, then bake it.",
    "\n\nHuman: what is a cat?\n\nAssistant: A small furry animal that many people keep as a pet.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def sft_rows():
    return datasets.Dataset.from_list(
        [
            {
                "prompt": "\n\nHuman: how do I bake bread?\n\nAssistant:",
                "completion": " Mix flour and bake.",
                "subtask": "food",
            },
            {"prompt": "\n\nHuman: what is a cat?\n\nAssistant:", "completion": " A small pet.", "subtask": "animals"},
            {"prompt": "\n\nHuman: what is a dog?\n\nAssistant:", "completion": " A loyal pet.", "subtask": "animals"},
        ]
    )


CONFIG = RejectedSamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=0)


def test_string_rows_get_a_seeded_generated_rejected(model, tokenizer):
    ds = sft_to_preferences(sft_rows(), model, tokenizer, CONFIG)
    assert ds.column_names == ["prompt", "chosen", "rejected", "subtask"]
    assert ds["chosen"] == sft_rows()["completion"] and ds["subtask"] == ["food", "animals", "animals"]
    assert all(r.strip() and r != c for r, c in zip(ds["rejected"], ds["chosen"], strict=True))
    # Each row's sample depends on (seed, row, attempt) only: same seed, same text, in any row order.
    assert ds["rejected"] == sft_to_preferences(sft_rows(), model, tokenizer, CONFIG)["rejected"]
    assert ds["rejected"][0] == generate_response(model, tokenizer, ds["prompt"][0], CONFIG, (0, 0, 0))
    other = RejectedSamplingConfig(max_new_tokens=6, seed=1)
    assert ds["rejected"] != sft_to_preferences(sft_rows(), model, tokenizer, other)["rejected"]
    greedy = RejectedSamplingConfig(max_new_tokens=6, temperature=0)
    assert len(generate_response(model, tokenizer, "\n\nHuman: hi", greedy, (5,))) > 0


def test_judge_confirms_order_and_unconfirmed_rows_are_dropped(model, tokenizer):
    seen = []

    def judge(prompt, chosen, rejected):
        seen.append((prompt, chosen, rejected))
        return len(seen) % 2 == 0  # refuses every first try

    ds = sft_to_preferences(sft_rows(), model, tokenizer, CONFIG, judge=judge)
    assert seen[0][:2] == (sft_rows()["prompt"][0], sft_rows()["completion"][0])
    # The kept sample is the one the judge confirmed (each row's second draw).
    assert [s[2] for s in seen[1::2]] == ds["rejected"]
    assert ds["rejected"][0] == generate_response(model, tokenizer, ds["prompt"][0], CONFIG, (0, 0, 1))

    one_try = RejectedSamplingConfig(max_new_tokens=6, seed=0, max_attempts=1)
    kept = sft_to_preferences(sft_rows(), model, tokenizer, one_try, judge=lambda p, c, r: "cat" not in p)
    assert kept["subtask"] == ["food", "animals"]
    with pytest.raises(BadRecordError, match="no row got a usable rejected response"):
        sft_to_preferences(sft_rows(), model, tokenizer, one_try, judge=lambda p, c, r: False)


def test_chat_rows(model, tokenizer):
    rows = datasets.Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": "what is a cat?"},
                    {"role": "assistant", "content": "A small pet."},
                ]
            }
        ]
    )
    plain = sft_to_preferences(rows, model, tokenizer, CONFIG)  # no chat template: used as text
    assert plain[0]["prompt"] == "what is a cat?" and plain[0]["subtask"] == "default"
    chat_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    chat_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    conv = sft_to_preferences(rows, model, chat_tok, CONFIG)
    assert conv[0]["prompt"] == [{"role": "user", "content": "what is a cat?"}]
    assert conv[0]["chosen"] == [{"role": "assistant", "content": "A small pet."}]
    assert conv[0]["rejected"][0]["role"] == "assistant" and conv[0]["rejected"][0]["content"].strip()
    bad = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(BadRecordError, match="assistant"):
        sft_to_preferences(bad, model, chat_tok, CONFIG)
