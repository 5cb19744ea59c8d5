import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from rose_trl.gradients.capture import per_example_gradients
from rose_trl.gradients.projection import SparseJLProjector, TrakProjector, build_projector
from tests.helpers import mixed_length_batch, tiny_lora_model


@pytest.fixture(scope="module")
def grads():
    model = tiny_lora_model(hidden=64, r=8)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 40, (128,), generator=g).tolist()
    prompts = [max(1, n // 3) for n in lengths]
    train = per_example_gradients(model, mixed_length_batch(lengths, prompts, seed=1))
    val = per_example_gradients(model, mixed_length_batch(lengths[:6], prompts[:6], seed=2))
    return train, val


def cosine_scores(train, val):
    t = torch.nn.functional.normalize(train, dim=1)
    v = torch.nn.functional.normalize(val, dim=1)
    return (t @ v.mean(0)).numpy()


def test_sjlt_tracks_exact_scores_as_well_as_trak_rademacher(grads):
    """The fast CPU default is kept only because its scores rank like trak's at the same dim."""
    train, val = grads
    exact = cosine_scores(train, val)
    dim, seeds = 1024, range(20)
    sjlt, trak = [], []
    for seed in seeds:
        s = SparseJLProjector(train.shape[1], dim, seed=seed)
        t = TrakProjector(train.shape[1], dim, seed=seed)
        sjlt.append(spearmanr(exact, cosine_scores(s.project(train), s.project(val))).statistic)
        trak.append(spearmanr(exact, cosine_scores(t.project(train), t.project(val))).statistic)
    assert np.mean(sjlt) >= np.mean(trak) - 0.01, (np.mean(sjlt), np.mean(trak))
    assert np.mean(sjlt) > 0.7  # and both really are informative at this dim


def test_cached_trak_matrix_equals_basic_projector():
    from trak.projectors import BasicProjector, ProjectionType

    x = torch.randn(5, 3000)
    cached = TrakProjector(3000, 300, seed=3)
    assert cached._matrix is not None
    ref = BasicProjector(
        grad_dim=3000, proj_dim=300, seed=3, proj_type=ProjectionType.rademacher, device="cpu", block_size=128
    ).project(x, model_id=0)
    assert torch.allclose(cached.project(x), ref, rtol=1e-5, atol=1e-3)
    uncached = TrakProjector(3000, 300, seed=3, cache_bytes=0)
    assert uncached._matrix is None and torch.allclose(uncached.project(x), ref, rtol=1e-5, atol=1e-3)


def test_same_seed_same_matrix_whatever_the_chunking():
    x = torch.randn(3, 10_000)
    a = SparseJLProjector(10_000, 512, seed=7)
    b = SparseJLProjector(10_000, 512, seed=7)
    assert torch.equal(a.project(x), b.project(x))
    c = SparseJLProjector(10_000, 512, seed=8)
    assert not torch.equal(a.project(x), c.project(x))
    assert a.describe() != c.describe()


def test_sjlt_is_linear_and_preserves_norms_on_average():
    x = torch.randn(64, 20_000)
    p = SparseJLProjector(20_000, 4096, seed=0)
    assert torch.allclose(p.project(2 * x[:2] + x[2:4]), 2 * p.project(x[:2]) + p.project(x[2:4]), atol=1e-3)
    ratio = p.project(x).norm(dim=1) / x.norm(dim=1)
    assert abs(ratio.mean().item() - 1) < 0.02


def test_build_projector_names_types():
    assert build_projector("auto", 100, 16).describe()["type"] == "sjlt"  # no CUDA here
    assert build_projector("trak", 100, 16).describe()["type"] == "trak_basic"
    with pytest.raises(ValueError, match="unknown projection type"):
        build_projector("gaussian", 100, 16)
    with pytest.raises(ValueError, match="built for 100"):
        build_projector("sjlt", 100, 16).project(torch.zeros(1, 99))


def test_projectors_say_which_implementation_runs():
    assert "sparse JL" in build_projector("sjlt", 100, 16).implementation
    assert build_projector("trak", 100, 16).implementation == "trak BasicProjector (matrix cached)"
    assert TrakProjector(100, 16, cache_bytes=0).implementation == "trak BasicProjector"
