"""The fused gradient path (per-layer Adam preconditioning and projection inside the backward) against
the whole-row path it replaces and against a plain batch-size-1 loop; its fallbacks; its memory."""

import logging
import types

import numpy as np
import pytest
import torch
from torch import nn

from rose_trl.gradients.capture import (
    AdamState,
    per_example_gradients,
    per_example_projected_gradients,
    trainable_parameters,
)
from rose_trl.gradients.projection import build_projector
from rose_trl.gradients.sft_loss import sft_per_example_loss
from rose_trl.stores.extraction import extract_gradients
from rose_trl.stores.store import GradientStore
from tests.helpers import mixed_length_batch, row, tiny_lora_model
from tests.test_gradients import LENGTHS, PROMPTS, assert_rows_match, loop_reference


def random_adam(n: int, seed: int = 0) -> AdamState:
    g = torch.Generator().manual_seed(seed)
    return AdamState(torch.randn(n, generator=g) * 1e-3, torch.rand(n, generator=g) * 1e-6, 0.9, 0.999, 1e-8)


def adam_direction(grads: torch.Tensor, adam: AdamState) -> torch.Tensor:
    """LESS's Adam update direction written out: (b1*m + (1-b1)*g) / sqrt(b2*v + (1-b2)*g^2 + eps)."""
    m, v, b1, b2, eps = as_tuple(adam)
    return (b1 * m + (1 - b1) * grads) / torch.sqrt(b2 * v + (1 - b2) * grads**2 + eps)


def as_tuple(adam: AdamState | None):
    return None if adam is None else (adam.exp_avg, adam.exp_avg_sq, adam.beta1, adam.beta2, adam.eps)


@pytest.mark.parametrize("kind", ["sjlt", "trak"])
@pytest.mark.parametrize("with_adam", [False, True])
def test_fused_rows_equal_whole_rows_and_the_loop(kind, with_adam):
    model = tiny_lora_model()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    adam = random_adam(n) if with_adam else None
    projector = build_projector(kind, n, 512, seed=0)
    assert projector.supports_slices
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=1)
    fused = per_example_projected_gradients(model, batch, projector, adam)
    assert_rows_match(fused, projector.project(per_example_gradients(model, batch, adam_state=adam)))
    assert_rows_match(fused, projector.project(loop_reference(model, batch, as_tuple(adam))))


class TwiceAndUnused(nn.Module):
    """`shared` runs twice in one forward, `aux` runs but its output never reaches the loss, `idle` never
    runs: the three cases a per-layer path must get right (summed calls; zero gradients under Adam)."""

    def __init__(self, vocab: int = 64, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden).requires_grad_(False)
        self.shared = nn.Linear(hidden, hidden)
        self.aux = nn.Linear(hidden, 4, bias=False)
        self.idle = nn.Linear(hidden, 4, bias=False)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=None, labels=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        self.aux(h)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = sft_per_example_loss(logits, labels).mean()
        return types.SimpleNamespace(logits=logits, loss=loss)


def test_layer_called_twice_and_layers_without_gradient():
    torch.manual_seed(0)
    model = TwiceAndUnused()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    adam = random_adam(n, seed=3)
    projector = build_projector("sjlt", n, 256, seed=0)
    batch = mixed_length_batch([7, 11, 4], [2, 3, 1], vocab=64, seed=2)
    params = [p for _, p in trainable_parameters(model)]
    loop = []
    for i in range(3):
        r = row(batch, i)
        g = torch.cat(
            [
                x.reshape(-1)
                for x in torch.autograd.grad(model(**r).loss, params, allow_unused=True, materialize_grads=True)
            ]
        )
        loop.append(g)
    loop = torch.stack(loop)
    for a in (None, adam):
        reference = loop if a is None else adam_direction(loop, a)
        fused = per_example_projected_gradients(model, batch, projector, a)
        assert_rows_match(fused, projector.project(reference))
        assert_rows_match(fused, projector.project(per_example_gradients(model, batch, adam_state=a)))


