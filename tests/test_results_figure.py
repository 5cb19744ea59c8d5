"""The front page's results figure (benchmarks/results_figure.py) is drawn from the recorded benchmark results, and
what it says is read from them. tests/test_benchmarks.py records tiny runs of the three benchmarks with it."""

from __future__ import annotations

import json
import math

import pytest
import results_figure


RECORDED = {
    "property": results_figure.PROPERTY_RESULTS,
    "real_model": results_figure.REAL_MODEL_RESULTS,
    "extraction": results_figure.EXTRACTION_RESULTS,
}


def sources() -> list[dict]:
    data = {name: results_figure.read(path) for name, path in RECORDED.items()}
    return [data["property"]["source"], data["real_model"]["source"]] + [
        w["source"] for w in data["extraction"]["workloads"]
    ]


def test_every_recorded_result_says_how_it_was_made():
    for source in sources():
        assert {"benchmark", "command", "date", "commit", "hardware"} <= set(source), source
        assert source["command"].startswith(f"python {source['benchmark']}")
        assert "/work/" not in json.dumps(source)


def test_the_figure_is_drawn_from_the_recorded_results(tmp_path):
    out = results_figure.main(["--out", str(tmp_path / "results.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 30_000


def test_what_the_figure_says_comes_from_the_data(tmp_path):
    properties = results_figure.read(RECORDED["property"])
    assert results_figure.property_answer(properties) == "ROSE above random in 5 of 6 target-directions"
    # one more target-direction where ROSE's interval is above random's: the title follows
    extra = json.loads(json.dumps(properties["targets"][0]))
    properties["targets"].append(extra)
    assert results_figure.property_answer(properties) == "ROSE above random in 6 of 7 target-directions"
    extra["minus_random"]["rose"] = [0.01, -0.05, 0.07]
    assert results_figure.property_answer(properties) == "ROSE above random in 5 of 7 target-directions"


def test_extraction_cost_is_the_median_of_each_runs_multiple_of_the_floor():
    tiny = next(w for w in results_figure.read(RECORDED["extraction"])["workloads"] if w["name"] == "tiny")
    multiples = results_figure.floor_multiples(tiny)
    by_hand = (
        sorted(r["engine"] / r["floor"] for r in tiny["runs"])[1],
        sorted(r["less"] / r["floor"] for r in tiny["runs"])[1],
    )
    assert multiples["floor"] == 1.0
    assert math.isclose(multiples["engine"], by_hand[0]) and math.isclose(multiples["less"], by_hand[1])


def test_an_extraction_log_without_its_less_line_is_refused():
    log = "(c) fwd+bwd floor 1.00 s 10.0 ms/example\n(b) rose_trl engine 1.10 s 11.0 ms/example (sjlt)\n"
    with pytest.raises(ValueError, match="--skip-less"):
        results_figure.extraction_runs(log + "speedup_vs_less=nan overhead_vs_fwd_bwd=1.100\n")
    with pytest.raises(ValueError, match="no extraction.py run"):
        results_figure.extraction_runs(log)


def test_recording_a_run_needs_the_hardware(tmp_path, capsys):
    with pytest.raises(SystemExit):
        results_figure.main(["--extraction-log", str(tmp_path / "x.log"), "--out", str(tmp_path / "f.png")])
    assert "--hardware is required" in capsys.readouterr().err


def test_the_results_table_is_read_from_the_data():
    properties = results_figure.read(RECORDED["property"])
    real_model = results_figure.read(RECORDED["real_model"])
    table = results_figure.results_table(properties, real_model)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| target")]
    assert len(rows) == len(properties["targets"]) + len(real_model["targets"]) == 8
    assert (
        rows[0]
        == "| link, prefer (80) | +0.195 [+0.118, +0.267] | +0.195 [+0.118, +0.267] | +0.195 [+0.125, +0.263] |"
    )
    assert rows[-1].startswith("| HH, the paper's 1-shot pairs (63) | +0.021 [-0.067, +0.106] |")
