"""ROSESelector on an FSDP2-sharded (`fully_shard`) LoRA model, 2 gloo processes on the CPU: the same
scores as the unsharded model trained the same way in one process; and offline selection from the
checkpoints those 2 ranks save (accelerate's FSDP2 save functions, both state-dict types) gives them too.

accelerate 1.15 turns FSDP on only for multi-GPU process types, so this test shards the model itself
with torch's `fully_shard` (what accelerate's `fsdp_version: 2` calls per decoder layer). The LoRA
weights, and AdamW's m and v, are then DTensors split across the two ranks. tests/test_gpu.py runs
the Trainer + accelerate FSDP path on a GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from rose_trl import ROSEConfig, ROSESelector
from rose_trl.data import load_pool, load_preferences
from rose_trl.gradients.capture import AdamState, trainable_parameters
from rose_trl.data.sft import collate, tokenize_pool

mode, out = sys.argv[1], sys.argv[2]
state = PartialState(cpu=True)  # gloo under torchrun
tok = AutoTokenizer.from_pretrained("tiny/model")
pool, validation = load_pool("tiny/pool.jsonl"), load_preferences("tiny/validation.jsonl")
torch.manual_seed(0)
model = get_peft_model(AutoModelForCausalLM.from_pretrained("tiny/model"),
                       LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
if mode == "fsdp":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (state.num_processes,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
# The same 3 batches on every rank: the data-parallel mean gradient equals the one-process gradient.
rows = tokenize_pool(pool.select(range(12)), tok, 256).select_columns(["input_ids", "completion_mask"])
for step in range(3):
    batch = collate([rows[i] for i in range(4 * step, 4 * step + 4)], tok.pad_token_id)
    opt.zero_grad()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    opt.step()
opt.zero_grad(set_to_none=True)
lora = [p for n, p in model.named_parameters() if "lora_A" in n][0]
adam = AdamState.from_optimizer(opt, trainable_parameters(model))
selector = ROSESelector(pool, validation, tok, ROSEConfig(projection_dim=512, selection_fraction=0.25,
                        gradient_batch_size=6), out, max_length=256, use_cpu=True, progress=False)
selector.add_checkpoint(model, "checkpoint-3", 1e-2, adam)
still_clean = all(p.grad is None for _, p in trainable_parameters(model))
selector.finalize()
if mode == "fsdp":
    # Save checkpoint-3 as Trainer._save_checkpoint does under accelerate's FSDP2, in both state-dict types:
    # save_model (FULL only: the whole adapter through accelerator.get_state_dict), then save_fsdp_model
    # (adapter_only, as transformers asks) and save_fsdp_optimizer.
    import json
    from accelerate.utils import FullyShardedDataParallelPlugin, save_fsdp_model, save_fsdp_optimizer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        ckpt = f"{out}_{kind}/checkpoint-3"
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=kind)
        if kind == "FULL_STATE_DICT":
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
            full = get_model_state_dict(model, options=options)
            if state.is_main_process:
                model.save_pretrained(ckpt, state_dict=full)
        save_fsdp_model(plugin, state, model, ckpt, adapter_only=True)
        save_fsdp_optimizer(plugin, state, opt, model, ckpt)
        if state.is_main_process:
            history = [{"step": s, "learning_rate": 1e-2} for s in (1, 2, 3)]
            open(f"{ckpt}/trainer_state.json", "w").write(json.dumps({"global_step": 3, "log_history": history}))
        state.wait_for_everyone()
# Training goes on after the checkpoint, as in a warm-up: the model must still be usable.
batch = collate([rows[i] for i in range(4)], tok.pad_token_id)
model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
opt.step()
import os
local = tuple(lora.to_local().shape) if hasattr(lora, "to_local") else tuple(lora.shape)
os.write(1, f"rank {state.process_index} {type(lora).__name__} local {local} clean {still_clean}\\n".encode())
"""


def torchrun(nproc: int, mode: str, out: Path, cwd: Path) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + nproc + (7 if mode == "fsdp" else 0)),
        str(cwd / "fsdp_select.py"),
        mode,
        str(out),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


