"""Sharded extraction: 2 gloo processes on the CPU give the same selection, row for row, as 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def launch(config_file: str, select_config: Path, output_dir: Path, cwd: Path) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config_file),
           str(ROOT / "recipes" / "rose_select.py"), "--config", str(select_config), "--output_dir", str(output_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_two_cpu_processes_select_exactly_like_one(tmp_path):
    subprocess.run([sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "outputs/tiny"), "--pool-size", "200"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    # A short warm-up (no selection) to select from.
    tiny = yaml.safe_load((ROOT / "recipes/tiny/rose/config_tiny.yaml").read_text())
    warm = tmp_path / "warm.py"
    warm.write_text(f"""
from trl import SFTConfig, SFTTrainer
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from rose_trl.data import load_pool
from rose_trl.pipeline import sft_training_dataset
tok = AutoTokenizer.from_pretrained("outputs/tiny/model")
pool = load_pool("outputs/tiny/pool.jsonl").select(range(40))
args = SFTConfig(output_dir="outputs/tiny/warmup", num_train_epochs=2, per_device_train_batch_size=8,
                 learning_rate={tiny['learning_rate']}, save_strategy="epoch", logging_steps=1, use_cpu=True, bf16=False,
                 gradient_checkpointing=False, report_to=[], max_length=256)
SFTTrainer(AutoModelForCausalLM.from_pretrained("outputs/tiny/model"), args=args,
           train_dataset=sft_training_dataset(pool, tok, 256, "warm-up"), processing_class=tok,
           peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
""")
    subprocess.run([sys.executable, str(warm)], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    config = yaml.safe_load((ROOT / "recipes/tiny/rose/select_tiny.yaml").read_text())
    config.update(warmup_dir="outputs/tiny/warmup", projection_dim=1024)
    select = tmp_path / "select.yaml"
    select.write_text(yaml.safe_dump(config))

    launch("cpu.yaml", select, tmp_path / "one", tmp_path)
    out = launch("multi_cpu.yaml", select, tmp_path / "two", tmp_path)
    assert out.count("selection:") == 2  # really two processes
    one = pd.read_parquet(tmp_path / "one/selection/scores.parquet")
    two = pd.read_parquet(tmp_path / "two/selection/scores.parquet")
    pd.testing.assert_frame_equal(one, two, check_exact=True)


def test_offline_mode_names_deepspeed_checkpoints(tmp_path):
    from rose_trl.offline import load_checkpoint_adam

    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    (ckpt / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="DeepSpeed checkpoint"):
        load_checkpoint_adam(ckpt, model=None)
    (ckpt / "global_step4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (ckpt / "global_step4").rmdir()
    with pytest.raises(FileNotFoundError, match="optimizer.pt is missing"):
        load_checkpoint_adam(ckpt, model=None)
