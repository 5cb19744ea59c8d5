"""The final model: what a run trains on its selection, and the checks that make a run fail at its start, not
after hours of selection.

By default the final model is the warm-up's, trained with the warm-up's options. `ROSEConfig.final_model` gives
the final training options of its own, by TRL's names: any `ModelConfig` option (`model_name_or_path`,
`model_revision`, `dtype`, `use_peft`, `lora_r`, ...), any `SFTConfig` option (`max_length`,
`chat_template_path`, `learning_rate`, `num_train_epochs`, `output_dir`, ...) and `gguf_file`. Unset options are
the warm-up's, except those that belong to the warm-up's model itself (`model_revision`, `gguf_file`), which a
final_model naming another `model_name_or_path` does not inherit. Selecting with one model and training another
is the paper's ROSE-T (Appendix B.2, Table 8); the selection's rows are then tokenized again with the final
model's own tokenizer, chat template and max_length.

    warm, final = model_specs(rose, sft, model_args)
    check_model(final, pool)         # before the warm-up: raises ValueError naming the option at fault
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from trl import ModelConfig, SFTConfig

from rose_trl.data.sft import BadRecordError, tokenize_sft_example
from rose_trl.models.source import load_tokenizer, model_source


# Options of the model itself: not carried over from the warm-up's model to another model_name_or_path.
MODEL_IDENTITY = ("model_revision", "gguf_file")
# Options that change how the selection's rows are tokenized for final training.
TOKENIZATION = ("model_name_or_path", "model_revision", "gguf_file", "max_length", "chat_template_path")


@dataclasses.dataclass
class ModelSpec:
    """One model of a run as it is loaded and trained: the warm-up's (`block` empty) or the final one.
    `sft.output_dir` is the run's; `output_dir` is where this model's own training writes: final[_<method>]/ for the
    warm-up's model, final[_<method>]_<model>/ for another one (ROSE-T), unless final_model sets output_dir."""

    model_args: ModelConfig
    sft: SFTConfig
    gguf_file: str | None
    output_dir: Path
    block: frozenset = frozenset()  # the options final_model sets

    def option(self, name: str) -> str:
        """How the user sets `name` for this model: `final_model.<name>` once a final_model block exists."""
        return f"final_model.{name}" if self.block else name

    @property
    def retokenizes(self) -> bool:
        """Its rows are not the warm-up's tokens: another tokenizer, chat template or max_length."""
        return bool(self.block & set(TOKENIZATION))

    def describe(self) -> dict:
        """The model as rose_final.json names it."""
        m = self.model_args
        source = model_source(m, self.gguf_file)
        return {
            "model_name_or_path": m.model_name_or_path,
            "model_revision": m.model_revision,
            **source.record,
            "dtype": m.dtype,
            "use_peft": m.use_peft,
            "lora_r": m.lora_r if m.use_peft else None,
            "max_length": self.sft.max_length,
            "chat_template_path": self.sft.chat_template_path,
        }


def model_specs(rose, sft: SFTConfig, model_args: ModelConfig) -> tuple[ModelSpec, ModelSpec]:
    """(the warm-up's model, the final model) of a recipe run."""
    suffix = "" if rose.selection_method == "rose" else f"_{rose.selection_method}"
    default_out = Path(sft.output_dir) / f"final{suffix}"
    warm = ModelSpec(model_args, sft, rose.gguf_file, Path(sft.output_dir) / "warmup")
    block = dict(rose.final_model or {})
    if not block:
        return warm, dataclasses.replace(warm, output_dir=default_out)
    model_fields, sft_fields = set(ModelConfig.__dataclass_fields__), set(SFTConfig.__dataclass_fields__)
    model_options = {k: v for k, v in block.items() if k in model_fields}
    sft_options = {k: v for k, v in block.items() if k in sft_fields and k != "output_dir"}
    other_model = "model_name_or_path" in block and block["model_name_or_path"] != model_args.model_name_or_path
    gguf_file = block.get("gguf_file", None if other_model else rose.gguf_file)
    if other_model and "model_revision" not in block:
        model_options["model_revision"] = ModelConfig.__dataclass_fields__["model_revision"].default
    final_model_args = dataclasses.replace(model_args, **model_options) if model_options else model_args
    final_sft = dataclasses.replace(sft, **sft_options) if sft_options else sft
    if "output_dir" in block:
        output_dir = Path(block["output_dir"])
    elif other_model:  # beside the warm-up model's final/: one folder per final model (and per method)
        output_dir = Path(f"{default_out}_{model_tag(final_model_args.model_name_or_path, gguf_file)}")
    else:
        output_dir = default_out
    return warm, ModelSpec(final_model_args, final_sft, gguf_file, output_dir, frozenset(block))


