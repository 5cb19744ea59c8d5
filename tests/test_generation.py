import pytest

from rose_trl.evaluation.generation import GenerationOptions, format_prompt, generate_responses
from tests.eval_helpers import tiny_causal_lm, tiny_tokenizer


PROMPTS = ["star", "flour butter oven bake sugar dough", "prime sum", "moon light comet galaxy"]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tok, seed=3), tok


def test_greedy_batched_equals_one_at_a_time(lm):
    model, tok = lm
    greedy = GenerationOptions(max_new_tokens=6, do_sample=False, batch_size=4)
    batched = generate_responses(model, tok, PROMPTS, greedy)
    single = [
        generate_responses(model, tok, [p], GenerationOptions(max_new_tokens=6, do_sample=False, batch_size=1))[0]
        for p in PROMPTS
    ]
    # Left padding keeps every row's continuation identical to its unpadded run, in the prompts' order.
    assert batched == single
    assert all(isinstance(r, str) and r for r in batched)
    assert tok.padding_side == "right"  # restored


def test_sampling_is_seeded_and_respects_max_new_tokens(lm):
    model, tok = lm
    opts = GenerationOptions(max_new_tokens=5, batch_size=3, seed=7)
    a, b = generate_responses(model, tok, PROMPTS, opts), generate_responses(model, tok, PROMPTS, opts)
    assert a == b
    assert all(len(tok(r, add_special_tokens=False)["input_ids"]) <= 5 for r in a)
    assert (
        GenerationOptions().temperature == 1.0 and GenerationOptions().top_p == 1.0 and GenerationOptions().do_sample
    )


def test_chat_template_is_applied(lm):
    _, tok = lm
    assert format_prompt(tok, "star") == "<|user|> star <|assistant|>"
    assert format_prompt(tok, "star", use_chat_template=False) == "star"


def test_long_prompts_keep_their_end(lm):
    model, tok = lm
    opts = GenerationOptions(max_new_tokens=4, do_sample=False, max_prompt_length=6, use_chat_template=False)
    long = " ".join(["star"] * 20) + " flour butter oven"
    # Only the last 6 tokens are kept, so the prompt's start cannot change the answer.
    assert generate_responses(model, tok, [long], opts) == generate_responses(
        model, tok, ["star star star flour butter oven"], opts
    )
    assert tok.truncation_side == "right"
