import sys
from pathlib import Path

import pytest
from datasets import Dataset

from rose_trl.models.tiny import _texts, build_tiny_llama, build_tokenizer, make_planted_task


# The benchmark scripts, importable by name in the tests that run them at tiny scale (each folder is a question;
# benchmarks/common.py holds what they share).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
for folder in (BENCHMARKS, *(BENCHMARKS / name for name in ("speed", "memory", "quality"))):
    sys.path.insert(0, str(folder))


@pytest.fixture(scope="session")
def planted():
    """(pool Dataset, validation Dataset, tokenizer, pool rows) of the generated planted-signal task."""
    pool, validation = make_planted_task(n_pool=300, pairs_per_subtask=4, seed=0)
    tokenizer = build_tokenizer(_texts(pool, validation))
    return Dataset.from_list(pool), Dataset.from_list(validation), tokenizer, pool


@pytest.fixture
def tiny_base(planted):
    return build_tiny_llama(planted[2], hidden=64, layers=2, seed=0)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny recipe's files (model folder, a 120-row pool, validation pairs), written once; tests only read them."""
    from rose_trl.models.tiny import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.mktemp("tiny"), n_pool=120)


@pytest.fixture(scope="session")
def configs():
    """configs(assets, out, sft={...}, **rose) -> (ROSEConfig, SFTConfig, ModelConfig) of an in-process tiny run:
    LoRA r 4 on q/v, no final training; `sft` adds SFTConfig options."""
    from trl import ModelConfig, SFTConfig

    from rose_trl.config import ROSEConfig

    def build(assets, out, sft=None, **rose):
        return (
            ROSEConfig(
                pool_dataset=str(assets / "pool.jsonl"),
                validation_dataset=str(assets / "validation.jsonl"),
                final_training=False,
                **rose,
            ),
            SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_length=256, **(sft or {})),
            ModelConfig(
                model_name_or_path=str(assets / "model"),
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
            ),
        )

    return build
