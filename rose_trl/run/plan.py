"""`rose-trl plan`: what a run will do and need, before it does anything.

    rose-trl plan --config recipes/tiny/rose/config_tiny.yaml [--json] [--measure] [recipe options...]

The recipe's own options (recipes/rose_sft.py's parser, `pipeline.recipe_parser`) give the run; the plan is made
by the run's own code from its config and tokenizer, without loading the weights (the model's shape comes from
its config, its modules from a meta-device copy): the pool and the preference pairs as the run reads and tokenizes
them (`load_datasets`, `tokenize_pool`, TRL's preference tokenization), the warm-up's rows and optimizer steps as
the Trainer counts them, the gradient passes as the run's memory plan sizes them (`budget.plan_shape_passes`, the
function the run's own plan calls), the bytes of every store (`store_bytes`, which the run checks the disk with)
and of what the Trainer writes (`checkpoints.sizes`), and the free disk where each goes. With `--measure` a few
real passes are timed on this machine (`timing.py`). Nothing is written under output_dir: a plan leaves no trace.

`make_plan` returns one JSON-able dict whose keys are `PLAN_KEYS`; `format_plan` prints it for a person.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from rose_trl.checkpoints import sizes
from rose_trl.config import BASELINE_METHODS, ROSEConfig
from rose_trl.data.sft import tokenize_pool, tokenize_sft_example
from rose_trl.gradients.projection import projects_slices
from rose_trl.models.final_model import check_model, meta_model, model_specs
from rose_trl.models.source import model_source
from rose_trl.resources.budget import MemoryBudget, plan_shape_passes, resident_bytes
from rose_trl.resources.disk import free_bytes, nearest_existing
from rose_trl.resources.memory import LoraShape, ModelShape, dtype_bytes, gradient_bytes_per_row
from rose_trl.resources.training_memory import training_peak
from rose_trl.run.pipeline import load_datasets, warmup_indices
from rose_trl.run.selector import with_subtasks
from rose_trl.scoring.scores import selection_size
from rose_trl.stores.extraction import plan_batches, rows_for_budget
from rose_trl.stores.store import store_bytes
from rose_trl.stores.validation import (
    PAIR_COUPLED_LOSSES,
    ValidationGradients,
    preference_batch,
    validation_dpo_config,
)


PLAN_KEYS = (
    "recipe",
    "pool",
    "validation",
    "warmup",
    "gradient_passes",
    "store_bytes",
    "warmup_checkpoint_bytes",
    "final_training",
    "final_model_bytes",
    "selection_bytes",
    "total_bytes",
    "memory",
    "disk",
    "examples",
    "time",
    "notes",
)
# rose/run.json, checkpoints.json and step_lrs.json (about 40 bytes a warm-up step), and the empty rose/dpo/ folder.
LEDGER_BYTES = 2_000 + sizes.FOLDER_BYTES
RECORD_BYTES = 600  # the final model's rose_final.json


def schedule(rows: int, args, processes: int = 1, save_strategy: str | None = None) -> dict:
    """A Trainer's training over `rows` rows as it counts it (Trainer.set_initial_training_values): each process
    takes ceil(batches / processes) of the per-device batches (accelerate's even batches), an optimizer step every
    gradient_accumulation_steps of them (and one for an epoch's remainder); and the checkpoints it saves."""
    batches = math.ceil(rows / args.per_device_train_batch_size)
    per_process = math.ceil(batches / processes)
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(per_process // accumulation + int(per_process % accumulation > 0), 1)
    if args.max_steps > 0:
        steps, epochs = args.max_steps, math.ceil(args.max_steps / per_epoch)
    else:
        steps, epochs = math.ceil(args.num_train_epochs * per_epoch), math.ceil(args.num_train_epochs)
    strategy = save_strategy or str(getattr(args.save_strategy, "value", args.save_strategy))
    if strategy == "epoch":
        saved = sorted({min(per_epoch * e, steps) for e in range(1, epochs + 1)})
    elif strategy in ("steps", "best"):
        every = int(args.save_steps if args.save_steps >= 1 else math.ceil(steps * args.save_steps))
        saved = sorted(set(range(every, steps + 1, every)) | {steps})
    else:
        saved = []
    if args.save_total_limit:
        saved = saved[-args.save_total_limit :]  # the Trainer deletes the older ones
    return {
        "rows": rows,
        "per_device_batch": args.per_device_train_batch_size,
        "gradient_accumulation_steps": accumulation,
        "processes": processes,
        "effective_batch": args.per_device_train_batch_size * accumulation * processes,
        "micro_batches_per_epoch": per_process,
        "steps_per_epoch": per_epoch,
        "epochs": epochs,
        "optimizer_steps": steps,
        "checkpoints": [f"checkpoint-{s}" for s in saved],
    }


def _source_config(spec):
    from transformers import AutoConfig

    source = model_source(spec.model_args, spec.gguf_file)
    revision = None if source.record else spec.model_args.model_revision
    return AutoConfig.from_pretrained(source.path, revision=revision, trust_remote_code=spec.sft.trust_remote_code)


def _dtype(model_args, config) -> torch.dtype:
    """The dtype the run loads the weights in (from_pretrained's `dtype`: "auto" is the config's)."""
    name = model_args.dtype
    if name in (None, "auto"):
        name = getattr(config, "dtype", None) if name == "auto" else None
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name).replace("torch.", "")) if name else torch.float32


def _segments(ids: list[int], mask: list[int], tokenizer) -> list[dict]:
    """Consecutive runs of tokens with the same mask, decoded: [{"text", "loss"}]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append({"text": tokenizer.decode(ids[start:i]), "loss": bool(mask[start])})
            start = i
    return out


def rendered(ids: list[int], mask: list[int], tokenizer) -> dict:
    """A row as the model sees it: its text by runs of loss-carrying and other tokens, and per token its id, its
    text and whether the loss reads it (`loss_mask`)."""
    ids, mask = [int(t) for t in ids], [int(bool(m)) for m in mask]
    return {
        "tokens": len(ids),
        "loss_tokens": int(sum(mask)),
        "segments": _segments(ids, mask, tokenizer),
        "token_ids": ids,
        "token_text": [tokenizer.decode([t]) for t in ids],
        "loss_mask": mask,
    }


def examples(pool_row: dict, validation, tokenizer, rose: ROSEConfig, max_length: int | None, dpo_dir: str) -> dict:
    """The first pool row and the first preference pair as the passes feed them to the model, loss tokens marked:
    the pool row by the run's SFT tokenization (the warm-up's and the pool gradients' labels), the pair by TRL's
    preference tokenization and collator (the DPO loss's completion mask) or, for LESS, as an SFT row."""
    row = tokenize_sft_example(pool_row, tokenizer, max_length, source="pool", index=0)
    out = {"pool_row": rendered(row["input_ids"], row["completion_mask"], tokenizer)}
    first = validation[0]
    if rose.selection_method == "rose":
        config = validation_dpo_config(
            dpo_dir, beta=rose.validation_beta, batch_size=1, max_length=max_length, use_cpu=True
        )
        batch = preference_batch(validation, tokenizer, config, rows=[0])
        pair = {}
        for name, r in (("chosen", 0), ("rejected", 1)):
            keep = batch["attention_mask"][r].bool()
            pair[name] = rendered(
                batch["input_ids"][r][keep].tolist(), batch["completion_mask"][r][keep].tolist(), tokenizer
            )
        out["preference_pair"] = {"subtask": first.get("subtask"), "loss": "dpo", **pair}
    else:
        sft_row = (
            {"prompt": first["prompt"], "completion": first["chosen"]}
            if isinstance(first["prompt"], str)
            else {"messages": first["prompt"] + first["chosen"]}
        )
        chosen = tokenize_sft_example(sft_row, tokenizer, max_length, source="validation", index=0)
        out["preference_pair"] = {
            "subtask": first.get("subtask"),
            "loss": "sft (LESS: the prompt and the chosen answer)",
            "chosen": rendered(chosen["input_ids"], chosen["completion_mask"], tokenizer),
        }
    return out


def _destination(path: Path, needed: int) -> dict:
    where = nearest_existing(path)
    free = free_bytes(where)
    if not Path(path).is_absolute() and where.is_relative_to(Path.cwd()):  # shown as the user wrote it
        where = where.relative_to(Path.cwd())
    return {"path": str(path), "nearest_existing": str(where), "needed": int(needed), "free": int(free)}


def disk_plan(destinations: dict[str, tuple[Path, int]]) -> dict:
    """Per destination: its path, its nearest existing folder, the bytes it needs and the bytes free there; and per
    filesystem, whether everything that goes on it fits."""
    out = {name: _destination(path, needed) for name, (path, needed) in destinations.items()}
    devices: dict[int, dict] = {}
    for name, d in out.items():
        dev = os.stat(d["nearest_existing"]).st_dev
        entry = devices.setdefault(dev, {"destinations": [], "needed": 0, "free": d["free"]})
        entry["destinations"].append(name)
        entry["needed"] += d["needed"]
    filesystems = [{**e, "fits": e["needed"] <= e["free"]} for e in devices.values()]
    return {"destinations": out, "filesystems": filesystems, "fits": all(f["fits"] for f in filesystems)}


def _model_side(spec, tokenizer, rows: int, processes: int, save_strategy: str | None, args) -> dict:
    """The Trainer's side of one training: its schedule, its trained tensors (from a meta-device copy of the model),
    one saved model folder and its checkpoints' files."""
    from trl import get_peft_config

    config = _source_config(spec)
    dtype = _dtype(spec.model_args, config)
    m = spec.model_args
    lora_r = m.lora_r if m.use_peft else None
    tensors = sizes.trained_tensors(meta_model(config, spec.sft.trust_remote_code), m.lora_target_modules, lora_r)
    peft = get_peft_config(m)
    plan = schedule(rows, args, processes, save_strategy)
    saved = sizes.model_files(tensors, dtype, peft.to_dict() if peft else None, sizes.tokenizer_files(tokenizer), args)
    moments = torch.float32 if m.use_peft else dtype
    checkpoints = [
        sizes.checkpoint_files(saved, tensors, moments, args, int(c.split("-")[1]), plan["optimizer_steps"], processes)
        for c in plan["checkpoints"]
    ]
    return {"config": config, "dtype": dtype, "schedule": plan, "model": saved, "checkpoints": checkpoints}


def _memory(rose, sft, model_args, config, dtype, lengths, warm_width, val_width, final_side, processes) -> dict:
    """The run's memory plan for its passes (budget.plan_shape_passes, the function the run's plan calls), from the
    model's shape: each kind of pass's rows and estimated peak, and the Trainer's steps' peaks."""
    device = "cuda" if torch.cuda.is_available() and not sft.use_cpu else "cpu"
    budget = MemoryBudget.for_device(rose.memory_budget_gb, device, processes)
    shape, lora = ModelShape.from_config(config), LoraShape.from_model_args(model_args)
    adapter = lora.parameters(shape)
    # What the process holds when the passes run: this process's memory now (interpreter, libraries, tokenizer,
    # datasets) on a CPU, the weights, the adapter, and AdamW's moments and the projection plan (the estimate's
    # resident parts).
    base = (resident_bytes() if device == "cpu" else 0) + shape.parameters * dtype_bytes(dtype) + adapter * 4
    fused = projects_slices(rose.projection_type, adapter, rose.projection_dim)
    gradient_rows = rows_for_budget(
        gradient_bytes_per_row(adapter, lora.largest_matrix(shape), rose.projection_dim, fused),
        rose.gradient_batch_size,
        rose.gradient_memory_gb,
    )
    plan = plan_shape_passes(
        shape,
        lora,
        dtype,
        budget,
        device=device,
        resident=base + adapter * (8 + 20),
        compact=False,
        pool_width=int(lengths.max()),
        validation_width=val_width,
        gradient_rows=gradient_rows,
        max_batch_tokens=rose.max_batch_tokens,
        validation_pairs=rose.validation_batch_size,
        dim=rose.projection_dim,
        fused=fused,
    )
    options = dict(gradient_checkpointing=bool(sft.gradient_checkpointing))
    peaks = {
        kind: int(plan.resident + plan.slack * p.estimate.transient)
        for kind, p in (
            ("pool gradient pass", plan.passes["gradient"]),
            ("validation pass", plan.passes.get("validation")),
        )
        if p is not None
    }
    peaks["warm-up step"] = training_peak(
        shape, lora, dtype, sft.per_device_train_batch_size, warm_width, base, budget, device, **options
    )[0]
    if final_side is not None:  # the final model's Trainer step, on its own shape (another model: ROSE-T)
        final_shape = ModelShape.from_config(final_side["config"])
        fm = final_side["spec"].model_args
        final_lora = LoraShape.from_model_args(fm) if fm.use_peft else LoraShape(r=0, targets=())
        final_base = (resident_bytes() if device == "cpu" else 0) + final_shape.parameters * dtype_bytes(
            final_side["dtype"]
        )
        peaks["final training step"] = training_peak(
            final_shape,
            final_lora,
            final_side["dtype"],
            final_side["spec"].sft.per_device_train_batch_size,
            final_side["width"],
            final_base,
            budget,
            device,
            gradient_checkpointing=bool(final_side["spec"].sft.gradient_checkpointing),
        )[0]
    return {
        "device": device,
        "budget": budget.limit,
        "budget_source": budget.source,
        "resident_when_passes_run": plan.resident,
        "heap_slack": plan.slack,
        "fused_gradient_path": fused,
        "passes": plan.passes,
        "peaks": peaks,
        "over_budget": sorted(k for k, v in peaks.items() if v > budget.limit),
        "plan_text": plan.describe(),
    }


def make_plan(rose: ROSEConfig, sft, model_args, processes: int = 1, measure: bool = False) -> dict:
    """The run's plan (module docstring); `processes`: how many processes the run will be launched with."""
    if not model_args.use_peft:
        raise ValueError("ROSE extracts LoRA gradients: set use_peft: true (and lora_r, lora_target_modules)")
    out = Path(sft.output_dir)
    pool, validation = load_datasets(rose, sft.seed)
    validation = with_subtasks(validation)
    warm, final = model_specs(rose, sft, model_args)
    tokenizer = check_model(warm, pool, sft.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gradient = rose.selection_method not in BASELINE_METHODS
    started = time.time()
    tokens = tokenize_pool(pool, tokenizer, sft.max_length)
    prepared = {"ready": time.time(), "tokenize": time.time() - started}
    lengths = np.asarray([len(ids) for ids in tokens["input_ids"]])
    loss_tokens = int(sum(sum(m) for m in tokens["completion_mask"]))
    val = ValidationGradients(validation, tokenizer, rose, out / "rose", "", sft.max_length, True)
    dpo = val.kind == "dpo"
    val_width = val.longest() if gradient else None
    subtasks = dict(Counter(validation["subtask"]))
    plan = {
        "recipe": {
            "model": model_args.model_name_or_path,
            "selection_method": rose.selection_method,
            "output_dir": str(out),
            "output_dir_exists": out.exists(),
            "processes": processes,
            "max_length": sft.max_length,
        },
        "pool": {
            "dataset": rose.pool_dataset,
            "rows": len(pool),
            "tokens": int(lengths.sum()),
            "loss_tokens": loss_tokens,
            "longest": int(lengths.max()),
            "mean": float(lengths.mean()),
        },
        "validation": {
            "dataset": rose.validation_dataset,
            "pairs": len(validation),
            "subtasks": subtasks,
            "longest": val_width,
        },
    }
    # The warm-up (gradient methods): its rows, the Trainer's steps, its checkpoints and their files.
    warm_args = dataclasses.replace(
        sft, output_dir=str(out / "warmup"), save_strategy="epoch", save_only_model=False, push_to_hub=False
    )
    warm_rows = warmup_indices(len(pool), rose.warmup_fraction, sft.seed)
    warm_side = _model_side(warm, tokenizer, len(warm_rows), processes, "epoch", warm_args) if gradient else None
    checkpoints = warm_side["checkpoints"] if gradient else []
    plan["warmup"] = warm_side["schedule"] if gradient else None
    n_ckpt = len(checkpoints)
    # The final training: the selection's rows, the final model's own options (final_model), its folder.
    k = len(pool) if rose.selection_method == "full" else selection_size(len(pool), rose.selection_fraction)
    final_tokenizer = (
        check_model(final, pool, final.sft.trust_remote_code) if rose.final_training and final.block else tokenizer
    )
    final_args = dataclasses.replace(final.sft, output_dir=str(final.output_dir))
    final_side = _model_side(final, final_tokenizer, k, processes, None, final_args) if rose.final_training else None
    # The pool gradient passes and the validation passes as the run's memory plan sizes them.
    if gradient:
        warm_width = int(min(lengths[warm_rows].max(), sft.max_length or 10**9))
        final_info = final_side and {
            **final_side,
            "spec": final,
            "width": int(min(lengths.max(), final.sft.max_length or 10**9)),
        }
        memory = _memory(
            rose, sft, model_args, warm_side["config"], warm_side["dtype"], lengths, warm_width,
            val_width if dpo else None, final_info, processes,
        )  # fmt: skip
        passes = memory.pop("passes")
        g = passes["gradient"]
        batches = plan_batches(lengths, np.arange(len(pool)), g.rows, g.tokens)
        pairs_a_pass = (
            1 if dpo and PAIR_COUPLED_LOSSES & set(rose.validation_loss_type) else passes["validation"].rows
        ) if dpo else min(8, g.rows)  # fmt: skip
        plan["gradient_passes"] = {
            "checkpoints": n_ckpt,
            "pool": {
                "rows_a_pass": g.rows,
                "tokens_a_pass": g.tokens,
                "set_by": g.limit,
                "passes": len(batches),
                "passes_per_process": math.ceil(len(batches) / processes),
                "padded_tokens": int(sum(len(b) * lengths[b].max() for b in batches)),
                "estimated_peak": memory["peaks"]["pool gradient pass"],
            },
            "validation": {
                "loss": "dpo" if dpo else "sft",
                "pairs_a_pass": pairs_a_pass,
                "passes": math.ceil(len(validation) / pairs_a_pass),
                "head_tokens": passes["validation"].head_tokens if dpo else None,
                "estimated_peak": memory["peaks"].get("validation pass"),
            },
        }
    else:
        memory, plan["gradient_passes"] = None, None
    # Bytes: the stores (store_bytes, as the run checks its disk), the warm-up's checkpoints, the final model.
    dim, sdtype = rose.projection_dim, rose.store_dtype
    per_store = {"pool": store_bytes(len(pool), dim, sdtype), "validation": store_bytes(len(validation), dim, sdtype)}
    plan["store_bytes"] = {
        "pool_per_checkpoint": per_store["pool"],
        "validation_per_checkpoint": per_store["validation"],
        "checkpoints": n_ckpt,
        "total": n_ckpt * sum(per_store.values()) + (LEDGER_BYTES if gradient else 0),
    }
    plan["warmup_checkpoint_bytes"] = {
        "per_checkpoint": [c.bytes for c in checkpoints],
        "files": checkpoints[-1].files if checkpoints else {},
        "total": sum(c.bytes for c in checkpoints) + (sizes.FOLDER_BYTES + sizes.TOP_MODEL_CARD_BYTES) * bool(n_ckpt),
    }
    if final_side:
        final_ckpts = final_side["checkpoints"]
        plan["final_training"] = {**final_side["schedule"], "output_dir": str(final.output_dir)}
        plan["final_model_bytes"] = {
            "model": final_side["model"].bytes + RECORD_BYTES,
            "files": final_side["model"].files,
            "checkpoints": sum(c.bytes for c in final_ckpts),
            "total": final_side["model"].bytes + RECORD_BYTES + sum(c.bytes for c in final_ckpts),
        }
    else:
        plan["final_training"], plan["final_model_bytes"] = None, {"total": 0}
    plan["selection_bytes"] = selection_bytes(pool, k, len(subtasks), n_ckpt, len(validation))
    plan["total_bytes"] = (
        plan["store_bytes"]["total"]
        + plan["warmup_checkpoint_bytes"]["total"]
        + plan["final_model_bytes"]["total"]
        + plan["selection_bytes"]
    )
    run_side = plan["total_bytes"] - plan["final_model_bytes"]["total"]
    destinations = {"output_dir": (out, run_side)}
    if final_side:
        destinations["final model"] = (Path(final.output_dir), plan["final_model_bytes"]["total"])
    plan["disk"] = disk_plan(destinations)
    plan["memory"] = memory
    plan["examples"] = examples(pool[0], validation, tokenizer, rose, sft.max_length, str(out / "rose" / "dpo"))
    plan["time"] = None
    if measure:
        from rose_trl.run.timing import measure_run

        plan["_prepared"] = prepared
        plan["time"] = measure_run(rose, sft, model_args, plan, pool, validation, tokens, tokenizer, warm_rows)
    plan["notes"] = notes(plan)
    return {key: plan[key] for key in PLAN_KEYS}


def selection_bytes(pool, k: int, subtasks: int, checkpoints: int, pairs: int) -> int:
    """About what selection/ holds: the selected rows (their share of the pool's Arrow bytes), scores.parquet (a
    score per subtask and checkpoint per row), contributions.parquet (a value per selected row and pair), the
    JSON records. An estimate: parquet compresses."""
    rows = pool.data.nbytes * k / max(len(pool), 1)
    scores = len(pool) * 8 * (3 + subtasks + checkpoints)
    contributions = k * pairs * 8
    return int(rows + scores + contributions + 12_000 + 2 * sizes.FOLDER_BYTES)


def notes(plan: dict) -> list[str]:
    out = [
        "disk: the gradient stores' bytes are exact (store_bytes); the Trainer's files are counted from the model's "
        "shape and the arguments (the log history and the model card estimated); selection/ is an estimate",
        "memory: estimated from the model's shape (memory.py), not measured; the process's own memory is this "
        "process's now",
    ]
    if plan["recipe"]["output_dir_exists"]:
        out.append(
            f"{plan['recipe']['output_dir']} exists: a run reuses what matches in it (finished checkpoints, stores, "
            "a finished final model), so it may need less than this"
        )
    if plan["memory"] and plan["memory"]["over_budget"]:
        out.append(f"over the memory budget: {', '.join(plan['memory']['over_budget'])} (see memory)")
    if not plan["disk"]["fits"]:
        out.append("the disk does not hold what the run writes (see disk)")
    if plan["time"] is None:
        out.append("time: run with --measure to time a few real passes on this machine")
    return out
