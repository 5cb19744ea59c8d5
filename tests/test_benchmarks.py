"""The benchmark scripts run at tiny scale, so that the commands the docs quote cannot rot."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_gpu_extraction_benchmark_runs_tiny_on_cpu(capsys):
    import gpu_extraction

    records = gpu_extraction.main(
        ["--device", "cpu", "--tiny", "--examples", "16", "--less-examples", "4", "--check-seeds", "2"]
    )
    paths = {r["path"]: r for r in records if "path" in r}
    assert set(paths) == {
        "(a) LESS-style",
        "(b) engine",
        "(c) floor",
        "(b_1) engine, gradient_layers 1",
        "(c_1) floor, truncated backward",
    }
    assert paths["(b_1) engine, gradient_layers 1"]["layers"] == "1 of 2"
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
    assert " truncated_engine_over_floor[1]=" in last


def test_extraction_benchmark_runs_tiny(capsys, tmp_path):
    import extraction

    extraction.main(
        [
            "--examples",
            "32",
            "--hidden",
            "64",
            "--layers",
            "2",
            "--vocab",
            "500",
            "--dim",
            "256",
            "--seq-len",
            "32",
            "--repeats",
            "2",
            "--gradient-layers",
            "1",
        ]
    )
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    speedup, overhead = (float(part.split("=")[1]) for part in last.split())
    assert last.startswith("speedup_vs_less=") and speedup > 1 and overhead > 0
    truncated = next(line for line in out.splitlines() if line.startswith("(b_1) gradient_layers 1 of 2"))
    ratios = dict(part.split("=") for part in truncated.split("; ")[1].split())
    assert set(ratios) == {
        "layers",
        "engine_over_full_floor",
        "engine_over_truncated_floor",
        "truncated_floor_over_full_floor",
    }
    assert all(float(v) > 0 for v in ratios.values())
    # the front page's figure records such a run (benchmarks/results_figure.py): its ms per example, read back
    import shutil

    import results_figure

    (run,) = results_figure.extraction_runs(out)
    assert math.isclose(run["engine"] / run["floor"], overhead, rel_tol=0.1)
    assert math.isclose(run["less"] / run["engine"], speedup, rel_tol=0.1)
    recorded = tmp_path / "extraction.json"
    shutil.copy(results_figure.EXTRACTION_RESULTS, recorded)
    (tmp_path / "extraction.log").write_text(out + out)  # two runs
    argv = ["--extraction-file", str(recorded), "--extraction-log", str(tmp_path / "extraction.log")]
    argv += ["--hardware", "a test machine", "--commit", "abc1234", "--out", str(tmp_path / "results.png")]
    results_figure.main(argv)
    tiny = next(w for w in results_figure.read(recorded)["workloads"] if w["name"] == "tiny")
    assert tiny["runs"] == [run, run] and tiny["source"]["hardware"] == "a test machine"
    assert tiny["source"]["commit"] == "abc1234" and (tmp_path / "results.png").stat().st_size > 10_000


def run_script(script: str, *args: str) -> list[str]:
    """A benchmark script run as its README shows it (from the repository root), its output's lines."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()


def test_scoring_and_contributions_benchmarks_run_tiny(tmp_path):
    """benchmarks/speed/scoring.py and contributions.py (the stores, the measuring subprocesses, the tables)."""
    lines = run_script(
        "speed/scoring.py", "--sizes", "2000", "--dim", "256", "--checkpoints", "2", "--dir", str(tmp_path)
    )
    assert re.fullmatch(r"\| 2,000 \| [\d.]+ \|.*\| \d+ \|", lines[-2]), lines
    assert re.fullmatch(r"rss_ratio=1\.000 max_peak_rss_mb=\d+", lines[-1]), lines
    lines = run_script(
        "speed/contributions.py",
        "--pool",
        "2000",
        "--pairs",
        "10",
        "--subtasks",
        "2",
        "--checkpoints",
        "2",
        "--dim",
        "256",
        "--dir",
        str(tmp_path / "contributions"),
    )
    rows = [line.split("|")[1:-1] for line in lines[-2:]]
    assert [r[0].strip() for r in rows] == ["cold", "warm"], lines
    assert all(math.isfinite(float(cell)) for r in rows for cell in r[1:]), lines
    assert not (tmp_path / "contributions").exists()  # the stores are removed without --keep


