"""ROSECallback under DeepSpeed ZeRO-2 and ZeRO-3 (2 gloo processes on the CPU) selects what it selects
under plain data parallelism: same warm-up, same data order, so the same scores up to float rounding.

Needs the `deepspeed` extra (`pip install -e ".[deepspeed]"`); skipped without it.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install -e '.[deepspeed]')",
    ),
]

WARMUP = """
import os
import sys
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from rose_trl import ROSECallback, ROSEConfig
from rose_trl.data import load_pool, load_preferences
from rose_trl.run.pipeline import sft_training_dataset

deepspeed = sys.argv[1] == "deepspeed"
# ROSE_TEST_GPU=1 (tests/test_gpu.py): the same run on CUDA, nccl chosen by accelerate.
on_gpu = os.environ.get("ROSE_TEST_GPU") == "1"
# gradient_batch_size 6: 64 rows make 11 batches, so under ZeRO-3 one rank runs a discarded pass.
tok = AutoTokenizer.from_pretrained("tiny/model")
pool, validation = load_pool("tiny/pool.jsonl"), load_preferences("tiny/validation.jsonl")
# DeepSpeed on a CPU machine: use_cpu would turn DeepSpeed off in accelerate, so the CPU is reached
# through the gloo backend instead (docs/guides/multi_gpu.md).
args = SFTConfig(output_dir=sys.argv[2], num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3,
                 save_strategy="epoch", logging_steps=1, use_cpu=not (deepspeed or on_gpu),
                 ddp_backend="gloo" if deepspeed and not on_gpu else None,
                 bf16=os.environ.get("ROSE_TEST_BF16") == "1", gradient_checkpointing=False, report_to=[],
                 max_length=256, disable_tqdm=True, seed=0)
# sjlt named, so that the runs compare the same matrix whatever the default becomes.
callback = ROSECallback(pool, validation, tok, ROSEConfig(projection_type="sjlt", projection_dim=512,
                                                          selection_fraction=0.25, gradient_batch_size=6))
