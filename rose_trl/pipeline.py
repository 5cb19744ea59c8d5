"""The recipe's job: warm-up LoRA SFT with ROSECallback -> selection -> final SFT on the selection."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from datasets import Dataset, load_dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from .callback import ROSECallback
from .config import ROSEConfig
from .sft_data import BadRecordError, tokenize_pool

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_table(spec: str, split: str = "train") -> Dataset:
    """A Hub dataset id, a local .jsonl/.json/.parquet file, or a folder written by save_to_disk."""
    path = Path(spec)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"dataset file {spec} does not exist")
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    return load_dataset(spec, split=split)


def filter_sources(pool: Dataset, sources: list[str]) -> Dataset:
    """Keep rows from `sources`; Tulu-v2 names a row's origin in `dataset`, kept as `source` for reports."""
    if "source" not in pool.column_names:
        if "dataset" not in pool.column_names:
            raise ValueError("pool_sources needs a `source` or `dataset` column in the pool")
        pool = pool.add_column("source", pool["dataset"])
    wanted = set(sources)
    kept = pool.filter(lambda ex: ex["source"] in wanted, desc="Filtering pool sources")
    if len(kept) == 0:
        raise ValueError(f"no pool row comes from {sorted(wanted)}; found {sorted(set(pool['source']))[:20]}")
    return kept


def sft_training_dataset(pool: Dataset, tokenizer, max_length: int | None, source: str) -> Dataset:
    """input_ids + labels (-100 outside the response): the same tokens the gradients were taken on."""
    tokens = tokenize_pool(pool, tokenizer, max_length, source=source)
    return tokens.map(lambda ex: {"labels": [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])]},
                      desc=f"Labels for {source}").select_columns(["input_ids", "labels"])


def load_model_and_tokenizer(model_args: ModelConfig, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model_args.model_name_or_path} has no pad and no eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, dtype=model_args.dtype,
        trust_remote_code=trust_remote_code, attn_implementation=model_args.attn_implementation)
    return model, tokenizer


def warmup_indices(n: int, fraction: float, seed: int) -> list[int]:
    k = max(1, math.ceil(fraction * n - 1e-9))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint-<step> whose trainer_state.json (the Trainer's last write) parses. Folders
    of saves killed part-way are removed: the Trainer would resume from them, and redoes them anyway."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (FileNotFoundError, json.JSONDecodeError):
            print(f"removing incomplete checkpoint {path} (killed while saving)")
            shutil.rmtree(path, ignore_errors=True)  # every process of a launch may get here
    return None


def save_model_atomically(trainer, output_dir: str | Path) -> None:
    """save_model into a temporary folder, then move the files in, weights last: a final/ holding
    adapter_model.safetensors holds the whole model."""
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(f".{output_dir.name}.model-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if trainer.args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        files = sorted(tmp.iterdir(), key=lambda p: p.name.startswith(("adapter_model", "model")))
        for f in files:
            if (output_dir / f.name).is_dir():
                shutil.rmtree(output_dir / f.name)
            os.replace(f, output_dir / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


def run(rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig) -> dict:
    """Returns {"selection": path, "final_model": path or None}."""
    if not model_args.use_peft:
        raise ValueError("ROSE extracts LoRA gradients: set use_peft: true (and lora_r, lora_target_modules)")
    if not rose.pool_dataset or not rose.validation_dataset:
        raise ValueError("pool_dataset and validation_dataset are required")
    try:
        return _run(rose, sft, model_args)
    except BadRecordError as e:
        # Name the file the record came from (indices count rows after pool_sources/pool_max_examples).
        spec = rose.validation_dataset if e.source == "validation" else rose.pool_dataset
        raise BadRecordError(f"{spec} ({e.source})", e.index, e.field, str(e).split("': ", 1)[-1]) from None


def _run(rose: ROSEConfig, sft: SFTConfig, model_args: ModelConfig) -> dict:
    out = Path(sft.output_dir)
    pool = load_table(rose.pool_dataset, rose.pool_split)
    if rose.pool_sources:
        pool = filter_sources(pool, rose.pool_sources)
    if rose.pool_max_examples:
        pool = pool.select(range(min(rose.pool_max_examples, len(pool))))
    validation = load_table(rose.validation_dataset, rose.validation_split)
    if len(pool) == 0:
        raise BadRecordError("pool", 0, "*", "the pool is empty")
    model, tokenizer = load_model_and_tokenizer(model_args, sft.trust_remote_code)
    peft_config = get_peft_config(model_args)

    warm_args = dataclasses.replace(sft, output_dir=str(out / "warmup"), save_strategy="epoch", save_only_model=False)
    # Everything the warm-up checkpoints depend on: a resumed warm-up must be the same warm-up.
    run_config = {"model_name_or_path": model_args.model_name_or_path, "lora_r": model_args.lora_r,
                  "lora_alpha": model_args.lora_alpha, "lora_target_modules": model_args.lora_target_modules,
                  "lora_dropout": model_args.lora_dropout, "warmup_fraction": rose.warmup_fraction,
                  "learning_rate": sft.learning_rate, "lr_scheduler_type": str(sft.lr_scheduler_type),
                  "per_device_train_batch_size": sft.per_device_train_batch_size,
                  "gradient_accumulation_steps": sft.gradient_accumulation_steps,
                  "num_train_epochs": sft.num_train_epochs, "seed": sft.seed, "max_length": sft.max_length}
    callback = ROSECallback(pool, validation, tokenizer, rose, output_dir=str(out), max_length=sft.max_length,
                            run_config=run_config)
    # Check the data and any earlier run in output_dir before the warm-up resumes from its checkpoints.
    if callback.ensure_selector(warm_args).cleared_previous_run:
        for stale in ("warmup", "final", "selection"):
            shutil.rmtree(out / stale, ignore_errors=True)
    warm = sft_training_dataset(pool.select(warmup_indices(len(pool), rose.warmup_fraction, sft.seed)), tokenizer,
                                sft.max_length, "warm-up pool")
    trainer = SFTTrainer(model, args=warm_args, train_dataset=warm, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[callback])
    # A re-run resumes the warm-up from its last checkpoint; finished gradient stores are reused.
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(warm_args.output_dir))
    selection = Path(callback.selection_dir or out / "selection")
    result = {"selection": str(selection), "final_model": None}
    if rose.final_training:
        final_model, _ = load_model_and_tokenizer(model_args, sft.trust_remote_code)
        final_args = dataclasses.replace(sft, output_dir=str(out / "final"))
        selected = load_from_disk(str(selection / "selected"))
        final = SFTTrainer(final_model, args=final_args,
                           train_dataset=sft_training_dataset(selected, tokenizer, sft.max_length, "selection"),
                           processing_class=tokenizer, peft_config=get_peft_config(model_args))
        final.train(resume_from_checkpoint=last_complete_checkpoint(final_args.output_dir))
        save_model_atomically(final, final_args.output_dir)
        result["final_model"] = final_args.output_dir
    return result
