"""Sharded extraction: 2 gloo processes on the CPU give the same selection, row for row, as 1 process."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml


ROOT = Path(__file__).resolve().parents[1]


def launch(config_file: str, select_config: Path, output_dir: Path, cwd: Path) -> str:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config_file),
        str(ROOT / "recipes" / "rose_select.py"),
        "--config",
        str(select_config),
        "--output_dir",
        str(output_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_two_cpu_processes_select_exactly_like_one(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "outputs/tiny"), "--pool-size", "200"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # A short warm-up (no selection) to select from.
    tiny = yaml.safe_load((ROOT / "recipes/tiny/rose/config_tiny.yaml").read_text())
    warm = tmp_path / "warm.py"
    warm.write_text(f"""
from trl import SFTConfig, SFTTrainer
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from rose_trl.data import load_pool
from rose_trl.run.pipeline import sft_training_dataset
tok = AutoTokenizer.from_pretrained("outputs/tiny/model")
pool = load_pool("outputs/tiny/pool.jsonl").select(range(40))
args = SFTConfig(output_dir="outputs/tiny/warmup", num_train_epochs=2, per_device_train_batch_size=8,
                 learning_rate={tiny["learning_rate"]}, save_strategy="epoch", logging_steps=1, use_cpu=True,
                 bf16=False, gradient_checkpointing=False, report_to=[], max_length=256)
SFTTrainer(AutoModelForCausalLM.from_pretrained("outputs/tiny/model"), args=args,
           train_dataset=sft_training_dataset(pool, tok, 256, "warm-up"), processing_class=tok,
           peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).train()
""")
    subprocess.run(
        [sys.executable, str(warm)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
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


def test_offline_mode_names_missing_optimizer_state(tmp_path):
    from rose_trl.run.offline import load_checkpoint_adam
    from tests.helpers import tiny_lora_model

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    with pytest.raises(FileNotFoundError, match="optimizer.pt is missing"):
        load_checkpoint_adam(ckpt, tiny_lora_model())


class _NotAllowed:  # stands for any object a crafted checkpoint could smuggle in
    pass


def test_deepspeed_optimizer_files_are_read_without_running_code(tmp_path):
    # DeepSpeed checkpoints themselves are read in tests/test_deepspeed.py (slow); here: a file holding
    # an object outside the allow-list is refused, not unpickled.
    pytest.importorskip("deepspeed")
    from rose_trl.checkpoints.zero import ZeroCheckpointError, _load_deepspeed_file

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": _NotAllowed()}}, path)
    with pytest.raises(ZeroCheckpointError, match="outside the allowed DeepSpeed types"):
        _load_deepspeed_file(path, "optimizer file")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_deepspeed_model_state_files_cannot_run_code(tmp_path):
    # DeepSpeed's own zero_to_fp32.parse_model_states unpickles these with weights_only=False; ours does not.
    pytest.importorskip("deepspeed")
    from rose_trl.checkpoints.zero import ZeroCheckpointError, read_zero_adam_moments

    marker = tmp_path / "ran"
    ds_dir = tmp_path / "global_step4"
    ds_dir.mkdir()
    torch.save(
        {"buffer_names": [], "param_shapes": [], "module": {}, "x": _RunsCode(marker)},
        ds_dir / "mp_rank_00_model_states.pt",
    )
    with pytest.raises(ZeroCheckpointError, match="model-state file"):
        read_zero_adam_moments(ds_dir)
    assert not marker.exists()
