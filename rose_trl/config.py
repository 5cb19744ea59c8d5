"""ROSE options: one dataclass, parsed by TrlParser next to SFTConfig and ModelConfig in the recipe."""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap
from dataclasses import MISSING, Field, asdict, dataclass, field, fields

from rose_trl.gradients.projection import PROJECTION_TYPES
from rose_trl.utils.errors import ConfigError


GRADIENT_METHODS = ("rose", "less")
# TRL 1.16's DPO loss types (DPOTrainer._compute_loss); tests/test_trl_api.py checks the list against TRL's source.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
SUBTASK_BALANCES = ("max", "round_robin", "proportional")
BASELINE_METHODS = ("random", "bm25", "rds", "dsir", "full")
SELECTION_METHODS = GRADIENT_METHODS + BASELINE_METHODS


# A config dataclass's body opens each group of options with a comment of this form: the one grouping its options
# have in the reference (docs/reference/options.md, written by `python -m rose_trl.reference`).
SECTION_COMMENT = re.compile(r"^\s*# (Parameters that control .+?)\s*$")


def option_default(f: Field):
    """A field's default value (its default_factory's value for a list)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def option_type(cls, f: Field) -> str:
    """A field's type as its class writes it (`str | None`). Not `f.type`: transformers' HfArgumentParser (TrlParser)
    rewrites the fields' `type` in place when it builds a parser (`str | None` becomes `str`)."""
    for klass in cls.__mro__:
        annotation = vars(klass).get("__annotations__", {}).get(f.name)
        if annotation is not None:
            return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return str(f.type)


def option_help(f: Field) -> str:
    """A field's help as a reader sees it: argparse's `%%` written `%`, its choices appended."""
    text = f.metadata.get("help", "").replace("%%", "%")
    if f.metadata.get("choices"):
        text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
    return text


