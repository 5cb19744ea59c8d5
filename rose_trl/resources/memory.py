"""The memory of a pass, estimated from first principles: the model's shape, the LoRA settings, the dtype, the
rows and tokens of the pass and its loss path. No torch work: a model, its config, or the numbers themselves.

    estimate_pass("training", ModelShape.from_config(config), LoraShape(r=8, targets=("q_proj", "v_proj")),
                  dtype="bfloat16", rows=4, width=1024)          # -> Estimate (bytes, by part)
    estimate_peak_bytes(config, lora_r=8, lora_target_modules=["q_proj", "v_proj"], dtype="bfloat16", rows=4,
                        tokens=1024, kind="training")            # -> int: resident + the pass's peak

Kinds of pass (what runs, and what it holds at its peak):
- "gradient": a pool gradient pass (`extraction`), eval mode, each row's SFT loss, the per-row gradient capture;
  its loss "plain" ([rows, positions, vocab] logits) or "chunked" (`sft_loss.LOSS_CHUNK_ELEMENTS` logits at most);
- "validation": a validation pass: TRL's DPO loss over the pairs' chosen and rejected rows (2 sequences a pair),
  its logits through TRL's fused LM head (`FUSED_HEAD_TILE` tiles), the reference's log-probs precomputed;
- "reference": the reference's log-probs of the validation pairs (no gradient, TRL's fused head);
- "evaluation": held-out log-probs (`evaluation.metrics.sequence_logps`): no gradient, logits at the response
  positions;
- "training": a Trainer step of TRL's SFT loss (train mode: LoRA dropout; TRL's fused LM head over every
  position; the LoRA gradients and AdamW's moments).

The activations are counted as the tensors autograd saves for the backward, op by op, for a Llama-type decoder
layer (RMSNorm, rotary attention through `sdpa`, gated MLP) whose base weights are frozen (so its plain linears
save nothing: a frozen weight needs no input to get its gradient). Per token and layer (`layer_bytes`):
- each RMSNorm saves its input in float32 (it computes in float32) and one float32 rsqrt: 2 per layer for Llama;
- attention (sdpa, flash or memory-efficient kernel) saves q, k, v, its output and a float32 log-sum-exp per
  head; k and v at their key-value heads without a mask (grouped-query kernel), at every head when a padding mask
  is passed (transformers then repeats them), and the mask itself, [rows, 1, T, T] in the model's dtype, once;
- the gated MLP saves the gate's output (the activation's input), the activation's output and the up projection's
  output: 3 x intermediate;
- each LoRA module saves its input for lora_A (in float32, peft's adapter dtype; shared by modules reading the
  same tensor when no cast or dropout makes it their own) and lora_A's output (r) for lora_B; in train mode with
  dropout, each module's dropout output and its mask (float32 on a CPU; CUDA's is 1 byte a value: counted as 4).
These counts were read from autograd's saved-tensor hooks (benchmarks/memory/extraction_memory.py --saved) and are
checked against measured peaks at three shapes (docs/results/memory.md, "Estimates against measurements").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


# Bytes of a value of each dtype a model is loaded in.
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "auto": 4, None: 4}
# TRL's fused LM head (trl.kernels.chunked_logprob) scores [min(tokens, 4096), min(vocab, 32768)] tiles.
FUSED_HEAD_TOKENS, FUSED_HEAD_VOCAB = 4096, 32768
# Float32 [tokens, vocab-tile] tensors TRL's fused head holds at once on devices without Triton (CPU), beside its
# matmul buffer (trl.kernels.chunked_logprob's torch fold): forward, the tempered logits, the shifted logits and
# their exponentials (3, and a bool comparison for is_top1: a quarter); backward, the scaled and the tempered
# logits, the log-probabilities, the probabilities and the gradient, then two temporaries of one expression
# (the one-hot comparison as float minus the probabilities, and that times the incoming gradient): 7, and the
# bool comparison, a quarter.
FUSED_HEAD_FORWARD_TILES, FUSED_HEAD_BACKWARD_TILES = 3.25, 7.25
# Float32 bytes one row costs in a gradient pass's per-row gradient path, beyond the activations:
# - fused (per layer) path: 16 per parameter of the largest LoRA matrix (its per-row block, the Adam
#   denominator, the projection's signed copy, slack), plus the [dim] accumulator;
# - whole-row path: 16 per LoRA parameter (the captured row, the Adam denominator, the preconditioned row, the
#   projection's input).
FUSED_BYTES_PER_LAYER_PARAM = 16
DENSE_BYTES_PER_PARAM = 16
# Bytes per LoRA parameter of the sjlt projection's plan (int32 bucket + int8 sign, 4 nonzeros).
SJLT_PLAN_BYTES_PER_PARAM = 20

# LoRA targets of a Llama-type layer: (input width, output width) in terms of the shape.
_TARGETS = {
    "q_proj": ("hidden", "attention"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "o_proj": ("attention", "hidden"),
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}
# Modules reading the same tensor (a LoRA input shared when nothing makes it their own), and the tensor.
_INPUTS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_act",
}


def dtype_bytes(dtype) -> int:
    """Bytes of one value of `dtype` (a torch dtype, or its name: "bfloat16", "float32", ...)."""
    if dtype is not None and not isinstance(dtype, str):
        return dtype.itemsize  # a torch.dtype
    return DTYPE_BYTES[dtype.replace("torch.", "") if isinstance(dtype, str) else dtype]


@dataclass(frozen=True)
class ModelShape:
    """What a decoder's memory depends on. `parameters`: the base model's (embeddings and head included)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    parameters: int
    norms_per_layer: int = 2
    model_type: str = "llama"

    @property
    def attention(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def width(self, name: str) -> int:
        return {"hidden": self.hidden, "attention": self.attention, "kv": self.kv, "intermediate": self.intermediate}[
            name
        ]

    @classmethod
    def from_config(cls, config, parameters: int | None = None) -> ModelShape:
        """From a transformers config (a causal LM's, or a multimodal one's text config)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        h, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        i, layers, vocab = config.intermediate_size, config.num_hidden_layers, config.vocab_size
        model_type = getattr(config, "model_type", "llama")
        # Gemma-3: RMSNorms before and after attention and MLP (4 a layer) and on q and k (per head).
        norms = 4 if model_type.startswith("gemma") else 2
        if parameters is None:
            per_layer = h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim + 3 * h * i + norms * h
            tied = getattr(config, "tie_word_embeddings", True)
            parameters = layers * per_layer + vocab * h * (1 if tied else 2) + h
        return cls(
            hidden=h,
            intermediate=i,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            parameters=int(parameters),
            norms_per_layer=norms,
            model_type=model_type,
        )

    @classmethod
    def from_model(cls, model) -> ModelShape:
        """From a live model (a PEFT model's base): its config, and its own count of base parameters."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        count = sum(_numel(p) for name, p in base.named_parameters() if "lora_" not in name)
        return cls.from_config(base.config, parameters=count)


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", 0)) or p.numel()


@dataclass(frozen=True)
class LoraShape:
    """LoRA adapter settings: rank, target module names (Llama's: q_proj ... down_proj, or "all-linear"),
    dropout, and the adapter's dtype bytes (float32: peft keeps adapters in float32 for half-precision models)."""

    r: int
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    dtype_bytes: int = 4

    def __post_init__(self):
        targets = tuple(_TARGETS) if self.targets in ("all-linear", ("all-linear",)) else tuple(self.targets)
        unknown = [t for t in targets if t not in _TARGETS]
        if unknown:
            raise ValueError(f"LoRA targets {unknown}: the estimate knows Llama-type layers' {sorted(_TARGETS)}")
        object.__setattr__(self, "targets", targets)

    def modules(self, shape: ModelShape) -> list[tuple[str, int, int]]:
        """(name, input width, output width) of each targeted module of one layer."""
        return [(t, shape.width(_TARGETS[t][0]), shape.width(_TARGETS[t][1])) for t in self.targets]

    def parameters(self, shape: ModelShape) -> int:
        return shape.layers * sum(self.r * (i + o) for _, i, o in self.modules(shape))

    def largest_matrix(self, shape: ModelShape) -> int:
        return max(self.r * max(i, o) for _, i, o in self.modules(shape))

    @classmethod
    def from_model(cls, model) -> LoraShape:
        """From a PEFT model: its active adapter's rank and dropout, and the modules that carry it."""
        config = model.peft_config[model.active_adapter]
        targets = sorted(
            {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
        )
        return cls(r=config.r, targets=tuple(targets), dropout=float(config.lora_dropout or 0.0))

    @classmethod
    def from_model_args(cls, model_args) -> LoraShape:
        """From TRL's ModelConfig (lora_r, lora_target_modules, lora_dropout)."""
        targets = model_args.lora_target_modules or ("q_proj", "v_proj")  # peft's default for Llama
        targets = ("all-linear",) if targets in ("all-linear", ["all-linear"]) else tuple(targets)
        return cls(r=model_args.lora_r, targets=targets, dropout=float(model_args.lora_dropout or 0.0))


@dataclass
class Estimate:
    """Bytes of a pass by part: `resident` parts live through the run (weights, adapter, optimizer state), the
    others only during the pass. `peak` = resident + transient; `transient`: what the pass adds."""

    kind: str
    rows: int
    width: int
    parts: dict[str, int] = field(default_factory=dict)
    resident: tuple[str, ...] = ()

    @property
    def transient(self) -> int:
        return sum(v for k, v in self.parts.items() if k not in self.resident)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in self.parts.items() if v)


def layer_bytes(shape: ModelShape, lora: LoraShape, dtype: int, masked: bool = False, training: bool = False) -> int:
    """Bytes one token keeps for the backward in one decoder layer (the counts in the module docstring)."""
    norms = shape.norms_per_layer * (4 * shape.hidden + 4)
    kv = shape.attention if masked else shape.kv
    attention = dtype * (2 * shape.attention + 2 * kv) + 4 * shape.heads
    mlp = 3 * shape.intermediate * dtype
    own_copy = training and lora.dropout > 0 or lora.dtype_bytes != dtype
    inputs = {}
    for name, width, _ in lora.modules(shape):
        if own_copy:  # a cast or dropout output of its own, and a dropout's mask (float on a CPU; bool on CUDA)
            inputs[name] = width * lora.dtype_bytes * (2 if training and lora.dropout > 0 else 1)
        elif _INPUTS[name] != "attn_out":  # attention's output is saved by sdpa already
            inputs[_INPUTS[name]] = width * dtype
    adapter = len(lora.targets) * lora.r * lora.dtype_bytes
    return norms + attention + mlp + sum(inputs.values()) + adapter


def activation_bytes(
    shape: ModelShape, lora: LoraShape, dtype: int, rows: int, width: int, masked: bool = False, training: bool = False
) -> int:
    """Saved activations of a forward over rows x width tokens: every layer, the final norm, the mask."""
    tokens = rows * width
    mask = rows * width * width * dtype if masked else 0
    return tokens * (shape.layers * layer_bytes(shape, lora, dtype, masked, training) + 4 * shape.hidden + 4) + mask


def backward_bytes(shape: ModelShape, dtype: int, tokens: int) -> int:
    """What the backward holds beyond the saved activations while it crosses the gated MLP of the last layer: the
    gradients of its output, of the product, of the activation and of the up projection."""
    return tokens * dtype * (shape.hidden + 3 * shape.intermediate)


def forward_bytes(shape: ModelShape, dtype: int, tokens: int) -> int:
    """A forward without gradient holds one layer at a time: at most the gated MLP's gate, activation, up and
    product outputs beside the residual stream and the normalized input."""
    return tokens * dtype * (4 * shape.intermediate + 3 * shape.hidden)


def sft_loss_bytes(
    shape: ModelShape, dtype: int, rows: int, positions: int, labelled: int, chunked: bool, chunk_elements: int
) -> int:
    """The per-row SFT loss of a gradient pass (sft_loss.pass_loss): plain, the logits of the scored positions
    (the model's dtype, and a float32 copy when it is not float32), cross entropy's log-softmax and, in the
    backward, its gradient; chunked, the labelled tokens' hidden states and their saved gradient, and two
    float32 [chunk, vocab] tensors (the chunk's logits and log-softmax)."""
    if chunked:
        chunk = max(1, chunk_elements // shape.vocab) * shape.vocab
        return 2 * labelled * shape.hidden * dtype + 2 * 4 * min(chunk, labelled * shape.vocab)
    logits = rows * positions * shape.vocab
    return logits * (dtype + (4 if dtype != 4 else 0) + 4 + 4)


def fused_head_bytes(
    shape: ModelShape, dtype: int, tokens: int, backward: bool, token_tile: int = FUSED_HEAD_TOKENS
) -> int:
    """TRL's fused LM head over `tokens` scored positions, `token_tile` of them a tile: a copy of their hidden
    states, its tile-sized temporaries, and in the backward the float32 gradient of the hidden states."""
    rows = min(tokens, token_tile)
    buffer = rows * FUSED_HEAD_VOCAB * dtype  # the matmul buffer is allocated 32768 wide, whatever the vocabulary
    tile = rows * min(shape.vocab, FUSED_HEAD_VOCAB) * 4  # each float32 temporary is a tile of the vocabulary
    hidden = tokens * shape.hidden * dtype
    if backward:
        return int(hidden + tokens * shape.hidden * 4 + buffer + FUSED_HEAD_BACKWARD_TILES * tile)
    return int(hidden + buffer + FUSED_HEAD_FORWARD_TILES * tile)


def gradient_bytes_per_row(num_params: int, largest_layer: int, dim: int, fused: bool) -> int:
    """The per-row gradient path of a gradient pass, beyond the activations (see FUSED_BYTES_PER_LAYER_PARAM)."""
    if fused:
        return FUSED_BYTES_PER_LAYER_PARAM * largest_layer + 4 * dim
    return DENSE_BYTES_PER_PARAM * num_params + 4 * dim


def estimate_pass(
    kind: str,
    shape: ModelShape,
    lora: LoraShape,
    dtype,
    rows: int,
    width: int,
    *,
    labelled_fraction: float = 1.0,
    loss: str = "auto",
    chunk_elements: int | None = None,
    dim: int = 8192,
    fused: bool = True,
    gradient_checkpointing: bool = False,
    scored_positions: str = "all",
    head_tokens: int = FUSED_HEAD_TOKENS,
) -> Estimate:
    """Bytes of one pass of `kind` over `rows` rows padded to `width` tokens (a validation pass: `rows` pairs,
    each a chosen and a rejected row). `labelled_fraction`: the share of positions with a label (the response).
    `loss` (gradient passes): "plain", "chunked" or "auto" (chunked above `chunk_elements` logits, as
    sft_loss.pass_loss decides for models it can chunk). `scored_positions` (TRL's fused head): "all" on
    devices without Triton (CPU) as TRL scores them, "labelled" with Triton (CUDA) and in the validation passes
    (stores.validation.labelled_positions_only); `head_tokens`: its tile's positions."""
    from rose_trl.gradients.sft_loss import LOSS_CHUNK_ELEMENTS, PLAIN_HEAD_MODEL_TYPES

    b = dtype_bytes(dtype)
    adapter = lora.parameters(shape)
    est = Estimate(kind, rows, width, resident=("weights", "adapter", "optimizer"))
    est.parts["weights"] = shape.parameters * b
    est.parts["adapter"] = adapter * lora.dtype_bytes
    labelled = max(1, math.ceil(rows * (width - 1) * labelled_fraction))
    if kind == "gradient":
        chunk_elements = LOSS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        positions = width if labelled_fraction >= 1 else max(1, math.ceil((width - 1) * labelled_fraction))
        if loss == "auto":
            loss = (
                "chunked"
                if (shape.model_type in PLAIN_HEAD_MODEL_TYPES and rows * positions * shape.vocab > chunk_elements)
                else "plain"
            )
        est.parts["optimizer"] = adapter * 8 + adapter * SJLT_PLAN_BYTES_PER_PARAM  # Adam m, v; projection plan
        est.parts["activations"] = activation_bytes(shape, lora, b, rows, width)
        # The loss's peak comes before the backward's, whose per-row gradient blocks come and go layer by layer.
        path = rows * gradient_bytes_per_row(adapter, lora.largest_matrix(shape), dim, fused)
        est.parts["loss or backward"] = max(
            sft_loss_bytes(shape, b, rows, positions, labelled, loss == "chunked", chunk_elements),
            backward_bytes(shape, b, rows * width) + path,
        )
    elif kind in ("validation", "reference"):
        sequences = 2 * rows
        scored = sequences * (width - 1) if scored_positions == "all" else 2 * labelled
        if kind == "validation":
            est.parts["optimizer"] = adapter * 8 + adapter * SJLT_PLAN_BYTES_PER_PARAM
            est.parts["activations"] = activation_bytes(shape, lora, b, sequences, width, masked=True)
            path = sequences * gradient_bytes_per_row(adapter, lora.largest_matrix(shape), dim, fused)
            est.parts["loss or backward"] = max(
                fused_head_bytes(shape, b, scored, True, head_tokens),
                backward_bytes(shape, b, sequences * width) + path,
            )
        else:  # no gradient: one layer's working set at a time, then the final hidden states and the head
            hidden = sequences * width * shape.hidden * b
            est.parts["activations"] = hidden + sequences * width * width * b  # and the padding mask
            est.parts["loss"] = max(
                fused_head_bytes(shape, b, scored, False, head_tokens),
                forward_bytes(shape, b, sequences * width) - hidden,
            )
    elif kind == "evaluation":  # no gradient: the layers' working set, then the final hidden states and the loss
        positions = max(1, math.ceil((width - 1) * labelled_fraction))
        est.parts["activations"] = rows * width * shape.hidden * b
        # logits at the scored positions, their float32 copy (when not float32), and cross entropy over their
        # transposed view: a contiguous copy and the log-softmax
        logits = rows * positions * shape.vocab * (b + (4 if b != 4 else 0) + 4 + 4)
        est.parts["loss"] = max(logits, forward_bytes(shape, b, rows * width) - est.parts["activations"])
    elif kind == "training":
        scored = rows * (width - 1) if scored_positions == "all" else labelled
        est.parts["optimizer"] = adapter * 8  # AdamW's m and v (float32)
        if gradient_checkpointing:  # each layer's input, and one layer recomputed at a time
            one = activation_bytes(shape, lora, b, rows, width, masked=True, training=True) // max(shape.layers, 1)
            est.parts["activations"] = rows * width * shape.layers * shape.hidden * b + one
        else:
            est.parts["activations"] = activation_bytes(shape, lora, b, rows, width, masked=True, training=True)
        # The adapter's .grad comes layer by layer through the backward, as the activations go.
        est.parts["loss or backward"] = max(
            fused_head_bytes(shape, b, scored, True, head_tokens),
            backward_bytes(shape, b, rows * width) + adapter * lora.dtype_bytes,
        )
    else:
        raise ValueError(f"unknown pass kind {kind!r}: gradient, validation, reference, evaluation or training")
    return est


def estimate_peak_bytes(
    model_or_config,
    *,
    lora_r: int,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_dropout: float = 0.0,
    dtype="float32",
    rows: int = 1,
    tokens: int = 1024,
    kind: str = "training",
    loss: str = "auto",
    **options,
) -> int:
    """Estimated peak bytes of one pass (resident weights, adapter and optimizer state included; the interpreter's
    own memory and other processes' not) for any model: a live model, its transformers config, or a ModelShape.
    `tokens`: the padded length of the pass's rows. `options`: estimate_pass's (labelled_fraction, dim, ...)."""
    if isinstance(model_or_config, ModelShape):
        shape = model_or_config
    elif hasattr(model_or_config, "parameters") and callable(model_or_config.parameters):
        shape = ModelShape.from_model(model_or_config)
    else:
        shape = ModelShape.from_config(model_or_config)
    lora = LoraShape(
        r=lora_r,
        targets=tuple(lora_target_modules) if not isinstance(lora_target_modules, str) else (lora_target_modules,),
        dropout=lora_dropout,
    )
    return estimate_pass(kind, shape, lora, dtype, rows, tokens, loss=loss, **options).peak


def largest_rows(estimate, available: int, limit: int) -> int:
    """The most rows r <= `limit` whose `estimate(r)` (bytes a pass adds) fits `available`; 0 when not even one
    does. `estimate` grows with r."""
    if estimate(1) > available:
        return 0
    low, high = 1, max(1, limit)
    while low < high:
        mid = (low + high + 1) // 2
        if estimate(mid) <= available:
            low = mid
        else:
            high = mid - 1
    return low
