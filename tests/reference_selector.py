"""The selector on an in-memory tiny model, in seconds: the default suite's reference run
(tests/test_references.py; stored outputs in tests/references/inline/, made by make_references.py).

Two checkpoints of fixed LoRA weights and Adam moments, through the public API only (ROSESelector,
add_checkpoint, finalize): rose and less on the fused path, and rose on the whole-row path (trak without
its cached matrix) with sgd features, round_robin balance, eq6 targets and an int8 store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import rose_trl.gradients.projection as projection
from rose_trl import ROSEConfig, ROSESelector
from rose_trl.gradients.capture import AdamState, trainable_parameters
from rose_trl.models.tiny import _texts, build_tiny_llama, build_tokenizer, make_planted_task


def checkpoint_weights(model, seed: int) -> AdamState:
    """Sets the adapter to seed's weights; returns seed's Adam moments."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    n = sum(p.numel() for _, p in trainable_parameters(model))
    return AdamState(torch.randn(n, generator=g) * 1e-3, torch.rand(n, generator=g) * 1e-5, 0.9, 0.999, 1e-8)


def whole_row_projectors():
    """build_projector, wherever rose_trl imported it, building trak without its cached matrix."""
    original = projection.build_projector

    def build(kind, input_dim, dim=8192, seed=0, device="cpu", **kwargs):
        return original(kind, input_dim, dim, seed, device=device, **{"cache_bytes": 0, **kwargs})

    patched = [
        m
        for name, m in sys.modules.items()
        if name.startswith("rose_trl") and getattr(m, "build_projector", None) is original
    ]
    for m in patched:
        m.build_projector = build
    return lambda: [setattr(m, "build_projector", original) for m in patched]


def select(pool, validation, tokenizer, out: Path, folder: str, **options) -> Path:
    model = get_peft_model(
        build_tiny_llama(tokenizer, hidden=32, layers=2, seed=0),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    config = ROSEConfig(projection_dim=256, selection_fraction=0.1, **options)
    selector = ROSESelector(pool, validation, tokenizer, config, out, max_length=64, use_cpu=True, progress=False)
    for step, lr in ((3, 1e-3), (6, 4e-4)):
        adam = checkpoint_weights(model, step)
        selector.add_checkpoint(model, f"checkpoint-{step}", lr, adam if config.gradient_type == "adam" else None)
    return selector.finalize(folder)


def run_inline(workdir: Path) -> dict[str, Path]:
    pool, validation = make_planted_task(n_pool=60, pairs_per_subtask=3, seed=0)
    tokenizer = build_tokenizer(_texts(pool, validation))
    pool, validation = Dataset.from_list(pool), Dataset.from_list(validation)
    found = {
        "selection": select(pool, validation, tokenizer, workdir / "fused", "selection"),
        "selection_less": select(
            pool, validation, tokenizer, workdir / "fused", "selection_less", selection_method="less"
        ),
    }
    restore = whole_row_projectors()
    try:
        found["whole_row"] = select(
            pool,
            validation,
            tokenizer,
            workdir / "whole",
            "selection",
            projection_type="trak",
            gradient_type="sgd",
            subtask_balance="round_robin",
            validation_aggregation="eq6",
            store_dtype="int8",
        )
    finally:
        restore()
    return found
