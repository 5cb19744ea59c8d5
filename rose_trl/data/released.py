"""Files released with the ROSE paper: few-shot preference sets, their SFT view and the test sets.

Layout (see the paper's release; `<root>` is e.g. a checkout's data folder):
    <root>/validation/<task>/<task>_<k>_shot/<task>_<k>_shot_preference.json
        {prompt: {"responses": [...], "pairs": [[win, lose], ...], "sft_target": str, "rejected_target": str}}
    <root>/validation/<task>/<task>_<k>_shot/<task>_<k>_shot_sft.json
        [{"dataset", "id", "messages": [user, assistant]}]   same prompts, chosen response
    <root>/test/<task>/<task>_<subtask>.json
        [{"prompt", "golden_answer"}]

The validation files have no subtask field: records come grouped, k per subtask, subtasks in the
alphabetical order of the test files. `subtask_sizes` covers files whose groups are not all k long
(the released se_40_shot and se_50_shot have 395 and 485 records: their first subtask has 35).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import datasets

from rose_trl.data.sft import BadRecordError, _check_messages


logger = logging.getLogger(__name__)

_SHOT = re.compile(r"^(?P<task>.+?)_(?P<k>\d+)_shot(?:_(?:preference|sft))?\.json$")


def parse_released_name(path) -> tuple[str | None, int | None]:
    """`.../se_2_shot_preference.json` -> ("se", 2); (None, None) for another name."""
    m = _SHOT.match(Path(path).name)
    return (m["task"], int(m["k"])) if m else (None, None)


def is_released_preference_file(path) -> bool:
    """True for a JSON object mapping prompts to {"sft_target", "rejected_target", ...}."""
    path = Path(str(path))
    if path.suffix != ".json" or not path.is_file():
        return False
    with path.open("rb") as fh:
        head = fh.read(1)
        while head.isspace():
            head = fh.read(1)
    if head != b"{":
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    return (
        isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "sft_target" in v for v in data.values())
    )


def released_subtask_names(path) -> list[str] | None:
    """Subtask names from the sibling `test/<task>/` folder of the released layout, if there is one."""
    path = Path(path).resolve()
    task, _ = parse_released_name(path)
    if task is None or len(path.parents) < 4:
        return None
    test_dir = path.parents[3] / "test" / task
    files = sorted(test_dir.glob(f"{task}_*.json")) if test_dir.is_dir() else []
    return [f.stem[len(task) + 1 :] for f in files] or None


def _subtask_column(
    path, n: int, k: int | None, group_names: Sequence[str] | None, subtask_sizes: Sequence[int] | None
) -> list[str]:
    """One subtask name per record, from the contiguous-groups rule."""
    source = str(path)
    names = list(group_names) if group_names is not None else released_subtask_names(path)
    if subtask_sizes is not None:
        sizes = [int(s) for s in subtask_sizes]
        if sum(sizes) != n or min(sizes, default=0) < 1:
            raise BadRecordError(
                source, n, "*", f"subtask_sizes {sizes} sum to {sum(sizes)}, the file has {n} records"
            )
    else:
        if k is None:
            k = parse_released_name(path)[1]
        if k is None:
            raise ValueError(f"{source}: cannot tell k from the file name; pass k or subtask_sizes")
        if k < 1 or n % k:
            raise BadRecordError(
                source,
                n,
                "*",
                f"{n} records is not a multiple of k={k}, so they cannot be split into k per "
                "subtask; pass subtask_sizes (e.g. the released se_40_shot is 35 + 9 x 40)",
            )
        sizes = [k] * (n // k)
    if names is None:
        names = [f"subtask_{i}" for i in range(len(sizes))]
    elif len(names) != len(sizes):
        raise BadRecordError(
            source, n, "subtask", f"{len(sizes)} groups of records but {len(names)} subtask names {names}"
        )
    return [name for name, size in zip(names, sizes, strict=True) for _ in range(size)]


def _pick_pair(rec: dict, source: str, index: int) -> tuple[str, str] | None:
    """(chosen, rejected) of one released record: its sft_target and rejected_target.

    Some released records repeat the chosen response as rejected_target; those take the first pair of
    `pairs` whose two responses differ (None when there is none)."""
    chosen, rejected = rec.get("sft_target"), rec.get("rejected_target")
    for field, value in (("sft_target", chosen), ("rejected_target", rejected)):
        if not isinstance(value, str):
            raise BadRecordError(source, index, field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise BadRecordError(source, index, field, "empty")
    if chosen != rejected:
        return chosen, rejected
    responses = rec.get("responses") or []
    for pair in rec.get("pairs") or []:
        try:
            win, lose = responses[pair[0]], responses[pair[1]]
        except (IndexError, TypeError):
            raise BadRecordError(source, index, "pairs", f"pair {pair} does not index 'responses'") from None
        if isinstance(win, str) and isinstance(lose, str) and win.strip() and lose.strip() and win != lose:
            return win, lose
    return None


def _read_released(
    path, kind: type, expected: str, k, group_names, subtask_sizes
) -> tuple[str, dict | list, list[str]]:
    """(source name, parsed JSON, subtask per record) of a released few-shot file of JSON type `kind`."""
    path = Path(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, kind) or not data:
        raise BadRecordError(str(path), 0, "*", f"expected {expected}")
    return str(path), data, _subtask_column(path, len(data), k, group_names, subtask_sizes)


def load_released_preferences(
    path,
    *,
    k: int | None = None,
    group_names: Sequence[str] | None = None,
    subtask_sizes: Sequence[int] | None = None,
    drop_unusable: bool = False,
) -> datasets.Dataset:
    """A released `<task>_<k>_shot_preference.json` -> Dataset(prompt, chosen, rejected, subtask).

    chosen/rejected are the record's `sft_target`/`rejected_target` (the first distinct pair of `pairs`
    where those two are equal). k defaults to the one in the file name; subtask names come from the
    sibling `test/<task>/` folder (`group_names` overrides), else `subtask_0`, `subtask_1`, ...
    A record with no distinct pair at all (e.g. two identical responses) is an error unless
    `drop_unusable`, which drops it after subtasks are assigned (the groups stay right).
    """
    source, data, subtasks = _read_released(
        path, dict, "a non-empty JSON object mapping prompts to records", k, group_names, subtask_sizes
    )
    rows, dropped = [], []
    for i, ((prompt, rec), subtask) in enumerate(zip(data.items(), subtasks, strict=True)):
        if not prompt.strip():
            raise BadRecordError(source, i, "prompt", "empty")
        if not isinstance(rec, dict):
            raise BadRecordError(source, i, "*", f"expected an object, got {type(rec).__name__}")
        pair = _pick_pair(rec, source, i)
        if pair is None:
            if not drop_unusable:
                raise BadRecordError(
                    source,
                    i,
                    "sft_target,rejected_target",
                    "chosen == rejected and no pair in 'pairs' has two different responses "
                    "(pass drop_unusable=True to skip such records)",
                )
            dropped.append(i)
            continue
        rows.append({"prompt": prompt, "chosen": pair[0], "rejected": pair[1], "subtask": subtask})
    if dropped:
        logger.warning("%s: dropped %d record(s) with no usable pair: %s", source, len(dropped), dropped)
    return datasets.Dataset.from_list(rows)


def load_released_sft(
    path, *, k: int | None = None, group_names: Sequence[str] | None = None, subtask_sizes: Sequence[int] | None = None
) -> datasets.Dataset:
    """A released `<task>_<k>_shot_sft.json` -> Dataset(dataset, id, messages, subtask): pool-format chat rows
    (the few shots with their chosen response), subtasks assigned like `load_released_preferences`."""
    source, data, subtasks = _read_released(
        path, list, "a non-empty JSON list of {'dataset', 'id', 'messages'}", k, group_names, subtask_sizes
    )
    rows = []
    for i, (rec, subtask) in enumerate(zip(data, subtasks, strict=True)):
        if not isinstance(rec, dict):
            raise BadRecordError(source, i, "*", f"expected an object, got {type(rec).__name__}")
        _check_messages(rec.get("messages"), source, i)
        rows.append(
            {
                "dataset": str(rec.get("dataset", "")),
                "id": str(rec.get("id", i)),
                "messages": [{"role": m["role"], "content": m["content"]} for m in rec["messages"]],
                "subtask": subtask,
            }
        )
    return datasets.Dataset.from_list(rows)


def load_released_test(path) -> datasets.Dataset:
    """A released test file `<task>_<subtask>.json` or its folder -> Dataset(prompt, golden_answer, subtask)."""
    path = Path(str(path))
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no .json test files")
    rows = []
    for file in files:
        subtask = file.stem.split("_", 1)[1] if "_" in file.stem else file.stem  # "se_academia" -> "academia"
        data = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise BadRecordError(str(file), 0, "*", "expected a JSON list of {'prompt', 'golden_answer'}")
        for i, rec in enumerate(data):
            # An empty golden answer is kept (the released hh_harmless-base.json has one): its prompt
            # still counts, e.g. for keeping test prompts out of a validation set.
            for field, allow_empty in (("prompt", False), ("golden_answer", True)):
                value = rec.get(field) if isinstance(rec, dict) else None
                if not isinstance(value, str) or not (allow_empty or value.strip()):
                    raise BadRecordError(str(file), i, field, "missing, empty or not a string")
            rows.append({"prompt": rec["prompt"], "golden_answer": rec["golden_answer"], "subtask": subtask})
    return datasets.Dataset.from_list(rows)