trainer = SFTTrainer(AutoModelForCausalLM.from_pretrained("tiny/model"), args=args,
                     train_dataset=sft_training_dataset(pool.select(range(32)), tok, 256, "warm-up"),
                     processing_class=tok, callbacks=[callback],
                     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
trainer.train()
lora = [p for n, p in trainer.model.named_parameters() if "lora_A" in n][0]
# One write(2) of a short line is atomic on a pipe: the two ranks' lines cannot interleave.
os.write(1, f"lora_numel {lora.numel()} {getattr(lora, 'ds_numel', None)} steps {trainer.state.global_step} "
            f"{type(lora).__name__}\\n".encode())
"""


def launch(
    config: Path, mode: str, output_dir: Path, cwd: Path, *launch_args: str, gpu: bool = False, bf16: bool = False
) -> str:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        *launch_args,
        str(cwd / "warmup.py"),
        mode,
        str(output_dir),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.update({"ROSE_TEST_GPU": "1"} if gpu else {"DS_ACCELERATOR": "cpu"})
    env.update({"ROSE_TEST_BF16": "1"} if bf16 else {})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


OFFLINE = """
import sys
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from rose_trl import ROSEConfig, ROSESelector
from rose_trl.data import load_pool, load_preferences
from rose_trl.run.offline import select_from_checkpoints

tok = AutoTokenizer.from_pretrained("tiny/model")
selector = ROSESelector(load_pool("tiny/pool.jsonl"), load_preferences("tiny/validation.jsonl"), tok,
                        ROSEConfig(projection_type="sjlt", projection_dim=512, selection_fraction=0.25,
                                   gradient_batch_size=6),
                        sys.argv[2], max_length=256, use_cpu=True, progress=False)
# peft_config: the warm-up's, for checkpoints saved without adapter_config.json (FSDP2 SHARDED_STATE_DICT).
select_from_checkpoints(sys.argv[1], AutoModelForCausalLM.from_pretrained("tiny/model"), selector,
                        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
"""


def offline_scores(run: Path, cwd: Path) -> pd.DataFrame:
    """Offline selection from the run's DeepSpeed (global_step*/) or FSDP2 checkpoints, one CPU process."""
    (cwd / "offline.py").write_text(OFFLINE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [sys.executable, str(cwd / "offline.py"), str(run), str(run) + "_offline"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return scores(Path(str(run) + "_offline"))


def scores(output_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(output_dir / "selection/scores.parquet").sort_values("pool_index").reset_index(drop=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp / "tiny"), "--pool-size", "64"],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    (tmp / "warmup.py").write_text(WARMUP)
    out = launch(ROOT / "accelerate_configs/multi_cpu.yaml", "ddp", tmp / "ddp", tmp)
    assert out.count("steps 8") == 2  # two processes, 32 rows / (4 x 2) x 2 epochs
    return tmp


def test_zero2_selects_like_ddp(workdir):
    out = launch(ROOT / "accelerate_configs/deepspeed_zero2.yaml", "deepspeed", workdir / "zero2", workdir)
    assert out.count("steps 8") == 2
    ddp, zero2 = scores(workdir / "ddp"), scores(workdir / "zero2")
    np.testing.assert_allclose(zero2["score"], ddp["score"], atol=1e-4)
    assert (zero2["selected"] == ddp["selected"]).all()
    # Offline mode on the same run: m and v reassembled from the per-rank ZeRO-2 optimizer files.
    offline = offline_scores(workdir / "zero2", workdir)
    for column in ("score_ckpt0", "score_ckpt1"):
        np.testing.assert_allclose(offline[column], zero2[column], atol=1e-5)
    assert (offline["selected"] == zero2["selected"]).all()
    # A rank's optimizer file missing: refused, naming the counts, rather than misaligned moments.
    from rose_trl.checkpoints.zero import ZeroCheckpointError, read_zero_adam_moments, zero_checkpoint_dir

    broken = workdir / "broken-checkpoint"
    shutil.copytree(workdir / "zero2" / "checkpoint-8", broken)
    next(broken.glob("global_step*/zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ZeroCheckpointError, match="written by 2 ranks but holds 1 optimizer files"):
        read_zero_adam_moments(zero_checkpoint_dir(broken))


def test_zero3_partitioned_lora_selects_like_ddp(workdir):
    # Persistence threshold 0: ZeRO-3 would otherwise keep parameters this small whole on every rank,
    # and the partitioned path (numel 0, gathered by hooks) would go untested.
    ds_config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 1.0,
        "gradient_accumulation_steps": 1,
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    (workdir / "zero3.json").write_text(json.dumps(ds_config))
    config = yaml.safe_load((ROOT / "accelerate_configs/deepspeed_zero3.yaml").read_text())
    config["deepspeed_config"] = {"deepspeed_config_file": str(workdir / "zero3.json"), "zero3_init_flag": False}
    config.pop("mixed_precision")  # taken from the DeepSpeed file when one is given
    (workdir / "zero3.yaml").write_text(yaml.safe_dump(config))
    out = launch(workdir / "zero3.yaml", "deepspeed", workdir / "zero3", workdir)
    assert out.count("lora_numel 0 ") == 2  # really partitioned on both ranks
    ddp, zero3 = scores(workdir / "ddp"), scores(workdir / "zero3")
    np.testing.assert_allclose(zero3["score"], ddp["score"], atol=1e-4)
    assert (zero3["selected"] == ddp["selected"]).all()
    offline = offline_scores(workdir / "zero3", workdir)  # each parameter split across the ranks' files
    for column in ("score_ckpt0", "score_ckpt1"):
        np.testing.assert_allclose(offline[column], zero3[column], atol=1e-5)
    assert (offline["selected"] == zero3["selected"]).all()