OFFLINE = """
import sys
from accelerate import PartialState
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from rose_trl import ROSEConfig, ROSESelector
from rose_trl.data import load_pool, load_preferences
from rose_trl.run.offline import select_from_checkpoints

PartialState(cpu=True)  # gloo under torchrun: the processes share the pool's extraction
tok = AutoTokenizer.from_pretrained("tiny/model")
selector = ROSESelector(load_pool("tiny/pool.jsonl"), load_preferences("tiny/validation.jsonl"), tok,
                        ROSEConfig(projection_dim=512, selection_fraction=0.25, gradient_batch_size=6),
                        sys.argv[2], max_length=256, use_cpu=True, progress=False)
select_from_checkpoints(sys.argv[1], AutoModelForCausalLM.from_pretrained("tiny/model"), selector,
                        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj"]))
"""


def offline(run: Path, out: Path, cwd: Path, nproc: int = 1) -> pd.DataFrame:
    """Offline selection from an FSDP2 run's checkpoints: one plain process, or `nproc` under torchrun."""
    (cwd / "offline.py").write_text(OFFLINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = (
        [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533"]
    )
    result = subprocess.run(
        [sys.executable, *launcher, str(cwd / "offline.py"), str(run), str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return pd.read_parquet(out / "selection/scores.parquet").sort_values("pool_index")


def test_fsdp2_sharded_lora_scores_like_one_process(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "tiny"), "--pool-size", "64"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    (tmp_path / "fsdp_select.py").write_text(SCRIPT)
    torchrun(1, "single", tmp_path / "single", tmp_path)
    out = torchrun(2, "fsdp", tmp_path / "fsdp", tmp_path)
    # Really sharded: the first lora_A (8 x 64) is split in two rows of 4 on each rank.
    assert out.count("DTensor local (4, 64) clean True") == 2, out
    single = pd.read_parquet(tmp_path / "single/selection/scores.parquet").sort_values("pool_index")
    fsdp = pd.read_parquet(tmp_path / "fsdp/selection/scores.parquet").sort_values("pool_index")
    np.testing.assert_allclose(fsdp["score"].to_numpy(), single["score"].to_numpy(), atol=1e-4)
    assert (fsdp["selected"].to_numpy() == single["selected"].to_numpy()).all()
    manifest = json.loads((tmp_path / "fsdp/rose/checkpoints.json").read_text())
    assert [c["name"] for c in manifest["checkpoints"]] == ["checkpoint-3"]

    # Offline mode reads the checkpoints the 2 ranks saved, in both FSDP2 layouts, into one process.
    sharded = tmp_path / "fsdp_SHARDED_STATE_DICT/checkpoint-3"
    assert {p.name for p in sharded.iterdir()} >= {"optimizer_0", "pytorch_model_fsdp_0"}
    assert len(list((sharded / "optimizer_0").glob("*.distcp"))) == 2  # one shard file per rank
    assert not (sharded / "adapter_config.json").exists()
    full = tmp_path / "fsdp_FULL_STATE_DICT/checkpoint-3"
    assert {p.name for p in full.iterdir()} >= {"optimizer.bin", "adapter_model.safetensors", "adapter_config.json"}
    reads = {}
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):
        read = reads[kind] = offline(tmp_path / f"fsdp_{kind}", tmp_path / f"offline_{kind}", tmp_path)
        np.testing.assert_allclose(read["score"].to_numpy(), fsdp["score"].to_numpy(), atol=1e-5)
        np.testing.assert_allclose(read["score"].to_numpy(), single["score"].to_numpy(), atol=1e-4)
        assert (read["selected"].to_numpy() == single["selected"].to_numpy()).all()
    # 2 processes sharing the offline extraction each read the sharded checkpoint whole, on their own.
    two = offline(tmp_path / "fsdp_SHARDED_STATE_DICT", tmp_path / "offline_2proc", tmp_path, nproc=2)
    np.testing.assert_array_equal(two["score"].to_numpy(), reads["SHARDED_STATE_DICT"]["score"].to_numpy())
