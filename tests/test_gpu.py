"""What only a CUDA machine can check: per-example gradients and projections on the GPU, trak's
CudaProjector (fast_jl), and ROSECallback under DeepSpeed with nccl and bf16.

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`; skipped elsewhere (CI has no GPU).
docs/results/distributed.md records what it printed and where it ran.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rose_trl.gradients.capture import AdamState, per_example_gradients, trainable_parameters
from rose_trl.gradients.projection import SparseJLProjector, TrakProjector, build_projector
from tests.helpers import mixed_length_batch, tiny_lora_model
from tests.test_gradients import LENGTHS, PROMPTS, assert_rows_match, loop_reference


ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_fast_jl = pytest.mark.skipif(
    importlib.util.find_spec("fast_jl") is None,
    reason="fast_jl (trak's CUDA projector) is not installed: pip install -e '.[fast]'",
)
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)


def cuda_batch():
    return {k: v.cuda() for k, v in mixed_length_batch(LENGTHS, PROMPTS).items()}


def test_batched_rows_match_loop_on_cuda_fp32():
    # TF32 matmuls would make the two paths differ by more than the engine's error, not less.
    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_lora_model().cuda()
    batch = cuda_batch()
    params = trainable_parameters(model)
    m = torch.cat([torch.randn_like(p).reshape(-1) * 1e-3 for _, p in params])
    v = torch.cat([torch.rand_like(p).reshape(-1) * 1e-5 for _, p in params])
    adam = AdamState(m, v, 0.9, 0.999, 1e-8)
    assert_rows_match(per_example_gradients(model, batch).cpu(), loop_reference(model, batch).cpu())
    assert_rows_match(
        per_example_gradients(model, batch, adam_state=adam).cpu(),
        loop_reference(model, batch, (m, v, 0.9, 0.999, 1e-8)).cpu(),
    )


def bf16_base_model():
    """The usual GPU setting: a bf16 base model with float32 LoRA weights (peft's default autocast)."""
    model = tiny_lora_model()
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model.cuda()


def test_batched_rows_match_loop_on_cuda_bf16_base():
    model = bf16_base_model()
    batch = cuda_batch()
    fast, ref = per_example_gradients(model, batch).cpu(), loop_reference(model, batch).cpu()
    for i in range(ref.shape[0]):
        # bf16 activations: batch shapes change the rounding, not the direction.
        assert torch.nn.functional.cosine_similarity(fast[i], ref[i], dim=0).item() >= 0.999, i


def test_fused_rows_equal_whole_rows_on_cuda_bf16_base():
    # The fused path (per-layer Adam + projection inside the backward) on the GPU, bf16 base, float32 LoRA.
    from rose_trl.gradients.capture import per_example_projected_gradients

    model = bf16_base_model()
    batch = cuda_batch()
    n = sum(p.numel() for _, p in trainable_parameters(model))
    adam = AdamState(torch.randn(n) * 1e-3, torch.rand(n) * 1e-5, 0.9, 0.999, 1e-8).to("cuda")
    projector = build_projector("sjlt", n, 1024, device="cuda")
    fused = per_example_projected_gradients(model, batch, projector, adam).cpu()
    whole = projector.project(per_example_gradients(model, batch, adam_state=adam)).cpu()
    assert_rows_match(fused, whole)


def test_sjlt_on_cuda_equals_cpu():
    x = torch.randn(5, 300_000)
    p = SparseJLProjector(300_000, 2048, seed=3, chunk=1 << 16)
    cpu, gpu = p.project(x), p.project(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)  # index_add_ order differs on CUDA
    assert build_projector("sjlt", 300_000, 2048, seed=3, chunk=1 << 16).describe() == p.describe()


@needs_fast_jl
def test_trak_cuda_projector_is_rowwise_deterministic_and_never_picked_by_auto():
    torch.manual_seed(0)
    model = tiny_lora_model(hidden=64, r=8).cuda()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 40, (128,), generator=g).tolist()
    prompts = [max(1, n // 3) for n in lengths]
    train = per_example_gradients(
        model, {k: v.cuda() for k, v in mixed_length_batch(lengths, prompts, seed=1).items()}
    )
    val = per_example_gradients(
        model, {k: v.cuda() for k, v in mixed_length_batch(lengths[:6], prompts[:6], seed=2).items()}
    )
    assert isinstance(build_projector("auto", train.shape[1], 1024, device="cuda"), SparseJLProjector)
    proj = build_projector("trak_cuda", train.shape[1], 1024, seed=0, device="cuda")
    assert proj.backend == "cuda", proj.implementation
    a = proj.project(train)
    # The same seed gives the same matrix in a new projector; a row does not depend on its batch.
    torch.testing.assert_close(
        TrakProjector(train.shape[1], 1024, seed=0, device="cuda", backend="cuda").project(train), a
    )
    torch.testing.assert_close(proj.project(train[5:6]), a[5:6], rtol=1e-3, atol=1e-3)

    def cosine_scores(t, v):
        t, v = torch.nn.functional.normalize(t, dim=1), torch.nn.functional.normalize(v, dim=1)
        return (t @ v.mean(0)).cpu().numpy()

    # Reported, not asserted: how well each projector's scores track the exact ones (docs/results/distributed.md).
    exact = cosine_scores(train, val)
    rho = {}
    for kind in ("trak_cuda", "trak", "sjlt"):
        ps = [build_projector(kind, train.shape[1], 1024, seed=s, device="cuda") for s in range(10)]
        rho[kind] = float(
            np.mean([spearmanr(exact, cosine_scores(p.project(train), p.project(val))).statistic for p in ps])
        )
    print("mean spearman to exact scores over 10 seeds at 1024 dims:", rho)


WARMUP_CONFIGS = {  # name: (accelerate config, warm-up mode, bf16, extra launch options)
    "plain": ("single_gpu.yaml", "ddp", False, ()),
    "zero2": ("deepspeed_zero2.yaml", "deepspeed", False, ()),
    "zero3": ("deepspeed_zero3.yaml", "deepspeed", False, ()),
    "zero3_bf16": ("deepspeed_zero3.yaml", "deepspeed", True, ()),
    "fsdp2": ("fsdp.yaml", "fsdp", False, ()),  # FULL_STATE_DICT checkpoints
    "fsdp2_sharded": ("fsdp.yaml", "fsdp", False, ("--fsdp_state_dict_type", "SHARDED_STATE_DICT")),
}


scores_cache: dict = {}  # the plain run's scores, computed once for all the sharded variants


@pytest.fixture(scope="module")
def gpu_workdir(tmp_path_factory):
    from tests.test_deepspeed import WARMUP

    tmp = tmp_path_factory.mktemp("gpu")
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp / "tiny"), "--pool-size", "64"],
        check=True,
        capture_output=True,
    )
    (tmp / "warmup.py").write_text(WARMUP)
    return tmp