def test_extraction_benchmark_runs_at_the_real_shape_cut_down(capsys, monkeypatch):
    """--model smollm2-135m at a cut-down size: SmolLM2's shape with 2 layers and a small vocabulary (its
    30 layers and 49k words take minutes); the chunked loss forced on, as at the real size."""
    import extraction

    from rose_trl.gradients import sft_loss

    shape = dict(extraction.SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512)
    monkeypatch.setitem(extraction.SHAPES, "smollm2-135m", shape)
    monkeypatch.setattr(sft_loss, "LOSS_CHUNK_ELEMENTS", 1000)
    chunked = []
    original = sft_loss.chunked_sft_per_example_loss
    monkeypatch.setattr(sft_loss, "chunked_sft_per_example_loss", lambda *a: chunked.append(1) or original(*a))
    extraction.main(
        [
            "--model",
            "smollm2-135m",
            "--examples",
            "12",
            "--less-examples",
            "2",
            "--seq-len",
            "32",
            "--dim",
            "256",
            "--repeats",
            "1",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert chunked
    assert any(line.startswith("(c') floor, labelled") for line in out)
    assert any("(first 2 examples)" in line for line in out)
    speedup, overhead = (float(part.split("=")[1]) for part in out[-1].split())
    assert out[-1].startswith("speedup_vs_less=") and speedup > 0 and overhead > 0


def test_extraction_memory_paths_of_the_real_shape_at_tiny_scale(monkeypatch):
    """extraction_memory's fused_plain_loss and backbone paths (what docs/results/extraction.md's SmolLM2 table
    reads), at the tiny shape with the chunked loss forced on: the chunked pass and the decoder alone hold
    less per row than the pass with the plain loss."""
    from extraction_memory import run

    from rose_trl.gradients import sft_loss

    monkeypatch.setattr(sft_loss, "LOSS_CHUNK_ELEMENTS", 512 * 4)
    slopes = run(
        "tiny",
        [1],
        [1, 2],
        seq_len=48,
        lora_r=4,
        dim=256,
        paths=["fused", "fused_plain_loss", "backbone"],
        log=lambda s: None,
    )
    assert slopes[("fused", 1)] < slopes[("fused_plain_loss", 1)], slopes
    assert slopes[("backbone", 1)] < slopes[("fused_plain_loss", 1)], slopes


def _tiny_model_folder(folder):
    """A tiny Llama and a byte-level tokenizer trained on the shipped real-text slice, saved as a model folder."""
    from rose_trl.data.realtext import load_slice
    from rose_trl.models.tiny import build_tiny_llama, build_tokenizer

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for task in ("se", "hh") for r in load_slice(task)[:200]]
    tokenizer = build_tokenizer(texts, vocab_size=600)
    build_tiny_llama(tokenizer, hidden=32, layers=2, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_real_model_benchmark_runs_tiny_and_resumes(tmp_path, capsys, monkeypatch):
    """benchmarks/quality/real_model.py's whole path (warm-up, rose/less stores shared across budgets, baselines, LoRA
    SFT per selection, held-out metrics with paired differences, the dev-half variants) on a tiny model; a
    second run finds every unit cached."""
    import real_model
    from real_model_report import paired_difference

    model = _tiny_model_folder(tmp_path / "model")
    variants = dict(real_model.VARIANTS)
    variants["rescoring"] = [
        v
        for v in variants["rescoring"]
        if v[0].startswith(("rose: default", "less", "rose: last", "rose: subtask_balance r"))
    ]
    variants["gradient"] = variants["gradient"][:1]  # the larger k
    variants["warmup"] = [v for v in variants["warmup"] if "projection" in v[0]]
    monkeypatch.setattr(real_model, "VARIANTS", variants)
    argv = [
        "--model",
        str(model),
        "--out",
        str(tmp_path / "out"),
        "--targets",
        "hh",
        "--pool-target",
        "12",
        "--pool-other",
        "4",
        "--heldout",
        "8",
        "--budgets",
        "0.25",
        "0.5",
        "--seeds",
        "0",
        "1",
        "--max-length",
        "48",
        "--projection-dim",
        "256",
        "--warmup-fraction",
        "0.25",
        "--warmup-epochs",
        "2",
        "--final-epochs",
        "1",
        "--methods",
        "rose",
        "less",
        "random",
        "bm25",
        "dsir",
        "rds",
        "target_chosen",
        "full",
        "--ks",
        "both",
        "--larger-k-methods",
        "rose",
        "--variants",
        "all",
        "--variant-budget",
        "0.25",
        "--test-variants",
        "rose: last checkpoint only",
        "--train-methods",
        "rose",
        "less",
        "random",
        "bm25",
        "rds",
        "target_chosen",
        "full",
    ]  # dsir: selection only
    results = real_model.main(argv)
    res = results["hh_k1"]
    assert res["heldout"] == {"test": 4} and res["pool"]["rows"] == 16
    assert res["base"]["test"]["accuracy"] == 0.5  # the base is its own reference
    assert res["base"]["test"]["wins"] == [0.5] * 4 and res["base"]["test"]["margins"] == [0.0] * 4
    # chosen_nll comes from the evaluation's own forward pass: it must equal reference_nll's
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rose_trl.data.realtext import build_real_task
    from rose_trl.evaluation.metrics import reference_nll

    task = build_real_task("hh", pool_target=12, pool_other=4, heldout=8)
    test = task.heldout.filter(lambda r: r["half"] == "test")
    nll = reference_nll(
        AutoModelForCausalLM.from_pretrained(model),
        AutoTokenizer.from_pretrained(model),
        test["prompt"],
        test["chosen"],
        max_length=48,
    )
    assert math.isclose(res["base"]["test"]["chosen_nll"], nll, rel_tol=1e-5)
    for method, by_budget in res["methods"].items():
        assert set(by_budget) == {"0.25", "0.5"}
        for rows in by_budget.values():
            assert len(rows) == (2 if method == "random" else 1)
            for row in rows:
                c = row["composition"]
                assert abs(c["chosen"] + c["rejected"] + c["other"] - 1) < 1e-9
                if method == "dsir":
                    assert "test" not in row
                    continue
                assert 0 <= row["test"]["accuracy"] <= 1 and row["test"]["chosen_nll"] > 0
                # the per-pair wins are what the accuracy averages
                assert math.isclose(np.mean(row["test"]["wins"]), row["test"]["accuracy"])
    assert res["methods"]["full"]["0.5"][0]["composition"]["other"] == 0.25  # the pool's own share
    assert res["methods"]["target_chosen"]["0.25"][0]["composition"]["chosen"] == 1.0
    assert {"rose", "less", "bm25", "dsir", "rds"} <= {
        m for m, b in res["methods"].items() if "auc_chosen_rejected" in b["0.25"][0]["composition"]
    }
    assert set(results["hh_k10"]["methods"]) == {"rose"}
    # a variant chosen on dev runs through the test grid too; at the dev budget it is the dev study's selection
    chosen = res["methods"]["rose: last checkpoint only"]
    assert set(chosen) == {"0.25", "0.5"} and all("test" in rows[0] for rows in chosen.values())
    assert (
        chosen["0.25"][0]["composition"]
        == results["hh_variants"]["variants"]["rose: last checkpoint only"]["composition"]
    )
    # a paired difference against itself is exactly zero; against random it is the mean of per-pair differences
    rose, rnd = res["methods"]["rose"]["0.25"], res["methods"]["random"]["0.25"]
    assert paired_difference(rose, rose, "test", "wins")["mean"] == 0.0
    expected = np.mean(np.asarray(rose[0]["test"]["wins"]) - np.mean([r["test"]["wins"] for r in rnd], axis=0))
    assert math.isclose(paired_difference(rose, rnd, "test", "wins")["mean"], expected)
    study = results["hh_variants"]
    assert study["half"] == "dev" and study["pairs"] == 4 and len(study["random"]) == 2
    assert set(study["variants"]) == {
        "rose: default (sigmoid, beta 0.1, normalized_mean, max)",
        "less: default",
        "rose: last checkpoint only",
        "rose: subtask_balance round_robin",
        "rose: larger k",
        "rose: projection dim 2048",
    }
    for row in study["variants"].values():
        assert "refused" in row or (0 <= row["dev"]["accuracy"] <= 1 and len(row["dev"]["wins"]) == 4)
    # the default variant is the main grid's rose selection at that budget: the same picks, the same adapter
    default = study["variants"]["rose: default (sigmoid, beta 0.1, normalized_mean, max)"]
    assert default["composition"] == rose[0]["composition"]
    first = capsys.readouterr().out
    assert "trained 0 adapters" not in first and "| 25% | dsir |" in first and "not trained" in first
    assert "ROSE's options on the dev half" in first

    import real_model_probe  # reads the stores just written: collinearity against a brute-force mean cosine

    probe = real_model_probe.main(
        [
            "--out",
            str(tmp_path / "out"),
            "--targets",
            "hh",
            "--ks",
            "1",
            "10",
            "--pool-target",
            "12",
            "--pool-other",
            "4",
            "--heldout",
            "8",
            "--warmup-fraction",
            "0.25",
            "--warmup-epochs",
            "2",
            "--projection-dim",
            "256",
        ]
    )
    assert set(probe) == {"hh_k1", "hh_k10"} and len(probe["hh_k1"]["checkpoints"]) == 2
    assert sum(probe["hh_k10"]["picked_for"]) == 16
    # ROSE's AUC as the probe recomputes it from the stores = the selection's own AUC
    assert math.isclose(
        probe["hh_k1"]["auc"]["as stored, max"][0], rose[0]["composition"]["auc_chosen_rejected"], abs_tol=0.02
    )
    rows = real_model_probe.unit(np.random.default_rng(0).normal(size=(5, 7)))
    brute = np.mean([rows[i] @ rows[j] for i in range(5) for j in range(5) if i != j])
    assert math.isclose(real_model_probe.collinearity(rows), brute)
    capsys.readouterr()

    again = real_model.main(argv)  # every unit is cached: nothing trained, selected or evaluated again
    out = capsys.readouterr().out
    assert "trained 0 adapters, evaluated 0, made 0 selections" in out
    assert again["hh_k1"]["methods"]["rose"] == res["methods"]["rose"]
    last = out.strip().splitlines()[-1]
    assert last.startswith("mode=full hh_k1@25%.rose=") and "hh_k1@50%.random=" in last and "rose-random=" in last
    assert "hh_k10@25%.rose-random=" in last  # the larger k is compared with the default k's random runs
    # the front page's figure records such a run (benchmarks/results_figure.py): the table's own numbers
    import results_figure

    (entry,) = results_figure.real_model_entries(results, 0.25)  # the released k, which holds random's runs
    assert (entry["target"], entry["validation_k"], entry["test_pairs"]) == ("hh", 1, 4)
    assert entry["accuracy"]["rose"][0] == round(rose[0]["test"]["accuracy"], 4)
    assert entry["minus_random"]["rose"][0] == round(paired_difference(rose, rnd, "test", "wins")["mean"], 4)
    assert entry["random"]["seeds"] == 2 and "target_chosen" in entry["accuracy"] and "dsir" not in entry["accuracy"]


def test_transfer_benchmark_runs_tiny(tmp_path, capsys):
    """benchmarks/quality/transfer.py's stages on two tiny models with different tokenizers (vocabularies of 600
    and 300): each model's own warm-up and stores, the selecting model's picks trained on the final model, overlaps,
    costs."""
    import transfer

    from rose_trl.data.realtext import load_slice
    from rose_trl.models.tiny import build_tiny_llama, build_tokenizer

    select = _tiny_model_folder(tmp_path / "small" / "model")
    final = tmp_path / "other" / "model"
    texts = [r["chosen"] + r["prompt"] for task in ("se", "hh") for r in load_slice(task)[:100]]
    tokenizer = build_tokenizer(texts, vocab_size=300, chat=False)
    build_tiny_llama(tokenizer, hidden=48, layers=1, heads=2, seed=3).save_pretrained(final)
    tokenizer.save_pretrained(final)
    common = [
        "--select-model",
        str(select),
        "--final-model",
        str(final),
        "--out",
        str(tmp_path / "out"),
        "--targets",
        "hh",
        "--pool-target",
        "12",
        "--pool-other",
        "4",
        "--heldout",
        "8",
        "--budgets",
        "0.25",
        "--seeds",
        "0",
        "1",
        "--max-length",
        "48",
        "--projection-dim",
        "256",
        "--warmup-fraction",
        "0.25",
        "--warmup-epochs",
        "2",
        "--final-epochs",
        "1",
        "--final-max-batch-tokens",
        "96",
    ]
    for selector in ("select", "final"):
        transfer.main(["--stage", "select", "--selector", selector, *common])
    costs = {s: json.loads((tmp_path / f"out/costs/{s}_hh.json").read_text()) for s in ("select", "final")}
    assert costs["select"]["model"] == str(select) and costs["final"]["model"] == str(final)
    assert all(c[m]["cpu_s"] > 0 and c[m]["process_peak_rss_gb"] > 0 for c in costs.values() for m in ("rose", "less"))
    assert (tmp_path / "out/by_small").is_dir() and (tmp_path / "out/by_other").is_dir()

    results = transfer.main(["--stage", "train", *common])
    res = results["hh"]
    assert set(res["methods"]) == {"ROSE-T", "LESS-T", "ROSE", "LESS", "random", "target_chosen", "target_rejected"}
    assert len(res["methods"]["random"]["0.25"]) == 2 and res["heldout"] == {"test": 4}
    for rows in res["methods"].values():
        for row in rows["0.25"]:
            assert len(row["picks"]) == 4 and 0 <= row["test"]["accuracy"] <= 1
    overlap = res["overlap"]["0.25"]
    assert overlap["chance"] == 0.25 and all(0 <= v <= 1 for k, v in overlap.items() if "spearman" not in k)
    # ROSE-T's picks are the selecting model's selection (its bench folder), ROSE's the final model's
    for name, folder in (("ROSE-T", "by_small"), ("ROSE", "by_other")):
        [made] = (tmp_path / "out" / folder / "selections").glob("rose_hh_k1_25_*.json")
        assert json.loads(made.read_text())["picks"] == res["methods"][name]["0.25"][0]["picks"]
    out = capsys.readouterr().out
    assert "trained 0 adapters" not in out and "| 25% | ROSE-T |" in out and "cost of selecting with" in out
    again = transfer.main(["--stage", "train", *common])  # every unit cached
    assert "trained 0 adapters, evaluated 0, made 0 selections" in capsys.readouterr().out
    assert again["hh"]["methods"]["ROSE-T"] == res["methods"]["ROSE-T"]


def test_transfer_benchmark_property_targets_are_the_suites_targets():
    """benchmarks/quality/transfer.py's property targets: the one-property suite's task (pool answers from the
    property's labels, the first k minimal pairs oriented by the direction, every held-out pair a test pair), the
    same for both directions' pools and for every call."""
    import argparse

    import transfer

    from rose_trl.data.properties import property_suite

    options = dict(
        property_pool_se=20,
        property_pool_hh=6,
        property_pool_min=6,
        property_k=4,
        property_test=5,
        task_seed=0,
        release=None,
    )
    ns = argparse.Namespace(**options)
    prefer, k, key = transfer.target_task(None, "se_link_prefer", ns)
    avoid, k2, key2 = transfer.target_task(None, "se_link_avoid", ns)
    assert transfer.target_task(None, "se_link_prefer", ns)[0] is prefer and key != key2 and k == k2 == 4
    suite = property_suite(
        ("se_link",), pool_sizes={"se": 20, "hh": 6}, pool_min=6, n_validation=4, heldout_dev=0, heldout_test=5, seed=0
    )
    assert prefer.pool["completion"] == suite.pool["completion"] == avoid.pool["completion"]
    for task, preferred in ((prefer, True), (avoid, False)):
        expected = [
            "other" if t != "se" else ("chosen" if h == preferred else "rejected")
            for h, t in zip(suite.pool["has_se_link"], suite.pool["task"], strict=True)
        ]
        assert task.pool["answer"] == expected and len(task.validation) == 4
        assert set(task.heldout["half"]) == {"test"} and len(task.heldout) == 5
        first = suite.validation["se_link"][0]
        assert task.validation[0]["chosen"] == (first["with"] if preferred else first["without"])
    assert "se_link_prefer" in transfer.PROPERTY_TARGETS and "hh_question_avoid" in transfer.PROPERTY_TARGETS


def test_property_targets_benchmark_runs_tiny_and_resumes(tmp_path, capsys, monkeypatch):
    """benchmarks/quality/property_targets.py's whole path on a tiny model: the oracle, every method in both directions
    from one warm-up and one pool store, the shots sweep and the placement of released pairs; a run killed in
    the middle of the grid continues where it stopped (it trains only the adapters it had not finished), and a
    further run finds every unit cached."""
    import property_sweep
    import property_targets
    import real_model
    from property_report import paired

    from rose_trl.scoring.agreement import pair_agreement

    model = _tiny_model_folder(tmp_path / "model")
    argv = [
        "--model",
        str(model),
        "--out",
        str(tmp_path / "out"),
        "--properties",
        "se_link",
        "hh_question",
        "--pool-se",
        "20",
        "--pool-hh",
        "14",
        "--pool-min",
        "7",
        "--n-validation",
        "6",
        "--heldout-dev",
        "2",
        "--heldout-test",
        "6",
        "--k",
        "3",
        "--budgets",
        "0.2",
        "0.3",
        "--train-budgets",
        "0.2",
        "--seeds",
        "0",
        "1",
        "--methods",
        "rose",
        "less",
        "random",
        "bm25",
        "rds",
        "--max-length",
        "48",
        "--projection-dim",
        "256",
        "--warmup-fraction",
        "0.2",
        "--warmup-epochs",
        "2",
        "--final-epochs",
        "1",
        "--shots",
        "1",
        "2",
        "3",
        "--draws",
        "3",
        "--no-release",
        "--released",
        "hh:10",
        "--grid-all",
    ]
    # killed after its 5th adapter (the oracle trains 4, so in the middle of se_link's grid), as a kill between
    # two units would stop it (a unit is written atomically: a kill inside one leaves nothing that is read)
    adapter = real_model.Bench.adapter

    def killed_after_five(self, *args, **kwargs):
        if self.counts["trained"] >= 5:
            raise KeyboardInterrupt("killed")
        return adapter(self, *args, **kwargs)

    monkeypatch.setattr(real_model.Bench, "adapter", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        property_targets.main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    results = property_targets.main(argv)  # continues where it stopped
    first_out = capsys.readouterr().out
    trained = int(re.search(r"this invocation trained (\d+) adapters", first_out).group(1))
    assert trained == len(list((tmp_path / "out" / "adapters").iterdir())) - 5
    assert results["pool_rows"] == 34 and set(results["oracle"]) == {"se_link", "hh_question"}
    for prop in ("se_link", "hh_question"):
        oracle = results["oracle"][prop]["0.2"]
        assert len(oracle["with"]["wins"]) == 6  # the test half
        # the oracle's difference is the per-pair difference of its two arms
        assert math.isclose(
            oracle["difference"]["margins"]["mean"],
            np.mean(np.asarray(oracle["with"]["margins"]) - oracle["without"]["margins"]),
        )
        dirs = results["targets"][prop]["directions"]
        for direction in ("prefer", "avoid"):
            methods = dirs[direction]["methods"]
            assert set(methods) == {"rose", "less", "random", "bm25", "rds"}
            assert len(methods["random"]["0.2"]) == 2 and "test" not in methods["rose"]["0.3"][0]
            for rows in methods.values():
                for r in rows["0.2"]:
                    assert math.isclose(np.mean(r["test"]["wins"]), r["test"]["accuracy"])
        # random reads no target: the same picks in both directions, and the avoid pairs are the prefer pairs
        # swapped, so its wins mirror and its margins change sign
        rp, ra = (
            dirs["prefer"]["methods"]["random"]["0.2"][0]["test"],
            dirs["avoid"]["methods"]["random"]["0.2"][0]["test"],
        )
        assert np.allclose(np.asarray(rp["wins"]) + ra["wins"], 1) and np.allclose(
            np.asarray(rp["margins"]), -np.asarray(ra["margins"])
        )
        # with one subtask, ROSE's avoid scores are the prefer scores negated, and the preferred side is the other
        # side: the same AUC (preferred over the other side) in both directions
        aucs = [
            dirs[d]["methods"]["rose"]["0.2"][0]["composition"]["auc_chosen_rejected"] for d in ("prefer", "avoid")
        ]
        assert math.isclose(aucs[0], aucs[1], abs_tol=1e-6)
        rose, rnd = dirs["prefer"]["methods"]["rose"]["0.2"], dirs["prefer"]["methods"]["random"]["0.2"]
        expected = np.mean(np.asarray(rose[0]["test"]["wins"]) - np.mean([r["test"]["wins"] for r in rnd], axis=0))
        assert math.isclose(paired([r["test"] for r in rose], [r["test"] for r in rnd], "wins")["mean"], expected)
    sweep = results["sweep"]
    for prop in ("se_link", "hh_question"):
        rows = sweep["targets"][prop]["rows"]
        n = sweep["targets"][prop]["usable_pairs"]
        assert 3 <= n <= 6 and {r["k"] for r in rows} == {1, 2, 3, n} and sum(r["k"] == n for r in rows) == 1
        assert all(r["agreement"] is None for r in rows if r["k"] == 1)
        assert all(("reproducibility" in r) == (2 * r["k"] <= n) for r in rows)
    # the sweep's score of the first 3 pairs, from its stores, is the grid's ROSE score (k = 3, the same pairs)
    import json

    warm = next((tmp_path / "out").glob("suite_*/warmup_*"))
    eta, pool, val = property_sweep.read_stores(warm / "sel_se_link_prefer_k6_p256", warm / "pool_train_p256")
    grid = json.loads(next((tmp_path / "out").glob("suite_*/selections/rose_se_link_prefer_s0_*.json")).read_text())
    first = np.intersect1d(np.arange(3), property_sweep.usable(val))  # ROSE leaves zero-gradient pairs out too
    assert np.allclose(property_sweep.score(eta, pool, val, first), grid["0.2"]["scores"], rtol=1e-4, atol=1e-6)
    released = sweep["released"]["hh"]
    assert released["pairs"] == 19 and set(released["subtasks"]) == {"harmless-base", "red-team-attempts"}
    assert all(-1 <= s["agreement"] <= 1 for s in released["subtasks"].values())
    placed = released["sweep"]["rows"]  # all 19 pairs as one target: no labels, so no AUC
    assert {r["k"] for r in placed} == {1, 2, 3, 19} and all("auc" not in r for r in placed)
    assert all(0 <= r["reproducibility"] <= 1 for r in placed if r["k"] <= 3)
    out = first_out
    assert "#### The oracle" in out and "#### The flip test at 20%" in out and "#### Shots sweep, se_link" in out
    assert out.strip().splitlines()[-1].startswith("oracle.se_link@20%=")

    # another script builds the same target from code (issue 24's transfer grid)
    task = property_targets.target_task(
        "se_link",
        "avoid",
        k=3,
        release=None,
        pool_se=20,
        pool_hh=14,
        pool_min=7,
        n_validation=6,
        heldout_dev=2,
        heldout_test=6,
    )
    assert len(task.pool) == 34 and len(task.validation) == 3 and sum(h == "test" for h in task.heldout["half"]) == 6
    assert math.isclose(
        np.mean(np.asarray(task.pool["answer"]) == "chosen"),
        results["targets"]["se_link"]["directions"]["avoid"]["pool"]["chosen"],
    )

    units = np.random.default_rng(0).normal(size=(4, 9))
    brute = np.mean(
        [
            units[i] @ units[j] / np.linalg.norm(units[i]) / np.linalg.norm(units[j])
            for i in range(4)
            for j in range(4)
            if i != j
        ]
    )
    assert math.isclose(pair_agreement(units), brute)
    assert property_sweep.summarize(rows)[0]["k"] == 1

    again = property_targets.main(argv)  # every unit is cached
    out = capsys.readouterr().out
    assert "trained 0 adapters, evaluated 0, made 0 selections" in out
    assert again["targets"] == results["targets"] and again["oracle"] == results["oracle"]
    # the front page's figure records such a run (benchmarks/results_figure.py): the report's own numbers
    import results_figure

    entries = results_figure.property_targets_entries(results, 0.2)
    assert [(e["target"], e["direction"]) for e in entries] == [
        (prop, direction) for prop in ("se_link", "hh_question") for direction in ("prefer", "avoid")
    ]
    dirs = results["targets"]["se_link"]["directions"]["prefer"]
    rose = [r["test"] for r in dirs["methods"]["rose"]["0.2"]]
    rnd = [r["test"] for r in dirs["methods"]["random"]["0.2"]]
    less = [r["test"] for r in dirs["methods"]["less"]["0.2"]]
    assert entries[0]["minus_random"]["rose"][0] == round(paired(rose, rnd, "wins")["mean"], 4)
    assert entries[0]["rose_minus_less"][0] == round(paired(rose, less, "wins")["mean"], 4)
    assert entries[0]["random"]["seeds"] == 2 and {"oracle", "anti-oracle", "bm25"} <= set(entries[0]["accuracy"])


def test_frontier_sweep_costs_and_figure_run_tiny(tmp_path, capsys):
    """frontier.py on a small planted task (2 layers, 3 checkpoints): every setting's AUC and overlap from one
    layered pass, two settings timed on their own selections, whose picks must be the sweep's (the layered
    features and the library's scoring against the real options end to end), the data and the figure."""
    import frontier
    import frontier_figure

    results = tmp_path / "results.json"
    timed = ["lall_call_poff", "l1_c-1_p0.2"]
    data = frontier.main(
        [
            *("--suites", "planted", "--planted-pool", "60", "--planted-epochs", "3", "--tiny-layers", "2"),
            *("--planted-dim", "128", "--out", str(tmp_path / "out"), "--results", str(results)),
            *("--costs", "--cost-settings", *timed, "--threads", "1"),
        ]
    )
    entry = data["suites"]["planted"]
    assert set(entry["sweep"]) == {"planted_prefer", "planted_avoid"}
    keys = set(entry["predicted"])
    assert len(keys) == 2 * 3 * 2 and {"lall_call_poff", "l1_c0,-1_p0.2"} <= keys  # layers x checkpoints x prefilter
    for rows in entry["sweep"].values():
        assert rows["lall_call_poff"]["overlap"] == 1.0
        assert all(0 <= r["auc"] <= 1 and 0 <= r["overlap"] <= 1 for r in rows.values())
        assert rows["lall_call_p0.2"]["candidates"] == 12  # 20% of 60
    costs = entry["costs"]["settings"]
    assert set(costs) == set(timed)
    for key in timed:
        assert costs[key]["same_picks_as_sweep"] == 1.0, key
        assert costs[key]["cpu_s"] > 0
    assert costs["lall_call_poff"]["cpu_share"] == 1.0
    assert entry["predicted"]["l1_c-1_p0.2"] == pytest.approx(costs["l1_c-1_p0.2"]["work_share"])
    # the frontier: no setting on it is dominated (cheaper and closer to the full method), every other one is
    shares, worst = frontier.cost_shares(entry), frontier.worst_differences(entry)
    assert shares["lall_call_poff"] == 1.0 and shares["l1_c0,-1_p0.2"] == entry["predicted"]["l1_c0,-1_p0.2"]
    assert worst["lall_call_poff"] == 0.0
    assert worst["l1_c-1_p0.2"] == min(
        rows["l1_c-1_p0.2"]["auc"] - rows["lall_call_poff"]["auc"] for rows in entry["sweep"].values()
    )

    def dominated(k):
        return any(
            shares[o] <= shares[k] and worst[o] >= worst[k] and (shares[o], worst[o]) != (shares[k], worst[k])
            for o in keys
        )

    front = set(frontier.frontier(entry))
    assert front and front == {k for k in keys if not dominated(k)}
    assert (tmp_path / "results.csv").read_text().startswith("suite,target,setting,auc")
    assert "#### planted" in capsys.readouterr().out
    figure = frontier_figure.main(["--results", str(results), "--out", str(tmp_path / "frontier.png")])
    assert figure.read_bytes()[:4] == b"\x89PNG"


def test_layered_features_equal_each_gradient_layers_setting():
    """One layered pass gives what Featurizer(gradient_layers=n) gives for each n (frontier.py's sweep)."""
    import torch
    from layered import LayeredFeaturizer, subset

    from rose_trl.gradients.capture import trainable_parameters
    from rose_trl.gradients.featurizer import Featurizer
    from rose_trl.gradients.projection import build_projector
    from tests.helpers import mixed_length_batch, tiny_lora_model
    from tests.test_fused import random_adam
    from tests.test_gradients import LENGTHS, PROMPTS, assert_rows_match

    model = tiny_lora_model(layers=4)
    n = sum(p.numel() for _, p in trainable_parameters(model))
    adam, projector = random_adam(n), build_projector("sjlt", n, 128, seed=0)
    batch = mixed_length_batch(LENGTHS, PROMPTS, seed=1)
    rows = LayeredFeaturizer(projector, [4, 2, 1])(model, batch, adam)
    assert rows.shape == (len(LENGTHS), 3 * 128)
    for i, layers in enumerate([4, 2, 1]):
        assert_rows_match(subset(rows, i, 128), Featurizer(projector, gradient_layers=layers)(model, batch, adam))
    pairs = LayeredFeaturizer(projector, [4, 1])(model, batch, adam, combine=lambda r: r[:3] + r[3:])
    single = Featurizer(projector, gradient_layers=1)(model, batch, adam, combine=lambda r: r[:3] + r[3:])
    assert_rows_match(subset(pairs, 1, 128), single)
    assert torch.isfinite(rows).all()


def test_frontier_holding_reports_each_settings_true_worst_difference():
    """holding(): a setting better than the full method everywhere reports its smallest gain (not 0), and one
    target beyond the tolerance in any suite makes it fail."""
    import frontier

    def suite(aucs: dict) -> dict:  # {setting: [auc per target]}, the full method at 0.8 on each target
        targets = range(len(next(iter(aucs.values()))))
        sweep = {
            f"t{i}": {"lall_call_poff": {"auc": 0.8}, **{k: {"auc": v[i]} for k, v in aucs.items()}} for i in targets
        }
        return {"predicted": {"lall_call_poff": 1.0, **{k: 0.5 for k in aucs}}, "sweep": sweep}

    data = {
        "suites": {
            "a": suite({"l2_c-1_poff": [0.83, 0.81], "l1_c-1_poff": [0.9, 0.76]}),
            "b": suite({"l2_c-1_poff": [0.82], "l1_c-1_poff": [0.8]}),
        }
    }
    got = frontier.holding(data)
    assert got["l2_c-1_poff"]["holds"] and got["l2_c-1_poff"]["worst"] == pytest.approx(0.01)
    assert not got["l1_c-1_poff"]["holds"] and got["l1_c-1_poff"]["worst"] == pytest.approx(-0.04)
    assert got["lall_call_poff"]["worst"] == 0.0 and set(got["l2_c-1_poff"]["suites"]) == {"a", "b"}


def test_extraction_benchmark_runs_on_a_pool_of_fewer_than_twelve_rows(capsys):
    """The warm-up AdamW steps cycle over a small pool (8 rows: the third step's batch was empty)."""
    import extraction

    small = ["--examples", "8", "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab", "200"]
    extraction.main([*small, "--dim", "64", "--seq-len", "16", "--batch-size", "4", "--repeats", "1", "--skip-less"])
    assert "overhead_vs_fwd_bwd=" in capsys.readouterr().out.strip().splitlines()[-1]


def test_budget_sweep_runs_the_tiny_recipe_at_each_budget(assets, tmp_path):
    """benchmarks/speed/budget_sweep.py: one run per budget in a process of its own, each with its wall time, CPU
    time, peak memory and the memory plan it logged; the user's budget is the one the run reports."""
    out, results = tmp_path / "sweep", tmp_path / "sweep.json"
    lines = run_script(
        "speed/budget_sweep.py",
        "--config",
        "recipes/tiny/rose/config_tiny.yaml",
        "--out",
        str(out),
        "--budgets",
        "2",
        "default",
        "--json",
        str(results),
        "--model_name_or_path",
        str(assets / "model"),
        "--pool_dataset",
        str(assets / "pool.jsonl"),
        "--validation_dataset",
        str(assets / "validation.jsonl"),
        "--num_train_epochs",
        "1",
        "--final_training",
        "false",
    )
    assert [line.split("|")[1].strip() for line in lines[-2:]] == ["2", "default"], lines
    runs = json.loads(results.read_text())["runs"]
    assert [r["memory_budget_gb"] for r in runs] == [2.0, None]
    for r in runs:
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and 1e8 < r["peak_rss_bytes"] < 2e10
        assert r["plan_lines"][0].startswith("memory plan: budget"), r["plan_lines"]
        assert any("pool gradient passes:" in line for line in r["plan_lines"]), r["plan_lines"]
        assert "pool gradient passes" in json.dumps(r["timings"])
    assert "budget 2.00 GB (memory_budget_gb: 2)" in runs[0]["plan_lines"][0]
    assert "the default" in runs[1]["plan_lines"][0]
    with pytest.raises(subprocess.CalledProcessError) as refused:  # every run starts from nothing
        subprocess.run(
            [sys.executable, "benchmarks/speed/budget_sweep.py", "--config", "recipes/tiny/rose/config_tiny.yaml",
             "--out", str(out), "--budgets", "2"],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
        )  # fmt: skip
    assert "exists" in refused.value.stderr


def test_benchmarks_find_the_released_data_where_the_tests_do(monkeypatch, tmp_path):
    """$ROSE_DATA_DIR first; else shared/data/rose inside the repository where present, else beside it (../shared,
    where tests/test_recipes.py looks): the property benchmarks' default release is the same data as the tests'."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from common import release_root

    monkeypatch.setenv("ROSE_DATA_DIR", str(tmp_path))
    assert release_root() == tmp_path
    monkeypatch.delenv("ROSE_DATA_DIR")
    inside = root / "shared" / "data" / "rose"
    assert release_root() == (inside if inside.is_dir() else root.parent / "shared" / "data" / "rose")
