"""The recipes' job: warm-up LoRA SFT with ROSECallback -> selection -> final SFT on the selection.

Baseline methods (random, bm25, rds, dsir, full) skip the warm-up and write the same layout under
`selection_<method>/`. A warm-up that already finished is not re-run: its saved checkpoints are read
(offline mode), so another gradient method on the same output_dir reuses the pool gradient stores. A
final model is trained again only when what it would be trained on changed (`FINAL_RECORD`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from accelerate import PartialState
from accelerate.logging import get_logger
from datasets import Dataset, load_from_disk
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from rose_trl.config import BASELINE_METHODS, GRADIENT_METHODS, ROSEConfig, SelectConfig
from rose_trl.data import load_pool, load_preferences
from rose_trl.data.sft import BadRecordError, fingerprint_tokenized, tokenize_pool
from rose_trl.models.final_model import ModelSpec, apply_chat_template_path, check_model, model_specs
from rose_trl.models.source import load_model_and_tokenizer, model_source
from rose_trl.outputs.selection import write_selection
from rose_trl.resources.budget import MemoryBudget, check_training
from rose_trl.run.callback import ROSECallback
from rose_trl.run.offline import select_from_checkpoints
from rose_trl.run.selector import ROSESelector
from rose_trl.utils.files import atomic_write_json, checkpoint_dirs


logger = get_logger(__name__)


def load_datasets(rose: ROSEConfig, seed: int = 0) -> tuple[Dataset, Dataset]:
    if not rose.pool_dataset or not rose.validation_dataset:
        raise ValueError("pool_dataset and validation_dataset are required")
    pool = load_pool(
        rose.pool_dataset,
        split=rose.pool_split,
        sources=rose.pool_sources,
        max_examples=rose.pool_max_examples,
        seed=seed,
    )
    validation = load_preferences(rose.validation_dataset, split=rose.validation_split, k=rose.validation_k, seed=seed)
    return pool, validation


def with_labels(tokens: Dataset, source: str) -> Dataset:
    """Tokenized rows -> input_ids + labels (-100 outside the response), what SFTTrainer trains on."""
    return tokens.map(
        lambda ex: {"labels": [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True)]},
        desc=f"Labels for {source}",
    ).select_columns(["input_ids", "labels"])


def sft_training_dataset(pool: Dataset, tokenizer, max_length: int | None, source: str) -> Dataset:
    """input_ids + labels, tokenized by the same rule as the gradients (sft_data)."""
    return with_labels(tokenize_pool(pool, tokenizer, max_length, source=source), source)


def warmup_indices(n: int, fraction: float, seed: int) -> list[int]:
    k = max(1, math.ceil(fraction * n - 1e-9))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint-<step> whose trainer_state.json (the Trainer's last write) parses. Folders
    of saves killed part-way are removed: the Trainer would resume from them, and redoes them anyway."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in reversed([p for p in checkpoint_dirs(folder) if p.is_dir()]):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (FileNotFoundError, json.JSONDecodeError):
            logger.warning("removing incomplete checkpoint %s (killed while saving)", path)
            shutil.rmtree(path, ignore_errors=True)  # every process of a launch may get here
    return None


def save_model_atomically(trainer, output_dir: str | Path) -> None:
    """save_model into a temporary folder, then move the files in, weights last: a final/ holding
    adapter_model.safetensors holds the whole model."""
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(f".{output_dir.name}.model-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if trainer.is_fsdp_enabled and "SHARDED" in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        # Under SHARDED_STATE_DICT Trainer.save_model writes no weights at all: save the adapter whole.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(tmp.iterdir(), key=lambda p: p.name.startswith(("adapter_model", "model")))
        for f in files:
            if (output_dir / f.name).is_dir():
                shutil.rmtree(output_dir / f.name)
            os.replace(f, output_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def _run_config(rose: ROSEConfig, model_args: ModelConfig, sft: SFTConfig | None = None, **extra) -> dict:
    """Everything the warm-up checkpoints depend on: a resumed warm-up must be the same warm-up."""
    config = {
        "model_name_or_path": model_args.model_name_or_path,
        **model_source(model_args, rose.gguf_file).record,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_target_modules": model_args.lora_target_modules,
        "lora_dropout": model_args.lora_dropout,
        "warmup_fraction": rose.warmup_fraction,
        **extra,
    }
    if sft is not None:
        config.update(
            learning_rate=sft.learning_rate,
            lr_scheduler_type=str(sft.lr_scheduler_type),
            per_device_train_batch_size=sft.per_device_train_batch_size,
            gradient_accumulation_steps=sft.gradient_accumulation_steps,
            num_train_epochs=sft.num_train_epochs,
            seed=sft.seed,
            max_length=sft.max_length,
        )
    return config


def _warmup_finished(warmup_dir: Path) -> bool:
    last = last_complete_checkpoint(warmup_dir)
    if last is None:
        return False
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return state.get("global_step", 0) >= state.get("max_steps", float("inf"))


def select_with_gradients(
    rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig, pool, validation, model, tokenizer
) -> Path:
    """rose/less: warm-up with the callback, or read the checkpoints of a warm-up that already finished."""
    out = Path(sft.output_dir)
    warmup_dir = out / "warmup"
    run_config = _run_config(rose, model_args, sft)
    if _warmup_finished(warmup_dir):
        model.to(PartialState().device)
        selector = ROSESelector(
            pool,
            validation,
            tokenizer,
            rose,
            out,
            max_length=sft.max_length,
            use_cpu=sft.use_cpu,
            run_config=run_config,
        )
        return select_from_checkpoints(
            warmup_dir, model, selector, folder=rose.selection_folder, peft_config=get_peft_config(model_args)
        )
    # The warm-up pushes nothing: only the final model (and the selection) go to the Hub.
    # Its tokenizer already has chat_template_path applied (_run): the trainer must not apply it again.
    warm_args = dataclasses.replace(
        sft,
        output_dir=str(warmup_dir),
        save_strategy="epoch",
        save_only_model=False,
        push_to_hub=False,
        chat_template_path=None,
    )
    callback = ROSECallback(
        pool, validation, tokenizer, rose, output_dir=str(out), max_length=sft.max_length, run_config=run_config
    )
    # Check the data and any earlier run in output_dir before the warm-up resumes from its checkpoints.
    selector = callback.ensure_selector(warm_args)
    if selector.cleared_previous_run:
        for stale in ("warmup", "final", rose.selection_folder):
            shutil.rmtree(out / stale, ignore_errors=True)
    # The warm-up trains on the selector's own tokens of the pool: tokenized once, identical by construction.
    warm = with_labels(
        selector.pool_tokens.select(warmup_indices(len(pool), rose.warmup_fraction, sft.seed)), "warm-up pool"
    )
    trainer = SFTTrainer(
        model,
        args=warm_args,
        train_dataset=warm,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[callback],
    )
    # A re-run resumes the warm-up from its last checkpoint; finished gradient stores are reused.
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(warmup_dir))
    return Path(callback.selection_dir)


def select_with_baseline(
    rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig, pool, validation, model, tokenizer
) -> Path:
    from rose_trl.baselines import BASELINES

    out = Path(sft.output_dir)
    state = PartialState()
    if state.is_main_process:
        needs_model = rose.selection_method == "rds"
        table = BASELINES[rose.selection_method](
            pool,
            validation,
            seed=sft.seed,
            model=model.to(state.device) if needs_model else None,
            tokenizer=tokenizer if needs_model else None,
        )
        fraction = 1.0 if rose.selection_method == "full" else rose.selection_fraction
        subtasks = list(dict.fromkeys(validation["subtask"]))
        write_selection(
            out,
            pool,
            table,
            fraction,
            {**_run_config(rose, model_args, sft), **rose.to_dict()},
            rose.selection_method,
            subtasks,
            folder=rose.selection_folder,
            subtask_balance=rose.subtask_balance,
            pair_counts=Counter(validation["subtask"]),
        )
    state.wait_for_everyone()
    return out / rose.selection_folder


FINAL_RECORD = "rose_final.json"
# Options that only say where to write, log or push: they do not change the weights a training produces.
_NOT_TRAINING = {
    "output_dir",
    "run_name",
    "project",
    "report_to",
    "disable_tqdm",
    "logging_steps",
    "logging_strategy",
    "logging_first_step",
    "logging_nan_inf_filter",
    "log_level",
    "log_level_replica",
    "log_on_each_node",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_only_model",
    "save_on_each_node",
    "resume_from_checkpoint",
    "skip_memory_metrics",
    "local_rank",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_token",
    "hub_private_repo",
    "hub_always_push",
    "hub_revision",
    "trackio_space_id",
    "trackio_bucket_id",
    "trackio_static_space_id",
}


def final_training_fingerprint(
    tokens: Dataset, sft: SFTConfig, model_args: ModelConfig, source: dict | None = None
) -> str:
    """What a final model is made from: its tokenized training rows, the model (and the GGUF file it came from) and
    LoRA settings and every training option that can change the weights."""
    options = {k: v for k, v in sft.to_dict().items() if k not in _NOT_TRAINING}
    described = json.dumps(
        [options, dataclasses.asdict(model_args)] + ([source] if source else []), sort_keys=True, default=str
    )
    return hashlib.sha256(f"{fingerprint_tokenized(tokens)}|{described}".encode()).hexdigest()


def _selecting_model(selection: Path) -> dict:
    """The model the selection was made with (and its method), from the selection's recorded configuration."""
    config = json.loads((selection / "config.json").read_text())
    keys = ("model_name_or_path", "gguf_file", "gguf_sha256")
    return {"selection_method": config.get("selection_method"), **{k: config[k] for k in keys if config.get(k)}}


