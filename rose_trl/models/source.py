"""Where a run's model comes from: a Hub id or folder as usual, or a GGUF file converted once to a folder.

transformers reads GGUF files (dequantizing them, which takes about a minute for a 135M model on 2
cores), but the model it returns keeps its `quantization_config` and refuses `save_pretrained`, and
every stage of a run (warm-up, offline selection, final training, evaluation) would dequantize again.
So a GGUF file is converted once into a plain safetensors folder, cached under the file's content
hash: `<cache>/gguf/<sha256[:16]>/` holds the model, its tokenizer and `rose_gguf.json` (the source
file and its hash), and every stage loads that folder.

    source = resolve_model_source("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
    source.path    # the converted folder, for from_pretrained
    source.record  # {"gguf_file": ..., "gguf_sha256": ...}, for the run's records
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rose_trl.utils.errors import InputNotFoundError, MissingPackageError
from rose_trl.utils.files import atomic_dir, atomic_write_json, publish_first, remove_tree


GGUF_INSTALL = 'pip install "rose_trl[gguf]"  (in a checkout: pip install -e ".[gguf]")'
GGUF_RECORD = "rose_gguf.json"


@dataclass(frozen=True)
class ModelSource:
    """`path` is what from_pretrained loads; `record` says where it came from when it is a conversion."""

    path: str
    record: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROSE_TRL_CACHE", Path.home() / ".cache" / "rose_trl"))


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _locate_gguf(name_or_path: str, gguf_file: str | None, revision: str | None) -> Path | None:
    """The local GGUF file named by `model_name_or_path` (a .gguf path) or by a folder/Hub id plus
    `gguf_file`; None when neither names one."""
    if gguf_file is None:
        return Path(name_or_path) if str(name_or_path).endswith(".gguf") else None
    if Path(name_or_path).is_dir():
        return Path(name_or_path) / gguf_file
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))


def resolve_model_source(
    name_or_path: str, gguf_file: str | None = None, revision: str | None = None, cache_dir: str | Path | None = None
) -> ModelSource:
    """The folder to load for `name_or_path`: itself, or the cached conversion of the GGUF file it names."""
    path = _locate_gguf(str(name_or_path), gguf_file, revision)
    if path is None:
        return ModelSource(str(name_or_path))
    if not path.is_file():
        raise InputNotFoundError(f"GGUF file {path} does not exist")
    digest = file_sha256(path)
    folder = Path(cache_dir or default_cache_dir()) / "gguf" / digest[:16]
    record = {"gguf_file": str(path.resolve()), "gguf_sha256": digest}
    if not (folder / GGUF_RECORD).is_file():  # the record is written last: its presence means a whole folder
        convert_gguf(path, folder, record)
    return ModelSource(str(folder), record)


def convert_gguf(path: Path, folder: Path, record: dict) -> Path:
    """Dequantize `path` with transformers and save it as a plain model folder (tokenizer included)."""
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise MissingPackageError(f"reading the GGUF file {path} needs the `gguf` package: {GGUF_INSTALL}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The loaded model carries the GGUF quantization_config and refuses save_pretrained: rebuild it from a
    # config without it, with the dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir(folder)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / GGUF_RECORD, record)
    if (folder / GGUF_RECORD).is_file():
        shutil.rmtree(tmp)  # another process published the same conversion meanwhile
        return folder
    remove_tree(folder)  # a conversion killed before its record: redo it whole
    publish_first(tmp, folder)
    return folder


# ---- loading what a run's ModelConfig names -----------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _model_source(name_or_path: str, gguf_file: str | None, revision: str | None) -> ModelSource:
    from accelerate import PartialState

    # The main process converts a GGUF file (once: it is cached under its hash); the others read its folder.
    with PartialState().main_process_first():
        return resolve_model_source(name_or_path, gguf_file, revision)


def model_source(model_args, gguf_file: str | None = None) -> ModelSource:
    """What from_pretrained loads for `model_args` (a TRL ModelConfig): the model itself, or the converted GGUF
    folder."""
    return _model_source(model_args.model_name_or_path, gguf_file, model_args.model_revision)


def load_tokenizer(model_args, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The tokenizer of `model_args`' model, padding with its eos token when it has no pad token."""
    from transformers import AutoTokenizer

    source = model_source(model_args, gguf_file)
    revision = None if source.record else model_args.model_revision
    tokenizer = AutoTokenizer.from_pretrained(source.path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model_args.model_name_or_path} has no pad and no eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_args, trust_remote_code: bool = False, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    source = model_source(model_args, gguf_file)
    revision = None if source.record else model_args.model_revision
    tokenizer = load_tokenizer(model_args, trust_remote_code, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        source.path,
        revision=revision,
        dtype=model_args.dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation=model_args.attn_implementation,
    )
    return model, tokenizer
