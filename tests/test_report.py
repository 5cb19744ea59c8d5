import base64
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import Dataset

from rose_trl.baselines import BASELINES
from rose_trl.cli import main
from rose_trl.outputs.report import (
    checkpoint_agreement,
    comparison_table,
    find_selections,
    render_report,
    top_examples,
    write_report,
)
from tests.eval_helpers import topic_task


CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_selection(folder: Path, pool, table: dict, fraction: float, method: str, config: dict | None = None) -> None:
    """The layout a finished run leaves: scores.parquet, selected/ (highest score first), config.json, summary.json."""
    folder.mkdir(parents=True)
    scores = pd.DataFrame({"pool_index": np.arange(len(pool)), **table})
    k = max(1, int(round(fraction * len(pool))))
    order = np.argsort(-scores["score"].to_numpy(), kind="stable")[:k]
    scores["selected"] = False
    scores.loc[order, "selected"] = True
    scores.to_parquet(folder / "scores.parquet")
    selected = (
        pool.select(order.tolist())
        .add_column("pool_index", order.tolist())
        .add_column("score", scores["score"].to_numpy()[order].tolist())
    )
    selected.save_to_disk(str(folder / "selected"))
    subtasks = [c[len("score_") :] for c in table if c.startswith("score_") and not c.startswith("score_ckpt")]
    (folder / "config.json").write_text(
        json.dumps(
            {
                "selection_method": method,
                "selection_fraction": fraction,
                "model_name_or_path": "tiny-llama",
                "pool_dataset": "pool.jsonl",
                "validation_dataset": "val.jsonl",
                **(config or {}),
            }
        )
    )
    (folder / "summary.json").write_text(
        json.dumps(
            {
                "num_pool": len(pool),
                "num_selected": k,
                "selection_method": method,
                "subtasks": subtasks,
                "threshold": float(scores["score"].to_numpy()[order].min()),
            }
        )
    )


def add_contributions(folder: Path, val, dominant: int = 0) -> None:
    """contributions.parquet and pairs.parquet as a gradient method writes them, with one pair planted to
    top every row of its subtask."""
    scores = pd.read_parquet(folder / "scores.parquet")
    chosen = scores.loc[scores["selected"], "pool_index"].to_numpy()
    rng = np.random.default_rng(0)
    n = len(val)
    pd.DataFrame(
        {
            "pool_index": np.repeat(chosen, n),
            "pair_index": np.tile(np.arange(n), len(chosen)),
            "subtask": np.tile(val["subtask"], len(chosen)),
            "contribution": rng.normal(0, 0.1, n * len(chosen)) + np.tile(np.arange(n) == dominant, len(chosen)),
        },
    ).to_parquet(folder / "contributions.parquet")
    pd.DataFrame(
        {
            "pair_index": np.arange(n),
            "subtask": val["subtask"],
            "prompt": val["prompt"],
            "chosen": val["chosen"],
            "rejected": val["rejected"],
            "usable": True,
        }
    ).to_parquet(folder / "pairs.parquet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    pool, val = topic_task()
    rng = np.random.default_rng(0)
    sources = np.asarray(pool["source"])
    # A ROSE-like table: three checkpoints' own scores (two agree, one noisy), weighted into the subtask scores.
    base = {"space": (sources == "space") * 1.0, "math": (sources == "math") * 1.0}
    ckpts = [base["space"] + base["math"] + rng.normal(0, s, len(pool)) for s in (0.05, 0.1, 1.0)]
    table = {f"score_{n}": v + rng.normal(0, 0.05, len(pool)) for n, v in base.items()}
    table["score"] = np.maximum(table["score_space"], table["score_math"])
    table.update({f"score_ckpt{i}": c for i, c in enumerate(ckpts)})
    write_selection(out / "selection", pool, table, 0.25, "rose")
    add_contributions(out / "selection", val)
    write_selection(out / "selection_bm25", pool, BASELINES["bm25"](pool, val), 0.25, "bm25")
    write_selection(out / "selection_random", pool, BASELINES["random"](pool, val, seed=1), 0.25, "random")
    return out


def test_report_contents(run_dir):
    runs = find_selections(run_dir)
    assert [r.name for r in runs] == ["selection", "selection_bm25", "selection_random"]
    main_run = runs[0]
    assert main_run.checkpoint_columns == ["score_ckpt0", "score_ckpt1", "score_ckpt2"]
    assert set(main_run.subtask_columns) == {"score_space", "score_math"}
    corr = checkpoint_agreement(main_run)
    assert corr.shape == (3, 3) and np.allclose(np.diag(corr), 1)
    assert corr.loc["score_ckpt0", "score_ckpt1"] > corr.loc["score_ckpt0", "score_ckpt2"]
    table = comparison_table(runs)
    assert table["num_selected"].tolist() == [4, 4, 4]
    assert table.iloc[0, -1] == 1.0  # the main run overlaps itself fully
    tops = top_examples(main_run)
    assert set(tops) <= {"space", "math"} and all(
        r["source"] in ("space", "math") for rows in tops.values() for r in rows
    )
    assert runs[2].subtask_columns == [] and checkpoint_agreement(runs[2]) is None


def test_report_escapes_text(tmp_path):
    pool, val = topic_task()
    pool = pool.map(lambda r, i: {"prompt": "<script>alert(1)</script>" if i == 0 else r["prompt"]}, with_indices=True)
    table = {"score": np.arange(len(pool), dtype=float)[::-1].copy()}
    write_selection(
        tmp_path / "selection", pool, table, 0.2, "random", config={"hub_token": "hf_SECRET", "api_key": None}
    )
    page = render_report(find_selections(tmp_path))
    assert "hf_SECRET" not in page and "hub_token" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Fewer than two score_ckpt" in page


def test_cli_writes_report(run_dir, capsys):
    main(["report", str(run_dir)])
    path = Path(capsys.readouterr().out.strip())
    assert path == run_dir / "report.html" and path.exists()
    page = path.read_text()
    imgs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == 5  # distribution, composition, checkpoint agreement, two sibling distributions
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in imgs)
    for needle in ("Comparison of selection methods", "selection_bm25", "Why these rows", "threshold"):
        assert needle in page
    # what a reader wants first: numbers and plots; the configuration last, folded
    order = [
        page.index(h)
        for h in (
            "<h2>Summary</h2>",
            "Score statistics",
            "<h2>Score distribution</h2>",
            "<h2>Why these rows</h2>",
            "<h2>Pairs that drive the selection</h2>",
            "<h2>Configuration</h2>",
        )
    ]
    assert order == sorted(order)
    assert re.search(r"<h2>Configuration</h2>\s*<details><summary>Full configuration", page)
    assert "pool_mean" not in page  # score statistics are a table of numbers, not a JSON string
    with pytest.raises(FileNotFoundError):
        write_report(run_dir / "selection")  # not an output dir: it has no selection folders inside


