import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from rose_trl.data.sft import collate, tokenize_sft_example
from rose_trl.evaluation.metrics import PreferenceMetricsOptions, preference_metrics, reference_nll, sequence_logps
from tests.eval_helpers import tiny_causal_lm, tiny_tokenizer


PAIRS = Dataset.from_list(
    [
        {"prompt": "star moon", "chosen": "orbit planet light", "rejected": "flour", "subtask": "space"},
        {"prompt": "prime sum of", "chosen": "integer", "rejected": "butter oven bake sugar", "subtask": "math"},
        {"prompt": "comet", "chosen": "galaxy nebula", "rejected": "salt pan", "subtask": "space"},
    ]
)


def lora(tok, perturb: bool):
    model = get_peft_model(
        tiny_causal_lm(tok, seed=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    if perturb:
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model.eval()


def loop_logp(model, tok, prompt, response):
    """Batch-size-1 reference: the model's own mean token loss times the number of response tokens."""
    batch = collate([tokenize_sft_example({"prompt": prompt, "completion": response}, tok, None)], tok.pad_token_id)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        return -model(**batch).loss.item() * n, n


def test_policy_equal_to_reference_gives_chance_accuracy_and_log2_loss():
    tok = tiny_tokenizer()
    m = preference_metrics(lora(tok, perturb=False), tok, PAIRS)  # LoRA B = 0: adapters change nothing
    assert m["accuracy"] == 0.5
    assert m["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert set(m["per_subtask"]) == {"space", "math"} and m["per_subtask"]["space"]["n"] == 2


def test_metrics_match_an_unbatched_computation():
    tok = tiny_tokenizer()
    model = lora(tok, perturb=True)
    beta = 0.1
    margins = []
    for row in PAIRS:
        pc, _ = loop_logp(model, tok, row["prompt"], row["chosen"])
        pr, _ = loop_logp(model, tok, row["prompt"], row["rejected"])
        with model.disable_adapter():
            rc, _ = loop_logp(model, tok, row["prompt"], row["chosen"])
            rr, _ = loop_logp(model, tok, row["prompt"], row["rejected"])
        margins.append((pc - rc) - (pr - rr))
    margins = np.array(margins)
    assert np.all(np.abs(margins) > 1e-3)  # the perturbation makes policy != reference
    m = preference_metrics(model, tok, PAIRS, PreferenceMetricsOptions(beta=beta, batch_size=2))
    assert m["accuracy"] == pytest.approx(np.mean(margins > 0))
    assert m["dpo_loss"] == pytest.approx(np.mean(np.log1p(np.exp(-beta * margins))), rel=1e-4)
    assert m["reward_margin"] == pytest.approx(beta * margins.mean(), abs=1e-4)
    # After the context the adapters are on again.
    assert preference_metrics(model, tok, PAIRS)["dpo_loss"] == pytest.approx(m["dpo_loss"], rel=1e-5)


def test_explicit_reference_model_and_non_peft_error():
    tok = tiny_tokenizer()
    base = tiny_causal_lm(tok, seed=2)
    with pytest.raises(ValueError, match="PEFT"):
        preference_metrics(base, tok, PAIRS)
    m = preference_metrics(base, tok, PAIRS, ref_model=base)
    assert m["accuracy"] == 0.5 and m["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_reference_nll_and_batched_logps():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=4)
    prompts, refs = list(PAIRS["prompt"]), list(PAIRS["chosen"])
    logps, counts = sequence_logps(model, tok, prompts, refs, batch_size=3)
    loop = [loop_logp(model, tok, p, r) for p, r in zip(prompts, refs, strict=True)]
    np.testing.assert_allclose(logps, [logp for logp, _ in loop], rtol=1e-4)
    assert counts.tolist() == [n for _, n in loop]
    expected = -sum(logp for logp, _ in loop) / sum(n for _, n in loop)
    assert reference_nll(model, tok, prompts, refs, batch_size=2) == pytest.approx(expected, rel=1e-4)
    # A random 100-word model is near uniform: NLL close to log(vocab).
    assert abs(reference_nll(model, tok, prompts, refs) - math.log(len(tok))) < 1.0


def test_logps_computed_only_at_response_positions():
    """The forward asks for the logits of the labelled positions only, and the log-probs equal the loop's."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, seed=4)
    kept = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: kept.append((kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep"))),
        with_kwargs=True,
    )
    prompts, refs = ["star moon comet galaxy nebula"] * 2, ["orbit", "planet light"]
    logps, _ = sequence_logps(model, tok, prompts, refs, batch_size=2)
    hook.remove()
    ((width, positions),) = kept
    assert positions is not None and 0 < len(positions) < width - 1
    np.testing.assert_allclose(
        logps, [loop_logp(model, tok, p, r)[0] for p, r in zip(prompts, refs, strict=True)], rtol=1e-4
    )


def test_bootstrap_interval_covers_the_mean_and_narrows_with_n():
    from rose_trl.evaluation.metrics import bootstrap_interval

    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 4000).astype(float)
    lo, hi = bootstrap_interval(small)
    assert lo <= small.mean() <= hi and 0.15 < hi - lo < 0.45  # ~ 2 * 1.96 * sqrt(.25 / 40) = 0.31
    lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 5
    assert bootstrap_interval(small) == (lo, hi)  # seeded
    assert all(math.isnan(x) for x in bootstrap_interval(small[:1]))


def test_summary_carries_intervals_and_likelihood_accuracy():
    tok = tiny_tokenizer()
    model = lora(tok, perturb=True)
    m = preference_metrics(model, tok, PAIRS)
    lo, hi = m["accuracy_ci"]
    assert lo <= m["accuracy"] <= hi
    lo, hi = m["reward_margin_ci"]
    assert lo <= m["reward_margin"] <= hi
    # Likelihood accuracy by hand: mean per-token log-prob of chosen vs rejected under the policy.
    wins = []
    for r in PAIRS:
        (c, nc), (j, nj) = (
            loop_logp(model, tok, r["prompt"], r["chosen"]),
            loop_logp(model, tok, r["prompt"], r["rejected"]),
        )
        wins.append(float(c / nc > j / nj))
    assert m["likelihood_accuracy"] == pytest.approx(np.mean(wins))


def test_evaluate_adapters_matches_preference_metrics(tmp_path):
    from rose_trl.evaluation.heldout import evaluate_adapters, format_results

    tok = tiny_tokenizer()
    model = lora(tok, perturb=True)
    expected = preference_metrics(model, tok, PAIRS)
    model.save_pretrained(tmp_path / "adapter")
    results = evaluate_adapters(tiny_causal_lm(tok, seed=2).eval(), tok, PAIRS, {"tuned": str(tmp_path / "adapter")})
    assert results["base"]["accuracy"] == 0.5 and results["base"]["reward_margin"] == 0.0
    for key in ("accuracy", "reward_margin", "dpo_loss", "likelihood_accuracy"):
        assert results["tuned"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7)
    text = format_results(results)
    assert "tuned" in text and "base" in text and "[" in text