def train_final_model(rose: ROSEConfig, final: ModelSpec, selection: Path, tokenizer) -> Path:
    """SFT of `final`'s model on the selection into its output folder (final[_<method>]/ by default), the rows
    tokenized with `tokenizer` (the final model's own, chat template applied, when it is not the warm-up's).
    Its FINAL_RECORD (written before training, and again, finished, after the weights) names the selecting and
    the final model and says what it was trained on: a finished model of the same fingerprint is reused, an
    unfinished one resumes from its last complete checkpoint, any other is cleared and trained from scratch."""
    state = PartialState()
    out, sft, model_args = final.output_dir, final.sft, final.model_args
    # In memory: tokenizing a dataset read from disk would write a cache file into the selection folder.
    selected = load_from_disk(str(selection / "selected"), keep_in_memory=True)
    tokens = tokenize_pool(selected, tokenizer, sft.max_length, source="selection")
    source = model_source(model_args, final.gguf_file).record
    fingerprint = final_training_fingerprint(tokens, sft, model_args, source)
    record = out / FINAL_RECORD
    described = {
        "fingerprint": fingerprint,
        "selection": str(selection),
        "rows": len(selected),
        "selection_model": _selecting_model(selection),
        "final_model": final.describe(),
    }
    with state.main_process_first():  # the main process decides (and clears); the others read its decision
        found = json.loads(record.read_text()) if record.exists() else None
        done = found is not None and found.get("fingerprint") == fingerprint and found.get("finished") is True
        if state.is_main_process and not done:
            if found is None or found.get("fingerprint") != fingerprint:
                shutil.rmtree(out, ignore_errors=True)  # another selection, model or configuration (or unknown)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record, {**described, "finished": False})
    if done:
        logger.info("%s already holds the model trained on this selection: not trained again", out)
        return out
    model, fresh_tokenizer = load_model_and_tokenizer(model_args, sft.trust_remote_code, final.gguf_file)
    if final.retokenizes:
        # SFTTrainer applies chat_template_path to the fresh tokenizer (and model) itself, as check_model did to the
        # tokenizer the rows were tokenized with: TRL's own cloning, new tokens trained with the adapter.
        processing_class, args = fresh_tokenizer, sft
    else:  # the warm-up's tokenizer, its chat template already applied
        processing_class, args = tokenizer, dataclasses.replace(sft, chat_template_path=None)
    trainer = SFTTrainer(
        model,
        args=dataclasses.replace(args, output_dir=str(out)),
        train_dataset=with_labels(tokens, "selection"),
        processing_class=processing_class,
        peft_config=get_peft_config(model_args),
    )
    if (trainer.processing_class.get_vocab(), trainer.processing_class.chat_template) != (
        tokenizer.get_vocab(),
        tokenizer.chat_template,
    ):
        raise RuntimeError(f"{out}: the trainer's tokenizer differs from the one the selection was tokenized with")
    # The Trainer's batch is the user's: a warning, before training, if it would exceed the memory budget.
    longest = max((len(ids) for ids in tokens["input_ids"]), default=0)
    check_training(
        trainer.model,
        sft,
        MemoryBudget.for_device(rose.memory_budget_gb, trainer.args.device),
        "final training",
        width=min(longest, sft.max_length) if sft.max_length else longest,
    )
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out))
    save_model_atomically(trainer, out)
    if state.is_main_process:
        atomic_write_json(record, {**described, "finished": True})  # last: the record says the weights are complete
    state.wait_for_everyone()
    return out