def run_warmup(workdir, name):
    from tests.test_deepspeed import launch, scores

    config, mode, bf16, extra = WARMUP_CONFIGS[name]
    out = launch(
        ROOT / "accelerate_configs" / config,
        mode,
        workdir / name,
        workdir,
        "--num_processes",
        "1",
        *extra,
        gpu=True,
        bf16=bf16,
    )
    assert "steps 16" in out  # one process: 32 rows / 4 per step x 2 epochs
    if name.startswith("fsdp2"):
        assert "DTensor" in out, out  # accelerate really applied fully_shard
    return scores(workdir / name)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=needs_deepspeed) for n in ("zero2", "zero3", "zero3_bf16")] + ["fsdp2", "fsdp2_sharded"],
)
def test_sharded_warmup_on_one_gpu_selects_like_plain(gpu_workdir, name):
    plain = scores_cache.get("plain")
    if plain is None:
        plain = scores_cache["plain"] = run_warmup(gpu_workdir, "plain")
    ds = run_warmup(gpu_workdir, name)
    rho = spearmanr(plain["score"], ds["score"]).statistic
    overlap = (plain["selected"] & ds["selected"]).sum() / plain["selected"].sum()
    diff = float(np.abs(plain["score"] - ds["score"]).max())
    print(f"{name}: max |score diff| {diff:.2e}, spearman {rho:.4f}, selection overlap {overlap:.2f}")
    if name == "zero3_bf16":
        assert rho > 0.9  # bf16 training takes another path
    else:
        assert diff < 1e-3 and rho > 0.999
    if name.startswith("fsdp2"):
        # Offline selection (one CPU process) from the checkpoints this GPU Trainer run wrote.
        from tests.test_deepspeed import offline_scores

        files = {p.name for p in (gpu_workdir / name / "checkpoint-8").iterdir()}
        print(f"{name} checkpoint files: {sorted(files)}")
        read = offline_scores(gpu_workdir / name, gpu_workdir)
        offline_diff = float(np.abs(read["score"] - ds["score"]).max())
        print(f"{name}: offline vs callback max |score diff| {offline_diff:.2e}")
        assert offline_diff < 1e-4 and (read["selected"] == ds["selected"]).all()
