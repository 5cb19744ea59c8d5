"""`rose-trl plan` against the run it plans: bytes and stage times, per quantity.

    python benchmarks/speed/plan_accuracy.py --config recipes/tiny/rose/config_tiny.yaml --output_dir outputs/tiny/pa
    python benchmarks/speed/plan_accuracy.py --config recipes/smollm2-135m/rose/config_se.yaml \
        --output_dir outputs/smollm2/pa_se --json outputs/plan_accuracy_smollm2.json

1. `rose-trl plan --json --measure` with the same options, in a process of its own (its wall time is reported);
2. the recipe's run (recipes/rose_sft.py's `run`, one process), in a process of its own, its stages timed by
   wrapping the run's own functions (`stage_times`): setup (process start to the warm-up's first step: imports,
   data, tokenization, model, Trainer), warm-up training (the Trainer's steps and saves), pool gradients
   (`extract_pool_store`), validation gradients (`ValidationGradients.store`, its DPO trainer and reference pass
   included), selection (`ROSESelector.finalize`), final training (`train_final_model`: its model, steps and saves);
3. the bytes the run wrote (apparent sizes, as `du -sb`): the gradient stores (rose/), the warm-up checkpoints
   (warmup/), the final model (final/), selection/;
4. a markdown table: plan, real, plan / real - 1, per quantity.
output_dir must not exist (the real run starts from nothing). Wall times are this machine's: run it alone (the
project's measurements hold `flock -x` on the CPU lock and record the load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rose_trl.run.timing import STAGES  # setup, warm-up training, ..., final training


def apparent_bytes(path: Path) -> int:
    """Bytes of `path` as `du -sb` counts them: every file's size and every folder's entry."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return path.stat().st_size + sum(apparent_bytes(p) for p in path.iterdir())


def stage_times(recipe_args: list[str], out_json: str) -> None:
    """Run the recipe in this process, its stages timed by wrapping the run's own functions; write the times."""
    import psutil

    started = psutil.Process().create_time()
    import rose_trl.run.pipeline as pipeline
    import rose_trl.run.selector as selector_module
    from rose_trl.run.selector import ROSESelector
    from rose_trl.stores.validation import ValidationGradients

    spent = dict.fromkeys(STAGES, 0.0)
    marks = {}

    def timed(owner, name, stage, first_call=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t = time.time()
            if first_call and first_call not in marks:
                marks[first_call] = t
            try:
                return original(*args, **kwargs)
            finally:
                spent[stage] += time.time() - t

        setattr(owner, name, wrapper)

    timed(selector_module, "extract_pool_store", "pool gradients")
    timed(ValidationGradients, "store", "validation gradients")
    timed(ROSESelector, "finalize", "selection")
    timed(pipeline, "train_final_model", "final training")
    import trl

    original_train = trl.SFTTrainer.train
    calls = []

    def train(self, *args, **kwargs):
        t = time.time()
        calls.append(t)
        try:
            return original_train(self, *args, **kwargs)
        finally:
            if len(calls) == 1:  # the warm-up's: extraction runs inside it (the callback's on_save)
                marks["warm-up end"] = time.time()
                marks["warm-up start"] = t

    trl.SFTTrainer.train = train
    rose, sft, model_args = pipeline.recipe_parser().parse_args_and_config(args=recipe_args)
    pipeline.run(rose, sft, model_args)
    end = time.time()
    warm = marks.get("warm-up end", end) - marks.get("warm-up start", end)
    spent["warm-up training"] = warm - spent["pool gradients"] - spent["validation gradients"]
    spent["setup"] = marks.get("warm-up start", end) - started
    Path(out_json).write_text(json.dumps({"stages": spent, "total": end - started}))


def measured_run(recipe_args: list[str], tmp: Path) -> dict:
    out = tmp / "real_times.json"
    t = time.time()
    subprocess.run(
        [sys.executable, __file__, "--stage-times", str(out), *recipe_args],
        check=True,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[2]))},
    )
    times = json.loads(out.read_text())
    times["command_wall"] = time.time() - t
    return times


def the_plan(recipe_args: list[str], measure: bool) -> dict:
    t = time.time()
    command = [sys.executable, "-m", "rose_trl.cli", "plan", "--json", *(["--measure"] if measure else [])]
    done = subprocess.run([*command, *recipe_args], check=True, capture_output=True, text=True)
    plan = json.loads(done.stdout)
    plan["command_wall"] = time.time() - t
    return plan


def compare(plan: dict, real: dict, output_dir: Path) -> list[dict]:
    rows = []

    def row(quantity, planned, actual, unit):
        ratio = planned / actual - 1 if actual else None
        rows.append({"quantity": quantity, "plan": planned, "real": actual, "unit": unit, "error": ratio})

    final = Path(plan["final_training"]["output_dir"]) if plan.get("final_training") else output_dir / "final"
    row("store_bytes (rose/)", plan["store_bytes"]["total"], apparent_bytes(output_dir / "rose"), "bytes")
    row(
        "warmup_checkpoint_bytes (warmup/)",
        plan["warmup_checkpoint_bytes"]["total"],
        apparent_bytes(output_dir / "warmup"),
        "bytes",
    )
    row("final_model_bytes (final/)", plan["final_model_bytes"]["total"], apparent_bytes(final), "bytes")
    row("selection_bytes (selection/)", plan["selection_bytes"], apparent_bytes(output_dir / "selection"), "bytes")
    row("total bytes (output_dir)", plan["total_bytes"], apparent_bytes(output_dir), "bytes")
    if plan.get("time"):
        for stage in STAGES:
            row(f"time: {stage}", plan["time"]["stages"].get(stage, 0.0), real["stages"][stage], "s")
        row("time: total", plan["time"]["total"], real["total"], "s")
    return rows


