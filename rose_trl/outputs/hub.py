"""Publish a finished selection on the Hugging Face Hub: the selected rows plus a dataset card.

Reads the run layout written by the selection step:
    <output_dir>/selection/selected/      `save_to_disk` folder: selected pool rows + pool_index, score
    <output_dir>/selection/scores.parquet pool_index, score, score_<subtask>..., [score_ckpt<i>...], [source], selected
    <output_dir>/selection/config.json    the run's flat config
    <output_dir>/selection/summary.json   num_pool, num_selected, selection_method, subtasks, threshold
The rows go up with `datasets.Dataset.push_to_hub` (split "train"); the card, scores and config files
are uploaded next to them. The token is the `token` argument or huggingface_hub's usual one (HF_TOKEN,
`huggingface-cli login`); it is never printed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from rose_trl.utils.errors import InputNotFoundError


logger = logging.getLogger(__name__)

SELECTION_DIR = "selection"
EXTRA_FILES = ("scores.parquet", "config.json", "summary.json")  # uploaded under rose_selection/
MODEL_METHODS = ("rose", "less", "rds")  # the methods that read a model to select


def _selection_dir(output_dir, folder: str = SELECTION_DIR) -> Path:
    sel = Path(output_dir) / folder
    missing = [n for n in ("selected", "scores.parquet", "config.json", "summary.json") if not (sel / n).exists()]
    if missing:
        raise InputNotFoundError(f"{sel}: not a finished selection run, missing {missing}")
    return sel


def _score_stats(scores_path: Path) -> dict:
    table = pq.read_table(scores_path)
    score = np.asarray(table.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
    selected = np.asarray(table.column("selected").to_numpy(zero_copy_only=False), dtype=bool)
    chosen = score[selected]
    stats = {"num_scored": int(np.isfinite(score).sum())}  # a first pass (prefilter_fraction) leaves some unscored
    if chosen.size:
        stats.update(
            selected_min=float(chosen.min()), selected_mean=float(chosen.mean()), selected_max=float(chosen.max())
        )
    return stats


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def build_dataset_card(output_dir, repo_id: str | None = None, folder: str = SELECTION_DIR) -> str:
    """The Hub dataset card (YAML metadata + markdown) of the selection in `output_dir`; `repo_id` only
    fills the loading snippet; `folder` names the selection folder (selection_<method> for baselines)."""
    sel = _selection_dir(output_dir, folder)
    config = json.loads((sel / "config.json").read_text())
    summary = json.loads((sel / "summary.json").read_text())
    stats = _score_stats(sel / "scores.parquet")
    method = summary.get("selection_method", config.get("selection_method"))
    num_selected, num_pool = int(summary["num_selected"]), int(summary["num_pool"])
    model = config.get("model_name_or_path")
    uses_model = str(method) in MODEL_METHODS
    rose = {
        "selection_method": method,
        "model": model,
        # The model whose gradients (rose, less) or hidden states (rds) chose the rows; None: the text alone did.
        "selected_with_model": model if uses_model else None,
        **({"selected_with_gguf_sha256": config["gguf_sha256"]} if uses_model and config.get("gguf_sha256") else {}),
        "pool_dataset": config.get("pool_dataset"),
        "validation_dataset": config.get("validation_dataset"),
        "selection_fraction": config.get("selection_fraction"),
        "num_pool": num_pool,
        "num_selected": num_selected,
        "subtasks": summary.get("subtasks"),
        "threshold": summary.get("threshold"),
        **{k: v for k, v in stats.items() if k.startswith("selected_")},
    }
    data = DatasetCardData(
        pretty_name=f"ROSE selection from {config.get('pool_dataset')}",
        size_categories=_size_category(num_selected),
        task_categories=["text-generation"],
        tags=["rose", "data-selection", "trl"],
        # The split push_to_hub writes; restating it keeps the scores file out of the data files.
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}],
        rose_selection=rose,
    )

    def fmt(x):
        return "n/a" if x is None else (f"{x:.6g}" if isinstance(x, float) else str(x))

    fraction = config.get("selection_fraction")
    share = f"{100 * fraction:g}% of the pool" if isinstance(fraction, (int, float)) else "of the pool"
    if "rose" in str(method).lower():
        how = (
            f"whose training gradients align best with the preference (DPO-loss) gradients of the few-shot "
            f"validation set `{config.get('validation_dataset')}`, selected with ROSE (Wu et al., "
            f"arXiv:2412.00631), method `{method}`, gradients of `{model}` "
            f"({fmt(config.get('projection_type'))} projection to {fmt(config.get('projection_dim'))} dimensions)."
        )
    elif uses_model:
        what = "gradients" if method == "less" else "last-layer hidden states"
        how = (
            f"selected by the `{method}` method of a ROSE run (validation set `{config.get('validation_dataset')}`), "
            f"from the {what} of `{model}`."
        )
    else:
        how = (
            f"selected by the `{method}` method of a ROSE run (validation set `{config.get('validation_dataset')}`), "
            f"which reads no model."
        )
    selected_with = f"`{model}`" if uses_model else "no model"
    subtasks = ", ".join(summary.get("subtasks") or []) or "n/a"
    selected_scores = " / ".join(fmt(stats.get(k)) for k in ("selected_min", "selected_mean", "selected_max"))
    body = f"""
