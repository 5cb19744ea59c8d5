"""ROSE options: one dataclass, parsed by TrlParser next to SFTConfig and ModelConfig in the recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .projection import PROJECTION_TYPES

SELECTION_METHODS = ("rose", "less")


@dataclass
class ROSEConfig:
    """Data selection options. The warm-up's own training options (epochs = checkpoints, learning
    rate, batch size, LoRA) come from `SFTConfig` and `ModelConfig`."""

    pool_dataset: str | None = field(
        default=None, metadata={"help": "Training pool: Hub dataset id or local .jsonl/.json/.parquet file. Rows are "
                                        "`messages` (chat) or `prompt`/`completion`."})
    validation_dataset: str | None = field(
        default=None, metadata={"help": "Few-shot preference set: Hub id or local file with prompt/chosen/rejected and "
                                        "an optional `subtask` column."})
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    pool_sources: list[str] | None = field(
        default=None, metadata={"help": "Keep only pool rows whose `source` (or Tulu's `dataset`) field is one of "
                                        "these, e.g. [flan_v2, cot, dolly, oasst1] for the paper's Tulu-v2 pool."})
    validation_split: str = field(default="train", metadata={"help": "Split of a Hub validation dataset."})
    selection_method: str = field(
        default="rose", metadata={"help": "rose (DPO validation gradients) or less (SFT-loss validation gradients).",
                                  "choices": list(SELECTION_METHODS)})
    selection_fraction: float = field(default=0.05, metadata={"help": "Fraction of the pool to select, in (0, 1]."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Random fraction of the pool for the warm-up run."})
    projection_type: str = field(
        default="auto", metadata={"help": "sjlt (fast sparse JL, CPU default), trak (TRAK Rademacher, LESS-compatible; "
                                          "CudaProjector with fast_jl on GPU) or auto.",
                                  "choices": list(PROJECTION_TYPES) + ["auto"]})
    projection_dim: int = field(default=8192, metadata={"help": "Dimension of the projected gradients."})
    projection_seed: int = field(default=0, metadata={"help": "Seed of the projection matrix."})
    gradient_type: str = field(default="adam", metadata={"help": "Training-gradient features: adam (LESS "
                                                                  "preconditioning) or sgd.", "choices": ["adam", "sgd"]})
    gradient_batch_size: int = field(default=16, metadata={"help": "Pool examples per batched gradient pass."})
    max_batch_tokens: int | None = field(
        default=None, metadata={"help": "Memory budget of a gradient pass in padded tokens (rows x length); "
                                        "batches are split to stay under it."})
    store_dtype: str = field(default="float16", metadata={"help": "Gradient store dtype: float16, float32 or int8 "
                                                                  "(per-row scale; half of float16 on disk).",
                                                          "choices": ["float16", "float32", "int8"]})
    overwrite_stores: bool = field(
        default=False, metadata={"help": "When output_dir holds gradient stores (or a run) made for other inputs "
                                         "(model, checkpoint, pool, validation set, projection...), delete and "
                                         "recompute them instead of refusing."})
    validation_beta: float = field(default=0.1, metadata={"help": "DPO beta of the validation loss."})
    validation_batch_size: int = field(default=4, metadata={"help": "Preference pairs per validation gradient pass."})
    validation_aggregation: str = field(
        default="normalized_mean", metadata={"help": "normalized_mean (normalize each pair's gradient, then average: "
                                                     "the released code) or eq6 (average, then normalize: the paper's "
                                                     "Eq. 6 literally).", "choices": ["normalized_mean", "eq6"]})
    final_training: bool = field(default=True, metadata={"help": "Train the final model on the selection."})
    pool_max_examples: int | None = field(default=None, metadata={"help": "Use only the first N pool rows (smoke tests)."})

    def __post_init__(self):
        for name in ("selection_fraction", "warmup_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.selection_method not in SELECTION_METHODS:
            raise ValueError(f"selection_method must be one of {SELECTION_METHODS}, got {self.selection_method!r}")
        if self.projection_type not in PROJECTION_TYPES + ("auto",):
            raise ValueError(f"projection_type must be one of {PROJECTION_TYPES + ('auto',)}, got {self.projection_type!r}")
        if self.projection_dim < 1 or self.gradient_batch_size < 1 or self.validation_batch_size < 1:
            raise ValueError("projection_dim, gradient_batch_size and validation_batch_size must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
