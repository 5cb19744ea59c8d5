"""Tiny models and batches built in-process: tests never touch the Hub."""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_lora_model(
    vocab: int = 128,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    r: int = 4,
    seed: int = 0,
    targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    dropout: float = 0.0,
):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets)))
    # LoRA B starts at zero, which would make every lora_A gradient zero: perturb so both get signal.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.eval()
    return model


def mixed_length_batch(lengths, prompt_lengths, vocab: int = 128, seed: int = 0, pad_id: int = 0):
    """Right-padded batch of rows with the given total and prompt lengths; labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths, strict=True)):
        ids = torch.randint(3, vocab, (n,), generator=g)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, p:n] = ids[p:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def row(batch, i):
    """Row i alone, unpadded."""
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i : i + 1, :n] for k, v in batch.items()}


def trained_adapter_model(base, r: int = 4):
    """`base` with a LoRA adapter far from zero, as at a warm-up checkpoint."""
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


@contextlib.contextmanager
def counting_gradient_passes():
    """Counts every gradient computation while active: torch.autograd.grad and torch.autograd.backward
    (what Tensor.backward calls), so training steps and per-example gradient passes alike."""
    counter = {"passes": 0}
    real = {name: getattr(torch.autograd, name) for name in ("grad", "backward")}

    def counted(fn):
        def wrapper(*args, **kwargs):
            counter["passes"] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in real.items():
        setattr(torch.autograd, name, counted(fn))
    try:
        yield counter
    finally:
        for name, fn in real.items():
            setattr(torch.autograd, name, fn)


class WholeRows:
    """`projector` without its slices: a `Featurizer` of it takes the whole-row path with the same matrix."""

    supports_slices = False

    def __init__(self, projector):
        self.projector, self.dim, self.implementation = projector, projector.dim, projector.implementation

    def project(self, rows):
        return self.projector.project(rows)

    def describe(self):
        return self.projector.describe()


class Unprojected:
    """No projection: a `Featurizer` of it gives the raw per-row gradients, [rows, n_params]."""

    supports_slices = False
    implementation = "none"

    def __init__(self, num_params: int):
        self.dim = num_params

    def project(self, rows):
        return rows
