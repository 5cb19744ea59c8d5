"""Every recipe parses into (ROSEConfig, SFTConfig, ModelConfig); the paper recipes carry the paper's settings."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from rose_trl.config import ROSEConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("config_*.yaml"))
PAPER = [p for p in RECIPES if "tiny" not in p.parts]


def parse(path):
    parser = TrlParser((ROSEConfig, SFTConfig, ModelConfig))
    # bf16 recipes are for GPUs; without one, transformers accepts bf16 only when told it runs on the CPU.
    extra = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    return parser.parse_args_and_config(["--config", str(path), *extra])


def test_recipes_exist():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    for task in ("shp", "se", "hh"):
        assert f"llama-2-7b/rose/config_{task}.yaml" in names
    assert "tiny/rose/config_tiny.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses_and_documents_its_launch_line(path):
    rose, sft, model = parse(path)
    assert rose.pool_dataset and rose.validation_dataset and model.use_peft
    assert f"recipes/rose_sft.py --config recipes/{path.relative_to(ROOT / 'recipes')}" in path.read_text()
    unknown = set(yaml.safe_load(path.read_text())) - set(ROSEConfig.__dataclass_fields__) \
        - set(SFTConfig.__dataclass_fields__) - set(ModelConfig.__dataclass_fields__)
    assert not unknown, unknown


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_paper_settings(path):
    rose, sft, model = parse(path)
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (128, 512, 0.1)
    assert sorted(model.lora_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (sft.learning_rate, sft.num_train_epochs) == (2e-5, 4)
    assert sft.optim in ("adamw_torch", "adamw_torch_fused")  # torch AdamW: the Adam state ROSE reads
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps * 4 == 128  # on 4 GPUs
    assert (rose.projection_dim, rose.validation_beta, rose.selection_fraction, rose.warmup_fraction) == (8192, 0.1, 0.05, 0.05)
    assert rose.selection_method == "rose"


SHARED = Path(os.environ.get("ROSE_DATA_DIR", ROOT.parent / "shared" / "data" / "rose"))


def test_paper_recipes_use_the_builders_by_name_with_the_papers_k():
    for path in PAPER:
        rose, _, _ = parse(path)
        task = path.stem.split("_")[1]
        assert rose.validation_dataset == f"rose:{task}", path
        assert rose.validation_k == {"shp": 5, "se": 2, "hh": 1}[task], path


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the ROSE paper's released data is not at {SHARED} (set ROSE_DATA_DIR)")
@pytest.mark.parametrize("path", [p for p in PAPER if "llama-2-7b" in p.parts], ids=lambda p: p.name)
def test_released_file_named_in_each_recipe_loads(path):
    """Each recipe names, as the alternative to the builder, the paper's released file: with no other
    option it loads with the paper's pair and subtask counts."""
    from rose_trl.data import load_preferences

    rose, _, _ = parse(path)
    task, k = rose.validation_dataset.split(":")[1], rose.validation_k
    named = f"data/rose/validation/{task}/{task}_{k}_shot/{task}_{k}_shot_preference.json"
    assert named in path.read_text()
    pairs = load_preferences(str(SHARED / Path(named).relative_to("data/rose")))
    expected = {"shp": (90, 18), "se": (20, 10), "hh": (2, 2)}[task]
    assert (len(pairs), len(set(pairs["subtask"]))) == expected
