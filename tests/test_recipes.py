"""Every recipe parses into (ROSEConfig, SFTConfig, ModelConfig); the paper recipes carry the paper's settings."""

import os
from pathlib import Path

import pytest
import torch
import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from rose_trl.config import ROSEConfig
from rose_trl.models.final_model import model_specs


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("config_*.yaml"))
# The paper's settings; tiny and SmolLM2 are CPU-sized recipes.
PAPER = [p for p in RECIPES if not {"tiny", "smollm2-135m"} & set(p.parts)]
SMOLLM2 = [p for p in RECIPES if "smollm2-135m" in p.parts]


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
    unknown = (
        set(yaml.safe_load(path.read_text()))
        - set(ROSEConfig.__dataclass_fields__)
        - set(SFTConfig.__dataclass_fields__)
        - set(ModelConfig.__dataclass_fields__)
    )
    assert not unknown, unknown


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_paper_settings(path):
    rose, sft, model = parse(path)
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (128, 512, 0.1)
    assert sorted(model.lora_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (sft.learning_rate, sft.num_train_epochs) == (2e-5, 4)
    assert sft.optim in ("adamw_torch", "adamw_torch_fused")  # torch AdamW: the Adam state ROSE reads
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps * 4 == 128  # on 4 GPUs
    assert (rose.projection_dim, rose.validation_beta, rose.selection_fraction, rose.warmup_fraction) == (
        8192,
        0.1,
        0.05,
        0.05,
    )
    assert rose.selection_method == "rose"


@pytest.mark.parametrize("path", SMOLLM2, ids=lambda p: p.name)
def test_smollm2_recipes_are_the_cpu_quickstart_settings(path):
    """LoRA r=8 on q,k,v,o, float32 on the CPU, up to 256 tokens, the real-text task written by smollm2-assets."""
    rose, sft, model = parse(path)
    task = path.stem.split("_")[1]
    assert (model.lora_r, model.dtype, sft.max_length, sft.use_cpu, sft.bf16) == (8, "float32", 256, True, False)
    assert sorted(model.lora_target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert model.model_name_or_path == "outputs/smollm2/model"
    assert (rose.pool_dataset, rose.validation_dataset) == (
        f"outputs/smollm2/{task}/pool.jsonl",
        f"outputs/smollm2/{task}/validation.jsonl",
    )
    assert sft.output_dir == f"outputs/smollm2/run_{task}"
    # Rows a pass are the memory budget's to decide: no hand-tuned option (issue 25).
    text = path.read_text()
    for option in ("gradient_batch_size", "max_batch_tokens", "validation_batch_size", "gradient_memory_gb"):
        assert f"\n{option}:" not in text, option
    assert rose.memory_budget_gb is None


SHARED = Path(os.environ.get("ROSE_DATA_DIR", ROOT.parent / "shared" / "data" / "rose"))


def test_paper_recipes_use_the_builders_by_name_with_the_papers_k():
    for path in PAPER:
        rose, _, _ = parse(path)
        task = path.stem.split("_")[1]
        assert rose.validation_dataset == f"rose:{task}", path
        assert rose.validation_k == {"shp": 5, "se": 2, "hh": 1}[task], path


@pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the ROSE paper's released data is not at {SHARED} (set ROSE_DATA_DIR)"
)
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


def launch_lines(readme: Path) -> list[list[str]]:
    """The `accelerate launch ...` commands of a README's bash blocks, continuation lines joined."""
    import shlex

    text = readme.read_text().replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("accelerate launch")]


@pytest.mark.parametrize(
    "model_dir", sorted(p for p in (ROOT / "recipes").iterdir() if p.is_dir()), ids=lambda p: p.name
)
def test_each_recipe_readme_gives_launch_lines_that_parse(model_dir):
    """Every recipe folder has a README whose launch lines name an existing accelerate config, a recipe
    script and one of the folder's configs, and whose extra options are options of that script."""
    from rose_trl.config import SelectConfig

    readme = model_dir / "README.md"
    assert readme.exists(), f"{model_dir.name} has no README.md with its launch lines"
    lines = launch_lines(readme)
    assert lines, readme
    configs_named = set()
    for cmd in lines:
        config_file = Path(cmd[cmd.index("--config_file") + 1])
        assert (ROOT / config_file).is_file(), cmd
        script = next(a for a in cmd if a.startswith("recipes/") and a.endswith(".py"))
        assert (ROOT / script).is_file(), cmd
        rest = cmd[cmd.index(script) + 1 :]
        recipe = Path(rest[rest.index("--config") + 1])
        assert recipe.parent.parent == model_dir.relative_to(ROOT), cmd
        configs_named.add(recipe.name)
        extra = [a for i, a in enumerate(rest) if i not in (rest.index("--config"), rest.index("--config") + 1)]
        # Parsed here without a GPU or a launcher: the CPU is forced last (argparse keeps the last value), and
        # ddp_backend (which makes accelerate look for the launcher's process group) is only checked by name.
        if "--ddp_backend" in extra:
            assert "ddp_backend" in SFTConfig.__dataclass_fields__
            i = extra.index("--ddp_backend")
            extra = extra[:i] + extra[i + 2 :]
        extra = extra + ([] if torch.cuda.is_available() else ["--use_cpu", "true"])
        if script.endswith("rose_select.py"):
            TrlParser((ROSEConfig, ModelConfig, SelectConfig)).parse_args_and_config(
                ["--config", str(ROOT / recipe), *extra]
            )
        else:
            TrlParser((ROSEConfig, SFTConfig, ModelConfig)).parse_args_and_config(
                ["--config", str(ROOT / recipe), *extra]
            )
    # It launches the folder's own configs.
    assert configs_named & {p.name for p in model_dir.rglob("*.yaml")}