def model_tag(name_or_path: str, gguf_file: str | None = None) -> str:
    """A model's short name for folder names: a Hub id's or a folder's last part, a GGUF file's stem."""
    if gguf_file:
        return Path(gguf_file).stem
    path = Path(str(name_or_path).rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def apply_chat_template_path(model, tokenizer, path: str | None):
    """SFTConfig.chat_template_path, applied as SFTTrainer applies it: a .jinja/.j2 file becomes the tokenizer's
    chat template; anything else names a tokenizer (Hub id or folder) whose template TRL's `clone_chat_template`
    copies, adding that tokenizer's special tokens (and resizing the model's embeddings). -> (model, tokenizer,
    ids of the added tokens)."""
    if path is None:
        return model, tokenizer, []
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        return model, tokenizer, []
    from trl import clone_chat_template

    return clone_chat_template(model, tokenizer, path)


def meta_model(config, trust_remote_code: bool = False):
    """The model without weights (meta device): its module names and shapes, and a stand-in for chat-template
    cloning."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    # Resizing initializes new rows from the mean of the old ones, which meta tensors cannot give.
    model.resize_token_embeddings = functools.partial(type(model).resize_token_embeddings, model, mean_resizing=False)
    return model


def _first_chat_row(pool) -> int | None:
    """The index of the pool's first chat row (`messages`, or TRL's conversational prompt), None when it has none."""
    prompt = pool.features.get("prompt")
    if "messages" not in pool.column_names and (prompt is None or getattr(prompt, "dtype", None) == "string"):
        return None  # prompt/completion strings only: read from the schema, not row by row
    columns = [c for c in ("messages", "prompt") if c in pool.column_names]
    for i, row in enumerate(pool.select_columns(columns)):
        if row.get("messages") is not None or isinstance(row.get("prompt"), list):
            return i
    return None


def _token_counts(pool, tokenizer, max_length: int | None, option: str, name: str) -> list[int]:
    """Every pool row's length in `tokenizer`'s tokens (sft_data's rule), in parallel on a large pool."""

    def count(row, index):
        try:
            return {"n_tokens": len(tokenize_sft_example(row, tokenizer, max_length, "pool", index)["input_ids"])}
        except BadRecordError:
            raise
        except Exception as e:  # e.g. a chat template's raise_exception on this row's turns
            raise ValueError(
                f"{option}: the tokenizer of {name} cannot tokenize pool record {index}: {type(e).__name__}: {e}"
            ) from None

    workers = min(8, os.cpu_count() or 1) if len(pool) >= 20_000 else None
    return pool.map(
        count,
        with_indices=True,
        remove_columns=pool.column_names,
        num_proc=workers,
        keep_in_memory=True,
        desc=f"Tokenizing the pool for {name}",
    )["n_tokens"]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))