# ROSE selection: {num_selected} of {num_pool} examples

The {num_selected} examples of `{config.get("pool_dataset")}` ({share}) {how}

Rows keep the pool's columns plus `pool_index` (row in the pool) and `score`, highest score first.
`rose_selection/scores.parquet` has every pool row's score (and one per subtask: {subtasks}).

| | value |
|---|---|
| selected / pool | {num_selected} / {num_pool} |
| selected with | {selected_with} |
| score of selected: min / mean / max | {selected_scores} |
| threshold | {fmt(summary.get("threshold"))} |

## Run configuration

```json
{json.dumps(config, indent=2, sort_keys=True)}
```

## Use

```python
from datasets import load_dataset
ds = load_dataset("{repo_id or "<this repo>"}", split="train")
```

Any model can be trained on these rows, not only the one that selected them (the paper's ROSE-T), for
example with TRL's own SFT script (`pool_index` and `score` are extra columns it ignores):

```bash
trl sft --model_name_or_path <your model> --dataset_name {repo_id or "<this repo>"} --use_peft --output_dir <out>
```
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_selection(
    output_dir, repo_id: str, private: bool = False, token: str | None = None, folder: str = SELECTION_DIR
) -> str:
    """Push the selected rows to `repo_id` (a dataset repo), then its card and the scores/config files.
    Returns the repo URL."""
    sel = _selection_dir(output_dir, folder)
    card = build_dataset_card(output_dir, repo_id, folder)
    selected = datasets.load_from_disk(str(sel / "selected"))
    selected.push_to_hub(
        repo_id, split="train", private=private, token=token, commit_message="ROSE selection: selected rows"
    )
    api = HfApi(token=token)
    api.upload_file(
        path_or_fileobj=card.encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="ROSE selection: dataset card",
    )
    for name in EXTRA_FILES:
        api.upload_file(
            path_or_fileobj=str(sel / name),
            path_in_repo=f"rose_selection/{name}",
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"ROSE selection: {name}",
        )
    url = f"https://huggingface.co/datasets/{repo_id}"
    logger.info("pushed %d rows to %s", len(selected), url)
    return url


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Register `rose-trl push <output_dir> <repo_id> [--private]` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "push", help="Push a finished selection (rows + dataset card) to the Hub.", description=push_selection.__doc__
    )
    parser.add_argument("output_dir", help="The run's output directory (it holds selection/).")
    parser.add_argument("repo_id", help="Target dataset repo, e.g. user/my-rose-subset.")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument(
        "--folder",
        default=SELECTION_DIR,
        help="Selection folder under output_dir (selection_<method> for a baseline run).",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token (default: HF_TOKEN or the saved login). Prefer the environment: "
        "a token on the command line lands in shell history.",
    )
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    url = push_selection(args.output_dir, args.repo_id, private=args.private, token=args.token, folder=args.folder)
    print(url)
    return 0