def run(rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig) -> dict:
    """Returns {"selection": path, "final_model": path or None, "hub_url": url or None}."""
    if not model_args.use_peft:
        raise ValueError("ROSE extracts LoRA gradients: set use_peft: true (and lora_r, lora_target_modules)")
    try:
        return _run(rose, sft, model_args)
    except BadRecordError as e:
        if e.source not in ("pool", "validation", "warm-up pool", "selection"):
            raise  # already names its file
        # Name the file the record came from (indices count rows after pool_sources/pool_max_examples).
        spec = rose.validation_dataset if e.source == "validation" else rose.pool_dataset
        raise BadRecordError(f"{spec} ({e.source})", e.index, e.field, str(e).split("': ", 1)[-1]) from None


def _run(rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig) -> dict:
    out = Path(sft.output_dir)
    pool, validation = load_datasets(rose, sft.seed)
    # Before any selection work: everything about the models that a later stage would otherwise find out.
    warm, final = model_specs(rose, sft, model_args)
    check_model(warm, pool, sft.trust_remote_code)
    # The final model's Trainer batch against the memory budget, too (a warning): the warm-up's is checked before
    # the warm-up, and a final model with another vocabulary or shape can need much more.
    final_tokenizer = (
        check_model(
            final,
            pool,
            final.sft.trust_remote_code,
            MemoryBudget.for_device(rose.memory_budget_gb, "cpu" if final.sft.use_cpu else None),
        )
        if rose.final_training and final.block
        else None
    )
    model, tokenizer = load_model_and_tokenizer(model_args, sft.trust_remote_code, rose.gguf_file)
    model, tokenizer, added = apply_chat_template_path(model, tokenizer, sft.chat_template_path)
    if added and rose.selection_method in GRADIENT_METHODS:
        raise ValueError(
            f"chat_template_path: cloning the chat template of {sft.chat_template_path} adds {len(added)} "
            f"tokens to {model_args.model_name_or_path}, whose new embeddings the LoRA gradients do not "
            "cover; give a .jinja template whose tokens the tokenizer has"
        )
    select = select_with_baseline if rose.selection_method in BASELINE_METHODS else select_with_gradients
    selection = select(rose, sft, model_args, pool, validation, model, tokenizer)
    # The final model is trained from a fresh copy of the base: free the warm-up's (LoRA-wrapped) one first, or
    # final training holds two models (SmolLM2 in float32: 0.54 GB each).
    del model
    gc.collect()
    result = {"selection": str(selection), "final_model": None, "hub_url": None}

    if sft.push_to_hub and rose.hub_dataset_id and PartialState().is_main_process:
        from rose_trl.outputs.hub import push_selection

        result["hub_url"] = push_selection(
            out, rose.hub_dataset_id, private=rose.hub_private, token=sft.hub_token, folder=rose.selection_folder
        )
    if rose.final_training:
        result["final_model"] = str(
            train_final_model(rose, final, selection, final_tokenizer if final.retokenizes else tokenizer)
        )
    return result


def run_offline(rose: ROSEConfig, model_args: ModelConfig, select: SelectConfig) -> Path:
    """Selection from a finished warm-up's checkpoints, sharded over however many processes run it."""
    state = PartialState(cpu=select.use_cpu)
    pool, validation = load_datasets(rose)
    base, tokenizer = load_model_and_tokenizer(model_args, select.trust_remote_code, rose.gguf_file)
    base.to(state.device)
    selector = ROSESelector(
        pool,
        validation,
        tokenizer,
        rose,
        select.output_dir,
        max_length=select.max_length,
        use_cpu=select.use_cpu,
        run_config=_run_config(rose, model_args, warmup_dir=select.warmup_dir),
    )
    return select_from_checkpoints(
        select.warmup_dir,
        base,
        selector,
        folder=select.folder or rose.selection_folder,
        peft_config=get_peft_config(model_args),
    )
