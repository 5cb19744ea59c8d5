import pytest
from datasets import Dataset

from rose_trl.tiny import _texts, build_tiny_llama, build_tokenizer, make_planted_task


@pytest.fixture(scope="session")
def planted():
    """(pool Dataset, validation Dataset, tokenizer, pool rows) of the generated planted-signal task."""
    pool, validation = make_planted_task(n_pool=300, pairs_per_subtask=4, seed=0)
    tokenizer = build_tokenizer(_texts(pool, validation))
    return Dataset.from_list(pool), Dataset.from_list(validation), tokenizer, pool


@pytest.fixture
def tiny_base(planted):
    return build_tiny_llama(planted[2], hidden=64, layers=2, seed=0)