def test_why_these_rows_and_driving_pairs(run_dir):
    from rose_trl.outputs.report import driving_pairs, why_these_rows

    main_run = find_selections(run_dir)[0]
    _, val = topic_task()
    why = why_these_rows(main_run)
    assert why and all(
        len(r["pairs"]) == min(3, list(val["subtask"]).count(name)) for name, rows in why.items() for r in rows
    )
    first = next(iter(why.values()))[0]["pairs"][0]
    assert set(first) == {"pair_index", "contribution", "prompt", "chosen", "rejected"}
    counts = driving_pairs(main_run)
    dominant = val[0]["subtask"]
    picks = int((main_run.owners == dominant).sum())
    assert counts.set_index("pair_index").loc[0, ["top_for", "subtask_picks"]].tolist() == [picks, picks]
    same = counts[counts["subtask"] == dominant]
    assert same["flagged"].tolist() == (same["pair_index"] == 0).tolist()  # the planted pair, alone in its subtask
    page = render_report(find_selections(run_dir))
    assert re.search(rf'<p class="flag">Flagged: [^<]*pair 0 \({dominant}: {picks} of {picks}\)', page)


def _chromium(tmp_path, *args):
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed")
def test_report_renders_in_a_browser(run_dir, tmp_path):
    page = write_report(run_dir)
    # A script in the page measures every image once loaded: a broken image has naturalWidth 0.
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify(imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight]));
  document.body.appendChild(p);
});</script></body>""",
        )
    )
    dom = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    measured = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout).group(1))
    assert len(measured) == 5
    assert all(done and w > 100 and h > 100 for done, w, h in measured), measured
    assert "Agreement between checkpoints" in dom.stdout
    shot = tmp_path / "report.png"
    res = _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    assert res.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC)


def test_full_and_textless_runs_render(tmp_path):
    pool = Dataset.from_dict({"id": [f"row{i}" for i in range(6)], "source": ["a", "b"] * 3})
    write_selection(tmp_path / "selection_full", pool, {"score": np.ones(6)}, 1.0, "full")
    path = write_report(tmp_path)
    page = path.read_text()
    assert "selection_full" in page and "row0" in page  # rows without text fields are shown as saved
    assert len(re.findall(r"data:image/png;base64,", page)) == 2  # distribution, composition by source
