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