def tiny_pool(n_rows: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pool = []
    for i in range(n_rows):
        n = 5 + (7 * i) % 13
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        pool.append({"input_ids": ids, "completion_mask": [0] * 2 + [1] * (n - 2)})
    return pool


def store_for(path, projector, n_rows):
    return GradientStore.open_or_create(
        path,
        model="m",
        checkpoint="c",
        projection=projector.describe(),
        gradient_type="adam",
        pool_fingerprint="p",
        num_rows=n_rows,
        dtype="float32",
    )


def test_projector_without_slices_falls_back_and_a_resume_mixes_both_paths(tmp_path, caplog):
    # trak's BasicProjector without its cached matrix takes whole rows only: extraction takes the whole-row
    # path and says why. Both paths write the same rows, so a store begun by one is finished by the other.
    model = tiny_lora_model()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    adam = random_adam(n)
    pool = tiny_pool()
    whole_rows = build_projector("trak", n, 256, seed=0, cache_bytes=0)
    sliced = build_projector("trak", n, 256, seed=0)
    assert not whole_rows.supports_slices and sliced.supports_slices
    assert whole_rows.describe() == sliced.describe()  # the same matrix: stores are shared

    with caplog.at_level(logging.WARNING, logger="rose_trl.gradients.featurizer"):
        extract_gradients(
            model,
            pool,
            reference := store_for(tmp_path / "ref", whole_rows, len(pool)),
            whole_rows,
            0,
            adam_state=adam,
            batch_size=4,
            progress=False,
        )
    assert "fused gradient path off" in caplog.text and "cannot project a slice" in caplog.text

    mixed = store_for(tmp_path / "mixed", sliced, len(pool))
    extract_gradients(
        model, pool, mixed, whole_rows, 0, adam_state=adam, batch_size=4, missing=np.arange(4), progress=False
    )
    assert int(mixed.done_mask().sum()) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rose_trl.gradients.featurizer"):
        assert extract_gradients(model, pool, mixed, sliced, 0, adam_state=adam, batch_size=4, progress=False) == 6
    assert "fused gradient path off" not in caplog.text
    assert_rows_match(torch.from_numpy(mixed.read_all()), torch.from_numpy(reference.read_all()))


def test_fused_path_memory_per_row_does_not_grow_with_depth():
    # Real allocations (torch's profiler), tiny shape: the fused path's extra memory per row over a plain
    # forward+backward is the same at 1 and 4 layers; the whole-row path's grows with the depth.
    from extraction_memory import run

    slopes = run("tiny", [1, 4], [1, 8], seq_len=32, lora_r=16, dim=1024, paths=["fused", "dense"], log=lambda s: None)
    # The whole-row buffer lives through the forward and backward: 3 more layers x 8 LoRA matrices x
    # 128 x 16 parameters x 4 bytes = 0.197 MB more per row at the peak.
    assert slopes[("dense", 4)] - slopes[("dense", 1)] > 0.15, slopes
    assert abs(slopes[("fused", 4)] - slopes[("fused", 1)]) < 0.02, slopes


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_validation_pair_gradients_fused_equal_whole_rows(loss_type, planted, tiny_base, tmp_path):
    # ROSE's validation rows (TRL's DPO loss per pair) take the fused path too; hinge keeps its exact zeros.
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.stores.validation import ROSEDPOTrainer, sft_validation_gradients, validation_dpo_config
    from tests.helpers import WholeRows, trained_adapter_model

    _, validation, tokenizer, _ = planted
    model = trained_adapter_model(tiny_base)
    trainer = ROSEDPOTrainer(
        model,
        validation_dpo_config(
            str(tmp_path), beta=20.0 if loss_type == "hinge" else 0.1, batch_size=3, use_cpu=True, loss_type=loss_type
        ),
        validation,
        tokenizer,
    )
    model.eval()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    projector = build_projector("sjlt", n, 512, seed=0)
    fused_path, whole_path = Featurizer(projector), Featurizer(WholeRows(projector))
    assert fused_path.fused and not whole_path.fused
    whole = trainer.pair_gradients(whole_path)
    fused = trainer.pair_gradients(fused_path)
    zero = whole.norm(dim=1) == 0
    assert torch.equal(fused.norm(dim=1) == 0, zero)
    assert_rows_match(fused[~zero], whole[~zero])
    if loss_type == "sigmoid":
        assert_rows_match(
            sft_validation_gradients(model, validation, tokenizer, fused_path),
            sft_validation_gradients(model, validation, tokenizer, whole_path),
        )


@pytest.mark.parametrize("whole_rows", [False, True])
def test_the_path_is_decided_and_logged_once_per_run(tmp_path, caplog, whole_rows):
    """Two checkpoints, each with pool and DPO validation gradients: one featurizer, one message saying which
    path and why (a whole-row run's warning included, which used to come once per checkpoint, never for the
    validation gradients)."""
    from datasets import Dataset

    from rose_trl.models.tiny import _texts, build_tokenizer, make_planted_task
    from tests.reference_selector import select, whole_row_projectors

    pool, validation = make_planted_task(n_pool=30, pairs_per_subtask=2, seed=0)
    tokenizer = build_tokenizer(_texts(pool, validation))
    restore = whole_row_projectors() if whole_rows else (lambda: None)
    try:
        with caplog.at_level(logging.INFO, logger="rose_trl.gradients.featurizer"):
            select(
                Dataset.from_list(pool),
                Dataset.from_list(validation),
                tokenizer,
                tmp_path,
                "selection",
                projection_type="trak" if whole_rows else "sjlt",
            )
    finally:
        restore()
    said = [r.getMessage() for r in caplog.records if r.name == "rose_trl.gradients.featurizer"]
    assert len(said) == 1, said
    expected = (
        "per-layer fused gradient path off: the projector (trak BasicProjector) cannot project a slice"
        if whole_rows
        else "per-layer fused gradient path: the projector (sparse JL"
    )
    assert expected in said[0], said
    assert len(list((tmp_path / "rose" / "val_dpo").iterdir())) == 2
