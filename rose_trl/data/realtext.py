"""A real-text target task that ships with the package: a slice of the ROSE paper's released SE and HH
preference files (licenses and attribution in `rose_trl/data/real/README.md`), and the task built from it.

The slice (`real/<task>.jsonl`, one {prompt, chosen, rejected, subtask, released} row per line) holds the
released few-shot files listed in `SLICE_FILES` whole and in file order (`released` names the file), plus
further prompts of the same release (`released: null`) for the pool and the held-out pairs.
`write_slice` rebuilds it from a copy of the release; tests check that it gives the shipped bytes.

A task (`build_real_task`) for a target T in {se, hh}:
- validation: T's released k-shot file, exactly as released (subtasks included);
- pool: target prompts answered with their chosen answer or with their rejected one (a coin flip per
  prompt, recorded in `answer`), plus prompts of the other task answered with their chosen answer
  (`answer: other`): a selection that follows the target's reward should take the chosen rows of T;
- held-out: preference pairs of T whose prompts are in neither the pool nor any shipped validation file,
  split into a `dev` and a `test` half (`half`), so that settings chosen on dev are reported on test.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import datasets


SLICE_DIR = Path(__file__).parent / "real"
TASKS = ("se", "hh")
# The released few-shot files shipped whole: the paper's default k first, then larger ones.
SLICE_FILES = {"se": (2, 5), "hh": (1, 5, 10)}
DEFAULT_K = {task: ks[0] for task, ks in SLICE_FILES.items()}
# Further released records for the pool and the held-out pairs: the shortest first (they must fit the
# quickstart's 256 tokens), up to these many characters of text per task (the slice stays under 2 MB).
EXTRA_CHARS = {"se": 1_000_000, "hh": 300_000}
# se_40_shot and se_50_shot are not k per subtask: their first subtask has 35 records (released.py).
_SUBTASK_SIZES = {"se_40_shot": [35] + [40] * 9, "se_50_shot": [35] + [50] * 9}
_ALL_K = (1, 2, 5, 10, 20, 30, 40, 50)


def _released_file(root: Path, task: str, k: int) -> Path:
    return root / "validation" / task / f"{task}_{k}_shot" / f"{task}_{k}_shot_preference.json"


def _text_chars(row: dict) -> int:
    return len(row["prompt"]) + len(row["chosen"]) + len(row["rejected"])


def slice_rows(released_root: str | Path, task: str) -> list[dict]:
    """The slice's rows for `task`, from a copy of the release (`<root>/validation/...`, `<root>/test/...`)."""
    from rose_trl.data.released import load_released_preferences

    root = Path(released_root)
    rows, shipped = [], set()
    for k in SLICE_FILES[task]:
        name = f"{task}_{k}_shot"
        for r in load_released_preferences(_released_file(root, task, k), drop_unusable=True).to_list():
            rows.append({**r, "released": name})
            shipped.add(r["prompt"])
    extra = {}
    for k in _ALL_K:
        name = f"{task}_{k}_shot"
        path = _released_file(root, task, k)
        if k in SLICE_FILES[task] or not path.is_file():
            continue
        for r in load_released_preferences(path, subtask_sizes=_SUBTASK_SIZES.get(name), drop_unusable=True).to_list():
            if r["prompt"] not in shipped:
                extra.setdefault(r["prompt"], {**r, "released": None})
    budget = EXTRA_CHARS[task]
    for r in sorted(extra.values(), key=lambda r: (_text_chars(r), r["prompt"])):
        if _text_chars(r) > budget:
            break
        budget -= _text_chars(r)
        rows.append(r)
    return rows


def write_slice(released_root: str | Path, out_dir: str | Path = SLICE_DIR) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        text = "".join(
            json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in slice_rows(released_root, task)
        )
        (out / f"{task}.jsonl").write_text(text, encoding="utf-8")


def load_slice(task: str) -> list[dict]:
    if task not in TASKS:
        raise ValueError(f"real-text task must be one of {TASKS}, got {task!r}")
    with open(SLICE_DIR / f"{task}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@dataclass
class RealTask:
    target: str
    k: int
    pool: datasets.Dataset  # prompt, completion, task, subtask, answer (chosen | rejected | other), source
    validation: datasets.Dataset  # prompt, chosen, rejected, subtask: the released k-shot file
    heldout: datasets.Dataset  # prompt, chosen, rejected, subtask, half (dev | test)


def build_real_task(
    target: str, k: int | None = None, pool_target: int = 120, pool_other: int = 40, heldout: int = 80, seed: int = 0
) -> RealTask:
    """The task for `target` (see the module docstring). Rows are drawn at random (`seed`) from the slice's
    extra prompts: `pool_target` + `heldout` of the target, `pool_other` of the other task."""
    k = DEFAULT_K[target] if k is None else k
    rows = load_slice(target)
    name = f"{target}_{k}_shot"
    validation = [
        {f: r[f] for f in ("prompt", "chosen", "rejected", "subtask")} for r in rows if r["released"] == name
    ]
    if not validation:
        raise ValueError(f"the shipped slice has no {name} file; k must be one of {SLICE_FILES[target]}")
    rng = random.Random(seed)
    extra = [r for r in rows if r["released"] is None]
    if pool_target + heldout > len(extra):
        raise ValueError(
            f"{target}: pool_target + heldout = {pool_target + heldout}, the slice has {len(extra)} extra prompts"
        )
    rng.shuffle(extra)
    other_task = next(t for t in TASKS if t != target)
    others = [r for r in load_slice(other_task) if r["released"] is None]
    if pool_other > len(others):
        raise ValueError(f"pool_other = {pool_other}, the slice has {len(others)} {other_task} prompts")
    rng.shuffle(others)

    pool = []
    for r in extra[:pool_target]:
        answer = rng.choice(("chosen", "rejected"))
        pool.append(
            {
                "prompt": r["prompt"],
                "completion": r[answer],
                "task": target,
                "subtask": r["subtask"],
                "answer": answer,
                "source": f"{target}_{answer}",
            }
        )
    pool += [
        {
            "prompt": r["prompt"],
            "completion": r["chosen"],
            "task": other_task,
            "subtask": r["subtask"],
            "answer": "other",
            "source": f"{other_task}_other",
        }
        for r in others[:pool_other]
    ]
    rng.shuffle(pool)
    held = [
        {f: r[f] for f in ("prompt", "chosen", "rejected", "subtask")}
        for r in extra[pool_target : pool_target + heldout]
    ]
    for i, r in enumerate(held):
        r["half"] = "dev" if i % 2 == 0 else "test"
    return RealTask(
        target,
        k,
        datasets.Dataset.from_list(pool),
        datasets.Dataset.from_list(validation),
        datasets.Dataset.from_list(held),
    )


def write_real_task(task: RealTask, out_dir: str | Path) -> Path:
    """pool.jsonl, validation.jsonl and heldout.jsonl under `out_dir` (each written whole, then renamed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, ds in (
        ("pool.jsonl", task.pool),
        ("validation.jsonl", task.validation),
        ("heldout.jsonl", task.heldout),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ds.to_list()), encoding="utf-8")
        tmp.replace(out / name)
    return out