def check_model(spec: ModelSpec, pool, trust_remote_code: bool = False, budget=None):
    """Check, without loading weights, what training `spec`'s model would otherwise find out only when it starts:
    the model and its tokenizer load; its tokenizer has a chat template when the pool has chat rows; its LoRA
    targets exist. When its rows are not the warm-up's tokens (`spec.retokenizes`), every pool row is tokenized
    with its tokenizer, chat template and max_length, and must fit the model's positions. With a memory `budget`
    (budget.MemoryBudget), the Trainer's batch of this model is estimated against it from the config and a warning
    gives the batch that fits (check_training), as final training warns again once the model is loaded. Returns
    that tokenizer (chat template applied); raises ValueError naming the option at fault."""
    from transformers import AutoConfig

    m = spec.model_args
    name = str(m.model_name_or_path)
    where = spec.option("model_name_or_path")
    if (
        spec.gguf_file is None
        and not name.endswith(".gguf")
        and not Path(name).exists()
        and not _looks_like_hub_id(name)
    ):
        raise ValueError(f"{where}: {name!r} does not exist (neither a folder, a .gguf file nor a Hub id)")
    try:
        source = model_source(m, spec.gguf_file)
        revision = None if source.record else m.model_revision
        config = AutoConfig.from_pretrained(source.path, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(m, trust_remote_code, spec.gguf_file)
    except (OSError, ValueError, ImportError) as e:  # FileNotFoundError and the Hub's errors are OSErrors
        raise ValueError(f"{where}: cannot load {name!r}: {type(e).__name__}: {e}") from None

    skeleton = meta_model(config, trust_remote_code)
    template = spec.sft.chat_template_path
    try:
        skeleton, tokenizer, _ = apply_chat_template_path(skeleton, tokenizer, template)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{spec.option('chat_template_path')}: cannot take a chat template from {template!r}: {e}"
        ) from None
    chat_row = _first_chat_row(pool)
    if chat_row is not None and tokenizer.chat_template is None:
        raise ValueError(
            f"{spec.option('chat_template_path')}: the pool has chat rows (record {chat_row} is one) and "
            f"the tokenizer of {name} has no chat template; set {spec.option('chat_template_path')} to a "
            f".jinja file or a tokenizer to clone one from (as SFTConfig's chat_template_path)"
        )

    if m.use_peft and m.lora_target_modules and m.lora_target_modules != "all-linear":
        targets = [m.lora_target_modules] if isinstance(m.lora_target_modules, str) else list(m.lora_target_modules)
        modules = [n for n, _ in skeleton.named_modules()]
        if not any(n == t or n.endswith("." + t) for t in targets for n in modules):
            raise ValueError(
                f"{spec.option('lora_target_modules')}: none of {targets} is a module of {name} "
                f"(its attention modules: {sorted({n.rsplit('.', 1)[-1] for n in modules if 'attn' in n})})"
            )

    counts = None
    if spec.retokenizes:
        counts = np.asarray(
            _token_counts(pool, tokenizer, spec.sft.max_length, spec.option("chat_template_path"), name)
        )
        # Rows, not the option: a max_length above the model's positions that no row reaches is harmless.
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and len(counts) and counts.max() > limit:
            raise ValueError(
                f"{spec.option('max_length')}: at max_length {spec.sft.max_length} pool record "
                f"{int(counts.argmax())} has {int(counts.max())} tokens, but {name} takes at most {limit} "
                f"(its max_position_embeddings)"
            )
    if budget is not None:
        _check_training_memory(spec, config, budget, counts)
    return tokenizer


def _check_training_memory(spec: ModelSpec, config, budget, counts) -> str | None:
    """The Trainer's batch of `spec`'s model against `budget`, from its config (check_training counts the weights
    it will hold, at the dtype it is loaded in, on top of what this process holds now), rows as long as the longest
    pool row (all max_length when the rows were not tokenized here). A warning (returned), never an error."""
    import copy

    from rose_trl.resources.memory import LoraShape, ModelShape
    from rose_trl.resources.training_memory import check_training

    m = spec.model_args
    config = copy.copy(config)
    if m.dtype not in (None, "auto"):
        config.dtype = m.dtype
    try:
        lora = LoraShape.from_model_args(m) if m.use_peft else LoraShape(r=0, targets=())
        ModelShape.from_config(config)
    except (ValueError, KeyError, AttributeError) as e:  # a shape the estimate does not know: no estimate
        return f"no memory estimate for {m.model_name_or_path}: {e}"
    width = spec.sft.max_length
    if counts is not None and len(counts):
        width = int(min(counts.max(), width)) if width else int(counts.max())
    return check_training(
        config,
        spec.sft,
        budget,
        f"{spec.option('per_device_train_batch_size')} ({m.model_name_or_path}, checked at the start)",
        width=width,
        lora=lora,
    )
