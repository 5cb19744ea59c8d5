import numpy as np
import pytest
from datasets import Dataset

from rose_trl.baselines import BASELINES, pool_text, subtask_groups
from rose_trl.data.sft import BadRecordError
from tests.eval_helpers import tiny_causal_lm, tiny_tokenizer, topic_task


@pytest.fixture(scope="module")
def task():
    return topic_task()


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tok), tok


def run(name, task, lm, seed=0):
    pool, val = task
    model, tok = lm
    return BASELINES[name](pool, val, seed=seed, model=model, tokenizer=tok)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_scores_are_well_formed_and_deterministic(name, task, lm):
    pool, _ = task
    a, b = run(name, task, lm), run(name, task, lm)
    assert set(a) == set(b) and "score" in a
    for key in a:
        assert a[key].shape == (len(pool),) and a[key].dtype.kind == "f"
        assert np.all(np.isfinite(a[key]))
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("name", ["bm25", "rds", "dsir"])
def test_per_subtask_columns(name, task, lm):
    table = run(name, task, lm)
    assert {k for k in table if k.startswith("score_")} == {"score_space", "score_math"}


@pytest.mark.parametrize("name", ["bm25", "rds"])
def test_score_is_max_over_subtasks(name, task, lm):
    table = run(name, task, lm)
    np.testing.assert_allclose(table["score"], np.maximum(table["score_space"], table["score_math"]))


def test_random_depends_on_seed_and_full_is_constant(task, lm):
    a, b = run("random", task, lm, seed=0)["score"], run("random", task, lm, seed=1)["score"]
    assert not np.array_equal(a, b)
    assert np.all((a >= 0) & (a < 1))
    full = run("full", task, lm)["score"]
    assert np.all(full == full[0])
    with pytest.raises(TypeError):
        BASELINES["random"](*task, bogus=1)


@pytest.mark.parametrize("name", ["bm25", "dsir"])
def test_text_methods_rank_on_topic_rows_first(name, task, lm):
    pool, _ = task
    table = run(name, task, lm)
    sources = np.asarray(pool["source"])
    cooking = table["score"][sources == "cooking"]
    on_topic = table["score"][sources != "cooking"]
    # Every space/math row beats every cooking row: cooking shares only filler words with the validation.
    assert on_topic.min() > cooking.max()
    # ...and each subtask column prefers its own topic.
    assert table["score_space"][sources == "space"].mean() > table["score_space"][sources == "math"].mean()
    assert table["score_math"][sources == "math"].mean() > table["score_math"][sources == "space"].mean()


def test_bm25_options_change_scores(task, lm):
    pool, val = task
    a = BASELINES["bm25"](pool, val)["score"]
    b = BASELINES["bm25"](pool, val, k1=0.5, b=0.1)["score"]
    assert not np.allclose(a, b)
    with pytest.raises(TypeError):
        BASELINES["bm25"](pool, val, k3=1)


def test_rds_matches_unbatched_embeddings(task, lm):
    pool, val = task
    model, tok = lm
    batched = BASELINES["rds"](pool, val, model=model, tokenizer=tok, batch_size=7)
    single = BASELINES["rds"](pool, val, model=model, tokenizer=tok, batch_size=1)
    # Padding must not leak into the mean: batch size 1 has none.
    np.testing.assert_allclose(batched["score"], single["score"], atol=1e-5)


def test_rds_needs_a_model(task):
    with pytest.raises(ValueError, match="model"):
        BASELINES["rds"](*task)


def test_pool_text_and_subtasks():
    assert (
        pool_text({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        == "hi\nyo"
    )
    assert pool_text({"prompt": "a", "completion": "b"}) == "a\nb"
    assert (
        pool_text(
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "r"}]}
        )
        == "q\nr"
    )
    with pytest.raises(BadRecordError):
        pool_text({"text": "x"}, 3)
    groups = subtask_groups(Dataset.from_dict({"prompt": ["a"] * 3, "chosen": ["b"] * 3, "subtask": ["x", "y", "x"]}))
    assert list(groups) == ["x", "y"] and groups["x"].tolist() == [0, 2]
    assert list(subtask_groups(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}))) == ["all"]


def test_dsir_matches_the_formula_on_a_hand_sized_example():
    from data_selection.hashed_ngram_dsir import get_ngram_counts
    from nltk.tokenize import WordPunctTokenizer

    pool = Dataset.from_dict(
        {"prompt": ["star moon", "flour sugar", "star flour"], "completion": ["orbit", "bake", "moon"]}
    )
    val = Dataset.from_dict({"prompt": ["star"], "chosen": ["moon orbit"], "rejected": ["x"], "subtask": ["space"]})
    table = BASELINES["dsir"](pool, val, num_buckets=64)

    def feats(text: str) -> np.ndarray:
        return get_ngram_counts(text, n=2, num_buckets=64, tokenizer=WordPunctTokenizer().tokenize).astype(float)

    raw = np.stack([feats(t) for t in ["star moon\norbit", "flour sugar\nbake", "star flour\nmoon"]])
    target = feats("star\nmoon orbit")
    log_ratio = np.log(target / target.sum() + 1e-8) - np.log(raw.sum(0) / raw.sum() + 1e-8)
    np.testing.assert_allclose(table["score"], raw @ log_ratio)
    np.testing.assert_allclose(table["score_space"], table["score"])
    assert np.argmax(table["score"]) == 0 and np.argmin(table["score"]) == 1