def test_paper_recipe_readmes_keep_the_effective_batch():
    """Each GPU launch line keeps the paper's 128 = processes x per-device batch x accumulation."""
    for model_dir in {p.parents[1] for p in PAPER}:
        for cmd in launch_lines(model_dir / "README.md"):
            n = int(cmd[cmd.index("--num_processes") + 1]) if "--num_processes" in cmd else 1
            rose, sft, _ = parse(ROOT / cmd[cmd.index("--config", cmd.index("--config_file") + 2) + 1])
            accumulation = (
                int(cmd[cmd.index("--gradient_accumulation_steps") + 1])
                if "--gradient_accumulation_steps" in cmd
                else sft.gradient_accumulation_steps
            )
            assert n * sft.per_device_train_batch_size * accumulation == 128, cmd


# ROSE-T (the paper's Table 8): Llama-2-7B selects, each of these is fine-tuned on its selection.
TABLE_8 = {
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
}


@pytest.mark.parametrize("task", ["shp", "se", "hh"])
def test_table_8_recipes_select_as_the_llama_2_7b_recipe_and_train_each_model(task):
    """One recipe per Table 8 model and task; each selects exactly as llama-2-7b/rose/config_<task>.yaml, in the same
    output_dir (so the selection is made once and reused), and sets only the final model and its folder."""
    folder = ROOT / "recipes/llama-2-7b/rose-t"
    rose0, sft0, model0 = parse(ROOT / f"recipes/llama-2-7b/rose/config_{task}.yaml")
    assert rose0.final_model is None
    for key, hub_id in TABLE_8.items():
        rose, sft, model = parse(folder / f"config_{task}_{key}.yaml")
        assert rose.final_model == {"model_name_or_path": hub_id}
        assert rose.to_dict() == rose0.to_dict() and model == model0 and sft.to_dict() == sft0.to_dict()
        _, final = model_specs(rose, sft, model)
        assert final.output_dir == Path(f"outputs/llama-2-7b/rose-{task}/final_{hub_id.split('/')[1]}")
        rose.selection_method = "less"  # LESS-T: its own folder beside ROSE-T's
        assert model_specs(rose, sft, model)[1].output_dir.name == f"final_less_{hub_id.split('/')[1]}"
    assert len(list(folder.glob(f"config_{task}_*.yaml"))) == len(TABLE_8)


def test_llama_2_7b_recipes_write_rows_in_less_tulu_format():
    """tulu.jinja renders chat rows as LESS's encode_with_messages_format does: bos, then per turn
    <|user|>\\n{content}\\n and <|assistant|>\\n{content}{eos}\\n, contents stripped."""
    from rose_trl.models.tiny import build_tokenizer

    tokenizer = build_tokenizer(["hello there"], vocab_size=300, chat=False)
    tokenizer.chat_template = (ROOT / "recipes/llama-2-7b/tulu.jinja").read_text()
    messages = [
        {"role": "system", "content": "be brief "},
        {"role": "user", "content": " hi?"},
        {"role": "assistant", "content": "hello.\n"},
        {"role": "user", "content": "bye"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<s><|system|>\nbe brief\n<|user|>\nhi?\n<|assistant|>\nhello.</s>\n<|user|>\nbye\n<|assistant|>\n"
    )
    for path in PAPER:
        if "llama-2-7b" in path.parts:
            assert parse(path)[1].chat_template_path == "recipes/llama-2-7b/tulu.jinja", path


@pytest.mark.parametrize("task", ["se", "hh"])
def test_smollm2_rose_t_recipes_select_as_the_smollm2_recipe_and_train_gemma(task):
    rose0, sft0, model0 = parse(ROOT / f"recipes/smollm2-135m/rose/config_{task}.yaml")
    rose, sft, model = parse(ROOT / f"recipes/smollm2-135m/rose-t/config_{task}.yaml")
    assert rose.to_dict() == rose0.to_dict() and model == model0 and sft.to_dict() == sft0.to_dict()
    _, final = model_specs(rose, sft, model)
    assert final.model_args.model_name_or_path == "outputs/gemma3/model"
    assert final.sft.chat_template_path == "outputs/gemma3/gemma3.jinja" and final.retokenizes
    assert final.output_dir == Path(f"outputs/smollm2/run_{task}/final_gemma-3-270m")
    # Gemma's Trainer batch is the warm-up's, checked against the memory budget at the start (no hand-tuned sizes)
    assert not final.block & {"per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"}
    assert (final.sft.per_device_train_batch_size, final.sft.gradient_accumulation_steps) == (2, 2)
