"""GGUF files as a model source: converted once (cached under the file's hash) to a folder whose model gives
the source model's logits, in every stage that loads a model."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from rose_trl.models.source import GGUF_RECORD, file_sha256, resolve_model_source
from rose_trl.models.tiny import _texts, build_tiny_llama, build_tokenizer, make_planted_task

from .gguf_fixtures import write_tiny_gguf


pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    pool, validation = make_planted_task(60, 2, seed=0)
    tokenizer = build_tokenizer(_texts(pool, validation), vocab_size=500)
    model = build_tiny_llama(tokenizer, hidden=64, layers=2, heads=4, seed=3).eval()
    return write_tiny_gguf(folder / "tiny.gguf", model, tokenizer), model, tokenizer


def test_converted_model_gives_the_source_logits(tiny_gguf, tmp_path):
    path, model, tokenizer = tiny_gguf
    source = resolve_model_source(str(path), cache_dir=tmp_path)
    assert source.record == {"gguf_file": str(path.resolve()), "gguf_sha256": file_sha256(path)}
    assert (
        json.loads((tmp_path / "gguf" / source.record["gguf_sha256"][:16] / GGUF_RECORD).read_text()) == source.record
    )
    converted = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    assert not hasattr(converted.config, "quantization_config")
    text = "tell me about pasta and oven . garlic butter simmer"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert AutoTokenizer.from_pretrained(source.path)(text, return_tensors="pt").input_ids.equal(ids)
    with torch.no_grad():
        assert (converted(ids).logits - model(ids).logits).abs().max() <= 1e-5


def test_conversion_is_cached_and_folder_form_resolves_to_it(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    first = resolve_model_source(str(path), cache_dir=tmp_path)
    weights = next(p for p in (tmp_path / "gguf").rglob("model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    again = resolve_model_source(str(path.parent), gguf_file=path.name, cache_dir=tmp_path)
    assert again == first and weights.stat().st_mtime_ns == stamp  # not converted twice
    assert resolve_model_source("some/hub-model").path == "some/hub-model"  # no GGUF: untouched


def test_a_conversion_killed_before_its_record_is_redone_whole(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    folder = tmp_path / "gguf" / file_sha256(path)[:16]
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half a file")  # what a killed conversion leaves
    source = resolve_model_source(str(path), cache_dir=tmp_path)
    assert AutoModelForCausalLM.from_pretrained(source.path) is not None and (folder / GGUF_RECORD).is_file()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left beside it


def test_publish_first_keeps_the_copy_already_published(tmp_path):
    from rose_trl.utils.files import publish_first

    final, ours, theirs = tmp_path / "final", tmp_path / ".ours", tmp_path / ".theirs"
    for folder, text in ((theirs, "theirs"), (ours, "ours")):
        folder.mkdir()
        (folder / "f").write_text(text)
    assert publish_first(theirs, final) and not publish_first(ours, final)
    assert (final / "f").read_text() == "theirs" and not ours.exists()


def test_missing_gguf_package_names_the_install_line(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"rose_trl\[gguf\]"):
        resolve_model_source(str(path), cache_dir=tmp_path)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        resolve_model_source(str(tmp_path / "nothing.gguf"), cache_dir=tmp_path)


def test_pipeline_loads_a_gguf_and_records_it(tiny_gguf, tmp_path, monkeypatch):
    from rose_trl.config import ROSEConfig
    from rose_trl.run.pipeline import _run_config, load_model_and_tokenizer

    path, model, _ = tiny_gguf
    monkeypatch.setenv("ROSE_TRL_CACHE", str(tmp_path))
    args = ModelConfig(model_name_or_path=str(path), dtype="float32")
    loaded, tokenizer = load_model_and_tokenizer(args)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-5
    config = _run_config(ROSEConfig(), args)
    assert config["model_name_or_path"] == str(path) and config["gguf_sha256"] == file_sha256(path)
