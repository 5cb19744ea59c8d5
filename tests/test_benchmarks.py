"""The benchmark scripts run at tiny scale, so that the commands the docs quote cannot rot."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_gpu_extraction_benchmark_runs_tiny_on_cpu(capsys):
    import gpu_extraction

    records = gpu_extraction.main(["--device", "cpu", "--tiny", "--examples", "16", "--less-examples", "4",
                                   "--check-seeds", "2"])
    paths = {r["path"]: r for r in records if "path" in r}
    assert set(paths) == {"(a) LESS-style", "(b) engine", "(c) floor"}
    assert all(math.isfinite(r["ms_per_example"]) and r["ms_per_example"] > 0 for r in paths.values())
    assert paths["(a) LESS-style"]["projector"] == "sjlt (fast_jl not installed)"  # labelled as such
    fits = [r for r in records if r.get("check") == "largest rows per pass"]
    assert [r["rows"] for r in fits] == [16, 16]
    checks = {r["projection"]: r for r in records if r.get("check") == "projector"}
    assert checks["trak_cuda"]["skipped"]
    for kind in ("sjlt", "trak"):
        assert checks[kind]["deterministic"] and checks[kind]["scale_rel_error"] < 1e-5
        assert 0 < checks[kind]["spearman_vs_exact_mean"] <= 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("engine_over_floor=") and " less_over_engine=" in last


def test_extraction_benchmark_runs_tiny(capsys):
    import extraction

    extraction.main(["--examples", "32", "--hidden", "64", "--layers", "2", "--vocab", "500", "--dim", "256",
                     "--seq-len", "32", "--repeats", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    speedup, overhead = (float(part.split("=")[1]) for part in last.split())
    assert last.startswith("speedup_vs_less=") and speedup > 1 and overhead > 0


def test_extraction_benchmark_runs_at_the_real_shape_cut_down(capsys, monkeypatch):
    """--model smollm2-135m at a cut-down size: SmolLM2's shape with 2 layers and a small vocabulary (its
    30 layers and 49k words take minutes); the chunked loss forced on, as at the real size."""
    import extraction
    from rose_trl import sft_loss

    shape = dict(extraction.SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512)
    monkeypatch.setitem(extraction.SHAPES, "smollm2-135m", shape)
    monkeypatch.setattr(sft_loss, "LOSS_CHUNK_ELEMENTS", 1000)
    chunked = []
    original = sft_loss.chunked_sft_per_example_loss
    monkeypatch.setattr(sft_loss, "chunked_sft_per_example_loss", lambda *a: chunked.append(1) or original(*a))
    extraction.main(["--model", "smollm2-135m", "--examples", "12", "--less-examples", "2", "--seq-len", "32",
                     "--dim", "256", "--repeats", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert chunked
    assert any(line.startswith("(c') floor, labelled") for line in out)
    assert any("(first 2 examples)" in line for line in out)
    speedup, overhead = (float(part.split("=")[1]) for part in out[-1].split())
    assert out[-1].startswith("speedup_vs_less=") and speedup > 0 and overhead > 0


def test_extraction_memory_paths_of_the_real_shape_at_tiny_scale(monkeypatch):
    """extraction_memory's fused_plain_loss and backbone paths (what docs/performance.md's SmolLM2 table
    reads), at the tiny shape with the chunked loss forced on: the chunked pass and the decoder alone hold
    less per row than the pass with the plain loss."""
    from extraction_memory import run

    from rose_trl import gradients

    monkeypatch.setattr(gradients, "LOSS_CHUNK_ELEMENTS", 512 * 4)
    slopes = run("tiny", [1], [1, 2], seq_len=48, lora_r=4, dim=256,
                 paths=["fused", "fused_plain_loss", "backbone"], log=lambda s: None)
    assert slopes[("fused", 1)] < slopes[("fused_plain_loss", 1)], slopes
    assert slopes[("backbone", 1)] < slopes[("fused_plain_loss", 1)], slopes