def write_shape(shape: str, tokenizer_from: Path, folder: Path) -> Path:
    """A model folder of one of benchmarks/common.py's shapes, without weights: its config.json, and a tokenizer
    (another model's, a stand-in: nothing is downloaded) for the plan's tokenization."""
    from transformers import AutoTokenizer, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import SHAPES

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**SHAPES[shape], max_position_embeddings=4096).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def adapter_and_optimizer_files(folder: Path, lora_r: int, alpha: int, targets: list[str], out: Path) -> dict:
    """What a checkpoint of `folder`'s model holds of its own, written for real: the LoRA adapter saved by PEFT
    (adapter_model.safetensors, adapter_config.json) and AdamW's state after one step saved by torch.save
    (optimizer.pt), on a model whose base weights stay on the meta device (no memory, no file: only the adapter
    is real). -> file name -> bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=alpha, lora_dropout=0.1, target_modules=targets))
    params = []
    for module in model.modules():
        for attr in ("lora_A", "lora_B"):
            inner = getattr(module, attr, None)
            if isinstance(inner, torch.nn.ModuleDict) and "default" in inner:
                layer = inner["default"]
                layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape))
                params.append(layer.weight)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    return {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}


def markdown(rows: list[dict]) -> str:
    lines = ["| quantity | plan | real | plan / real - 1 |", "|---|---|---|---|"]
    for r in rows:
        fmt = (lambda v: f"{v:,}") if r["unit"] == "bytes" else (lambda v: f"{v:.1f} s")
        error = "-" if r["error"] is None else f"{r['error']:+.1%}"
        lines.append(f"| {r['quantity']} | {fmt(r['plan'])} | {fmt(r['real'])} | {error} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--stage-times":
        stage_times(argv[2:], argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the recipe's YAML")
    p.add_argument("--json", type=Path, default=None, help="also write the plan, the real figures and the table here")
    p.add_argument("--no-measure", action="store_true", help="bytes only: no --measure, no stage times compared")
    p.add_argument(
        "--shape",
        default=None,
        help="bytes only, for a model of this benchmarks/common.py shape (e.g. llama-2-7b) that cannot run here: "
        "its folder is written (config and a stand-in tokenizer, --tokenizer-from) as --shape-dir, the plan made "
        "with it, and a checkpoint's adapter and AdamW files written for real to compare",
    )
    p.add_argument("--shape-dir", type=Path, default=Path("outputs/shape_model"))
    p.add_argument("--tokenizer-from", type=Path, default=Path("outputs/smollm2/model"))
    args, rest = p.parse_known_args(argv)
    recipe_args = ["--config", args.config, *rest]
    if args.shape:
        return shape_bytes(args, recipe_args)
    plan = the_plan(recipe_args, not args.no_measure)
    output_dir = Path(plan["recipe"]["output_dir"])
    if output_dir.exists():
        p.error(f"{output_dir} exists: the real run must start from nothing (give another --output_dir)")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"plan_accuracy_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    real = measured_run(recipe_args, tmp)
    rows = compare(plan, real, output_dir)
    load = os.getloadavg()
    print(f"plan command: {plan['command_wall']:.1f} s wall; run: {real['command_wall']:.1f} s wall; load {load}")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "real": real, "rows": rows, "load": load}, indent=1))
    return 0


def shape_bytes(args, recipe_args: list[str]) -> int:
    """--shape: the plan's checkpoint and final-model files of a model that cannot run here, against the adapter
    and optimizer files written for real."""
    folder = write_shape(args.shape, args.tokenizer_from, args.shape_dir)
    plan = the_plan([*recipe_args, "--model_name_or_path", str(folder)], measure=False)
    files = plan["warmup_checkpoint_bytes"]["files"]
    config = plan["recipe"]
    import yaml

    recipe = yaml.safe_load(Path(args.config).read_text())
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"plan_shape_{os.getpid()}"
    real = adapter_and_optimizer_files(
        folder, recipe["lora_r"], recipe["lora_alpha"], recipe["lora_target_modules"], tmp
    )
    rows = []
    for name in ("adapter_model.safetensors", "optimizer.pt", "adapter_config.json"):
        rows.append({"quantity": name, "plan": files[name], "real": real[name], "unit": "bytes",
                     "error": files[name] / real[name] - 1})  # fmt: skip
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.shape} ({config['model']}), {plan['recipe']['processes']} process(es)")
    print(markdown(rows))
    print(
        f"plan: store_bytes {plan['store_bytes']['total']:,} ({plan['pool']['rows']} pool rows), a warm-up checkpoint "
        f"{plan['warmup_checkpoint_bytes']['per_checkpoint'][0]:,}, warmup_checkpoint_bytes "
        f"{plan['warmup_checkpoint_bytes']['total']:,}, final_model_bytes {plan['final_model_bytes']['total']:,}"
    )
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "real_files": real, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