def option_sections(cls) -> list[tuple[str, list[Field]]]:
    """A config dataclass's fields in the groups that its body's `# Parameters that control ...` comments open, in
    field order; a field before any such comment is in the group "Parameters" (a base class's fields in its own
    groups). Read from the class's source: the comments are the one place the grouping is written."""
    by_name = {f.name: f for f in fields(cls)}
    title_of: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if "__dataclass_fields__" not in vars(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (a frozen build): one group
            continue
        lines = source.splitlines()
        class_def = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
        title, end = "Parameters", class_def.lineno  # from the line after `class ...:`
        for node in class_def.body:
            for line in lines[end : node.lineno - 1]:
                m = SECTION_COMMENT.match(line)
                if m:
                    title = m.group(1)
            end = node.end_lineno
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in by_name:
                title_of[node.target.id] = title
    sections: dict[str, list[Field]] = {}
    for f in fields(cls):
        sections.setdefault(title_of.get(f.name, "Parameters"), []).append(f)
    return list(sections.items())


def _document_fields(cls):
    """Add to `cls`'s docstring an `Args:` section built from its fields (name, type, default, help), before its
    `Example:` section: what `help()` shows then comes from the fields themselves and cannot drift from them."""
    if cls.__doc__ is None:  # python -OO
        return cls
    lines = ["    Args:"]
    for f in fields(cls):  # as docs/reference/options.md shows them (rose_trl.reference): one text for both
        lines.append(f"        {f.name} (`{option_type(cls, f)}`, defaults to `{option_default(f)!r}`):")
        lines += textwrap.wrap(option_help(f), width=118, initial_indent=" " * 12, subsequent_indent=" " * 12)
    doc = cls.__doc__.rstrip()
    head, example = (doc.split("\n    Example:", 1) + [None])[:2]
    cls.__doc__ = head.rstrip() + "\n\n" + "\n".join(lines) + "\n"
    if example is not None:
        cls.__doc__ += "\n    Example:" + example + "\n"
    return cls


def _column_map(name: str, value) -> dict[str, str] | None:
    """A column map from the YAML (a mapping) or the command line (a JSON object), checked: names to names."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f'{name}: expected a JSON object such as {{"question": "prompt"}}, got {value!r} ({e})'
            ) from None
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{name}: expected a mapping of column names to column names, got {value!r}")
    return dict(value)


@_document_fields
@dataclass
class ROSEConfig:
    """Data selection options, parsed next to `SFTConfig` and `ModelConfig` (`TrlParser`, the recipes' YAML or
    command line). The warm-up's own training options (epochs = checkpoints, learning rate, batch size, LoRA) come
    from those two. The fields below are grouped as the recipes list them: the model, the data, the selection, the
    gradient features and their stores, the validation target, the checkpoints' learning rates, the Hub push and
    the memory budget.

    Example:

    ```python
    >>> from rose_trl import ROSEConfig
    >>> config = ROSEConfig(selection_fraction=0.05, selection_method="less")
    >>> config.selection_folder
    'selection_less'
    >>> ROSEConfig(selection_fraction=2.0)
    Traceback (most recent call last):
    ...
    rose_trl.utils.errors.ConfigError: selection_fraction must be in (0, 1], got 2.0

    ```
    """

    # Parameters that control the model
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside the folder or Hub repo `model_name_or_path` names (or set "
            "model_name_or_path to the .gguf file itself). It is converted once to a "
            "safetensors folder cached under its content hash ($ROSE_TRL_CACHE, default "
            "~/.cache/rose_trl), which every stage loads; needs `pip install "
            "rose_trl[gguf]`."
        },
    )

    # Parameters that control the data
    pool_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Training pool: Hub dataset id, local .jsonl/.json/.csv/.tsv/.parquet file or "
            "save_to_disk folder. Rows are chat (`messages`), `prompt`/`completion`, Alpaca "
            "(`instruction`, `output`, optional `input`) or `text` (docs/guides/data.md); other column "
            "names: pool_column_map."
        },
    )
    pool_split: str = field(default="train", metadata={"help": "Split of a Hub pool dataset."})
    pool_sources: list[str] | None = field(
        default=None,
        metadata={
            "help": "Keep only pool rows whose `source` (or Tulu's `dataset`) field is one of "
            "these, e.g. [flan_v2, cot, oasst1] of allenai/tulu-v2-sft-mixture."
        },
    )
    pool_max_examples: int | None = field(
        default=None, metadata={"help": "Use only a seeded sample of N pool rows, kept in pool order (smoke tests)."}
    )
    pool_column_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "The pool's column names -> the names a pool format uses, e.g. {question: "
            "instruction, context: input, answer: output} or {body: text}: a mapping in a "
            "YAML config, a JSON object on the command line."
        },
    )
    validation_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Few-shot preference set: rose:<task>, a file released with the paper, or a "
            "Hub id, .jsonl/.json/.csv/.tsv/.parquet file or save_to_disk folder with "
            "prompt/chosen/rejected and an optional `subtask` column (other column names: "
            "validation_column_map)."
        },
    )
    validation_split: str = field(default="train", metadata={"help": "Split of a Hub validation dataset."})
    validation_column_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "The preference set's column names -> prompt, chosen, rejected, subtask, e.g. "
            "{question: prompt, good: chosen, bad: rejected, category: subtask}: a mapping in "
            "a YAML config, a JSON object on the command line."
        },
    )
    validation_k: int | None = field(
        default=None,
        metadata={
            "help": "Shots per subtask: for rose:<task> builders the number to build, for a "
            "released preference file its group size (default: from the file name); for any "
            "other set a seeded sample of k pairs per subtask (default: every pair), which "
            "says in the log and in selection/summary.json how many of how many it keeps."
        },
    )

    # Parameters that control the selection
    selection_method: str = field(
        default="rose",
        metadata={
            "help": "rose (DPO validation gradients), less (SFT-loss validation gradients, "
            "LESS), or a baseline: random, bm25, rds, dsir, full (no selection). "
            "Methods other than rose write selection_<method>/.",
            "choices": list(SELECTION_METHODS),
        },
    )
    selection_fraction: float = field(default=0.05, metadata={"help": "Fraction of the pool to select, in (0, 1]."})
    subtask_balance: str = field(
        default="max",
        metadata={
            "help": "How the selection is shared between subtasks: max (score = best subtask's "
            "score, top rows overall: the paper), round_robin (each subtask in turn "
            "takes its best remaining row: equal shares) or proportional (each subtask "
            "takes its share of the validation pairs).",
            "choices": list(SUBTASK_BALANCES),
        },
    )
    warmup_fraction: float = field(default=0.05, metadata={"help": "Random fraction of the pool for the warm-up run."})
    final_training: bool = field(default=True, metadata={"help": "Train the final model on the selection."})
    final_model: dict | str | None = field(
        default=None,
        metadata={
            "help": "The final training's own options, where they differ from the warm-up's "
            "(ROSE-T: select with one model, train another): any ModelConfig or SFTConfig "
            "option by its TRL name (model_name_or_path, dtype, use_peft, lora_r, ..., "
            "max_length, chat_template_path, learning_rate, output_dir, ...) and "
            "gguf_file. Unset options are the warm-up's, except model_revision and "
            "gguf_file when model_name_or_path names another model. A nested block in a "
            "YAML config, a JSON object on the command line (docs/guides/transfer.md)."
        },
    )

    # Parameters that control the gradient features and their stores
    gradient_type: str = field(
        default="adam",
        metadata={
            "help": "Training-gradient features: adam (LESS preconditioning) or sgd.",
            "choices": ["adam", "sgd"],
        },
    )
    projection_type: str = field(
        default="auto",
        metadata={
            "help": "sjlt (fast sparse JL), trak (trak's BasicProjector, TRAK Rademacher), "
            "trak_cuda (trak's CudaProjector with fast_jl, LESS's GPU projector) or "
            "auto (= sjlt, the measured best on CPU and GPU).",
            "choices": list(PROJECTION_TYPES) + ["auto"],
        },
    )
    projection_dim: int = field(default=8192, metadata={"help": "Dimension of the projected gradients."})
    projection_seed: int = field(default=0, metadata={"help": "Seed of the projection matrix."})
    gradient_layers: int | None = field(
        default=None,
        metadata={
            "help": "Gradient features from the LoRA modules of the last N decoder layers only (default: all). The "
            "backward of every gradient pass (pool and validation) stops below the lowest of them, so a pass "
            "costs a forward and a backward of N layers; the warm-up still trains every LoRA module. Stores "
            "record it: stores made with other layers are refused (or recomputed with overwrite_stores)."
        },
    )
    selection_checkpoints: list[int] | None = field(
        default=None,
        metadata={
            "help": "Which warm-up checkpoints contribute, by position in step order, negative from the end as in "
            "Python: [-1] the last one, [0, -1] the first and the last (default: all). Their learning-rate "
            "weights are renormalized over them, and the gradient stores of the others are not computed. "
            "Scoring a finished run again with another subset reuses its stores (no gradient pass). [-1] is the "
            "measured cheap choice (docs/results/cost_frontier.md)."
        },
    )
    prefilter_fraction: float | None = field(
        default=None,
        metadata={
            "help": "A cheap first pass (default: off): features from the last prefilter_layers decoder layers at "
            "the first selected checkpoint rank the whole pool; the full features are computed only for this "
            "fraction of it, its top rows (shared between subtasks as subtask_balance says), and the "
            "selection is made among them. Must exceed selection_fraction. scores.parquet marks the rows it "
            "left out (prefiltered_out) and gives every row its prefilter_score."
        },
    )
    prefilter_layers: int = field(
        default=2,
        metadata={"help": "Decoder layers (the last ones) of the first pass's features, with prefilter_fraction."},
    )
    gradient_batch_size: int = field(
        default=16,
        metadata={
            "help": "Pool examples per batched gradient pass, at most "
            "(memory_budget_gb, max_batch_tokens and "
            "gradient_memory_gb may lower it)."
        },
    )
    gradient_memory_gb: float | None = field(
        default=None,
        metadata={
            "help": "Memory budget (GB) for the gradient path of one pass, beyond its activations. "
            "The fused path (default: sjlt, or trak with its matrix cached) costs about "
            "16 bytes per parameter of the largest LoRA matrix per row (8 MB for a 7B "
            "model at r=128), so the budget rarely binds; the whole-row fallback costs 16 "
            "bytes per LoRA parameter per row (2.1 GB at 7B, r=128)."
        },
    )
    max_batch_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Upper limit of a gradient pass in padded tokens (rows x length): what "
            "bounds the activations, the main memory of a pass; batches are split to "
            "stay under it, and under what memory_budget_gb allows."
        },
    )
    store_dtype: str = field(
        default="float16",
        metadata={
            "help": "Gradient store dtype: float16, float32 or int8 (per-row scale; half of float16 on disk).",
            "choices": ["float16", "float32", "int8"],
        },
    )
    overwrite_stores: bool = field(
        default=False,
        metadata={
            "help": "When output_dir holds gradient stores (or a run) made for other inputs "
            "(model, checkpoint, pool, validation set, projection...), delete and "
            "recompute them instead of refusing."
        },
    )

    # Parameters that control the validation target
    validation_beta: float = field(default=0.1, metadata={"help": "DPO beta of the validation loss."})
    validation_loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "TRL DPO loss type(s) whose per-pair gradients define the target (rose only), as "
            "DPOConfig.loss_type: sigmoid (the paper's DPO loss), ipo, hinge, robust, bco_pair, ... "
            "Several are combined with validation_loss_weights. docs/guides/method.md says which reproduce "
            "the sigmoid selection and why.",
            "choices": list(DPO_LOSS_TYPES),
        },
    )
    validation_loss_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weights of the validation_loss_type losses, as DPOConfig.loss_weights (default: 1.0 each)."
        },
    )
    validation_label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "DPOConfig.label_smoothing of the validation loss: the flip probability of "
            "robust and aot, EXO's epsilon (exo_pair needs it > 0; the paper uses 1e-3)."
        },
    )
    validation_batch_size: int = field(
        default=4,
        metadata={"help": "Preference pairs per validation gradient pass, at most (memory_budget_gb may lower it)."},
    )
    validation_aggregation: str = field(
        default="normalized_mean",
        metadata={
            "help": "normalized_mean (normalize each pair's gradient, then average: "
            "the released code) or eq6 (average, then normalize: the paper's "
            "Eq. 6 literally).",
            "choices": ["normalized_mean", "eq6"],
        },
    )

    # Parameters that control the checkpoints' learning rates
    checkpoint_learning_rates: list[float] | None = field(
        default=None,
        metadata={
            "help": "Each warm-up checkpoint's learning rate eta_i (the mean LR of its epoch), one "
            "per checkpoint in step order. Overrides the recorded and recovered rates; "
            "needed only when a warm-up's checkpoints do not determine them (the error "
            "says so)."
        },
    )

    # Parameters that control the Hub push
    hub_dataset_id: str | None = field(
        default=None,
        metadata={
            "help": "With push_to_hub: true, push the selected subset (and a dataset card) to this Hub dataset repo."
        },
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub dataset repo as private."})

    # Parameters that control the memory budget
    memory_budget_gb: float | None = field(
        default=None,
        metadata={
            "help": "Memory (GB) one process may use: the pool gradient passes, the validation "
            "passes and evaluation get the most rows whose estimated peak fits it, from "
            "the model's shape, the LoRA settings, the dtype and the loss path (budget.py, "
            "memory.py); gradient_batch_size, max_batch_tokens, gradient_memory_gb and "
            "validation_batch_size stay upper limits. Default, chosen for speed: what the "
            "process holds plus 75%% of the CPU memory available (shared by the node's "
            "processes), or plus 90%% of the GPU's free memory; a budget you set is held, "
            "with glibc's compact heap on a CPU when a pass needs it (slower passes). The "
            "plan is logged once, with what a larger budget would save; the Trainer's batch "
            "sizes are not changed (a warning gives the size that fits)."
        },
    )

    def __post_init__(self):
        for name in ("pool_column_map", "validation_column_map"):
            setattr(self, name, _column_map(name, getattr(self, name)))
        for name in ("selection_fraction", "warmup_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
        if self.selection_method not in SELECTION_METHODS:
            raise ConfigError(f"selection_method must be one of {SELECTION_METHODS}, got {self.selection_method!r}")
        if self.projection_type not in PROJECTION_TYPES + ("auto",):
            raise ConfigError(
                f"projection_type must be one of {PROJECTION_TYPES + ('auto',)}, got {self.projection_type!r}"
            )
        if self.gradient_memory_gb is not None and self.gradient_memory_gb <= 0:
            raise ConfigError(f"gradient_memory_gb must be > 0, got {self.gradient_memory_gb}")
        if self.checkpoint_learning_rates is not None and not all(
            isinstance(lr, (int, float)) and lr >= 0 for lr in self.checkpoint_learning_rates
        ):
            raise ConfigError(
                f"checkpoint_learning_rates must be non-negative numbers, got {self.checkpoint_learning_rates!r}"
            )
        if self.projection_dim < 1 or self.gradient_batch_size < 1 or self.validation_batch_size < 1:
            raise ConfigError("projection_dim, gradient_batch_size and validation_batch_size must be >= 1")
        if self.subtask_balance not in SUBTASK_BALANCES:
            raise ConfigError(f"subtask_balance must be one of {SUBTASK_BALANCES}, got {self.subtask_balance!r}")
        self._check_validation_loss()
        self._check_final_model()
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(f"memory_budget_gb must be > 0, got {self.memory_budget_gb}")
        self._check_cost_options()

    def _check_cost_options(self) -> None:
        for name in ("gradient_layers", "prefilter_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive number of decoder layers, got {value!r}")
        if self.selection_checkpoints is not None:
            if isinstance(self.selection_checkpoints, int):  # a single index, e.g. --selection_checkpoints -1
                self.selection_checkpoints = [self.selection_checkpoints]
            indices = list(self.selection_checkpoints)
            if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ConfigError(
                    f"selection_checkpoints must be a non-empty list of checkpoint positions (0 the first, -1 the "
                    f"last), got {self.selection_checkpoints!r}"
                )
            self.selection_checkpoints = indices
        if self.prefilter_fraction is not None:
            if not (isinstance(self.prefilter_fraction, (int, float)) and 0 < self.prefilter_fraction < 1):
                raise ConfigError(f"prefilter_fraction must be in (0, 1), got {self.prefilter_fraction!r}")
            if self.prefilter_fraction <= self.selection_fraction:
                raise ConfigError(
                    f"prefilter_fraction ({self.prefilter_fraction}) must exceed selection_fraction "
                    f"({self.selection_fraction}): the selection is made among the rows the first pass keeps"
                )

    def _check_validation_loss(self) -> None:
        if isinstance(self.validation_loss_type, str):  # DPOConfig.loss_type takes a single name too
            self.validation_loss_type = [self.validation_loss_type]
        self.validation_loss_type = list(self.validation_loss_type)
        unknown = [t for t in self.validation_loss_type if t not in DPO_LOSS_TYPES]
        if unknown or not self.validation_loss_type:
            raise ConfigError(
                f"validation_loss_type: unknown {unknown or 'empty list'}; TRL's DPO loss types are "
                f"{list(DPO_LOSS_TYPES)}"
            )
        if self.validation_loss_weights is not None:
            self.validation_loss_weights = [float(w) for w in self.validation_loss_weights]
            if len(self.validation_loss_weights) != len(self.validation_loss_type):
                raise ConfigError(
                    f"validation_loss_weights has {len(self.validation_loss_weights)} weights for "
                    f"{len(self.validation_loss_type)} validation_loss_type entries"
                )
        if not 0 <= self.validation_label_smoothing < 0.5:
            raise ConfigError(f"validation_label_smoothing must be in [0, 0.5), got {self.validation_label_smoothing}")
        if "exo_pair" in self.validation_loss_type and self.validation_label_smoothing == 0:
            raise ConfigError(
                "validation_loss_type exo_pair needs validation_label_smoothing > 0 (EXO's epsilon; "
                "the paper recommends 1e-3)"
            )

    def _check_final_model(self) -> None:
        if isinstance(self.final_model, str):  # the command line gives a JSON object as a string
            try:
                self.final_model = json.loads(self.final_model)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"final_model: expected a JSON object of ModelConfig/SFTConfig options, got "
                    f"{self.final_model!r} ({e})"
                ) from None
        if self.final_model is None:
            return
        if not isinstance(self.final_model, dict):
            raise ConfigError(
                f"final_model: expected a mapping of ModelConfig/SFTConfig options, got "
                f"{type(self.final_model).__name__}"
            )
        from trl import ModelConfig, SFTConfig  # here: importing config.py stays light

        known = set(ModelConfig.__dataclass_fields__) | set(SFTConfig.__dataclass_fields__) | {"gguf_file"}
        unknown = sorted(set(self.final_model) - known)
        if unknown:
            raise ConfigError(f"final_model: {unknown} are not ModelConfig or SFTConfig options (nor gguf_file)")

    @property
    def selection_folder(self) -> str:
        """ROSE's selection is `selection/`; other methods sit beside it for comparisons and the report."""
        return "selection" if self.selection_method == "rose" else f"selection_{self.selection_method}"

    def to_dict(self) -> dict:
        """The options a selection depends on, recorded in its config.json: final_model is left out (it is
        recorded in the final model's rose_final.json), so that training another final model leaves the
        selection as it is."""
        options = asdict(self)
        options.pop("final_model")
        return options


@_document_fields
@dataclass
class SelectConfig:
    """Offline selection (recipes/rose_select.py), parsed next to `ROSEConfig` and `ModelConfig`: where the finished
    warm-up is and where the outputs go.

    Example:

    ```python
    >>> from rose_trl import SelectConfig
    >>> SelectConfig(warmup_dir="outputs/warmup", output_dir="outputs/run").max_length
    1024

    ```
    """

    warmup_dir: str = field(
        default=None,
        metadata={
            "help": "Output folder of a finished LoRA warm-up run, holding "
            "checkpoint-<step>/ folders (plain, DeepSpeed ZeRO or "
            "FSDP2 layout) with the optimizer state."
        },
    )
    output_dir: str = field(default=None, metadata={"help": "Where rose/ (gradient stores) and the selection go."})
    folder: str | None = field(
        default=None,
        metadata={
            "help": "Selection folder under output_dir (default: selection/ for rose, selection_<method>/ otherwise)."
        },
    )
    max_length: int | None = field(default=1024, metadata={"help": "Truncate pool and validation sequences to this."})
    use_cpu: bool = field(default=False, metadata={"help": "Run on the CPU (gloo between processes)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})

    def __post_init__(self):
        if not self.warmup_dir or not self.output_dir:
            raise ConfigError("warmup_dir and output_dir are required")
