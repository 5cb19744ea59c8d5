"""The few-shot preference validation set: Dataset(prompt, chosen, rejected, subtask).

`load_preferences` is the one entry point; what `spec` names decides how it is read:
  - "rose:<task>" (shp, se, hh): built from the original Hub dataset by `rose_trl.data.builders`;
  - a file released with the ROSE paper (`<task>_<k>_shot_preference.json`): `rose_trl.data.released`;
  - anything else (Hub id, .jsonl/.json/.parquet, `save_to_disk` folder): rows already in TRL's
    preference format, standard (strings) or conversational (lists of messages), with an optional
    `subtask` column ("default" when absent).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import datasets
import numpy as np

from rose_trl.data.io import load_table
from rose_trl.data.released import is_released_preference_file, load_released_preferences
from rose_trl.data.sft import BadRecordError


PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "subtask")
DEFAULT_SUBTASK = "default"
REGISTRY_PREFIX = "rose:"


def _check_text_or_messages(value, source: str, index: int, field: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise BadRecordError(source, index, field, "empty")
        return
    if isinstance(value, list):
        if not value:
            raise BadRecordError(source, index, field, "empty message list")
        for turn, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadRecordError(source, index, f"{field}[{turn}]", "each message needs 'role' and 'content'")
            if not isinstance(m["content"], str):
                raise BadRecordError(
                    source, index, f"{field}[{turn}].content", f"expected a string, got {type(m['content']).__name__}"
                )
        if not any(m["content"].strip() for m in value):
            raise BadRecordError(source, index, field, "every message is empty")
        return
    if value is None:
        raise BadRecordError(source, index, field, "missing")
    raise BadRecordError(source, index, field, f"expected a string or a list of messages, got {type(value).__name__}")


def check_preference_row(row: dict, source: str, index: int) -> None:
    """Raise `BadRecordError` unless `row` is a usable preference row (its subtask may be absent)."""
    for field in ("prompt", "chosen", "rejected"):
        _check_text_or_messages(row.get(field), source, index, field)
    if isinstance(row["prompt"], str) != isinstance(row["chosen"], str) or isinstance(
        row["chosen"], str
    ) != isinstance(row["rejected"], str):
        raise BadRecordError(source, index, "prompt,chosen,rejected", "mixes strings and message lists")
    if row["chosen"] == row["rejected"]:
        raise BadRecordError(source, index, "chosen,rejected", "chosen and rejected are identical")
    subtask = row.get("subtask", DEFAULT_SUBTASK)
    if not isinstance(subtask, str) or not subtask.strip():
        raise BadRecordError(source, index, "subtask", "expected a non-empty string")


def validate_preferences(ds: datasets.Dataset, source: str = "preferences") -> None:
    """Raise `BadRecordError` (source, record, field) for a row that DPO cannot use, or an empty set."""
    missing = [c for c in PREFERENCE_COLUMNS if c not in ds.column_names]
    if missing:
        raise BadRecordError(
            source, 0, ",".join(missing), f"missing columns (it has {ds.column_names}); rename them with column_map"
        )
    if len(ds) == 0:
        raise BadRecordError(source, 0, "*", "the preference set is empty")
    for i, row in enumerate(ds.select_columns(list(PREFERENCE_COLUMNS))):
        check_preference_row(row, source, i)


def select_subtasks(ds: datasets.Dataset, subtask_names: Sequence[str] | None, source: str) -> datasets.Dataset:
    if subtask_names is None:
        return ds
    present = list(dict.fromkeys(ds.select_columns(["subtask"]).to_dict()["subtask"]))
    unknown = [s for s in subtask_names if s not in present]
    if unknown:
        raise ValueError(f"{source}: unknown subtask(s) {unknown}; it has {present}")
    wanted = set(subtask_names)
    return ds.filter(lambda s: s in wanted, input_columns="subtask")


def sample_per_subtask(ds: datasets.Dataset, k: int, seed: int, source: str) -> datasets.Dataset:
    """k rows of each subtask (seeded), kept in dataset order."""
    rng = np.random.default_rng(seed)
    by_subtask: dict[str, list[int]] = {}
    for i, s in enumerate(ds.select_columns(["subtask"]).to_dict()["subtask"]):
        by_subtask.setdefault(s, []).append(i)
    keep = []
    for s, idx in by_subtask.items():
        if len(idx) < k:
            raise ValueError(f"{source}: subtask {s!r} has {len(idx)} rows, fewer than k={k}")
        keep.extend(rng.choice(idx, size=k, replace=False).tolist())
    return ds.select(sorted(keep))


def _normalize_prompt(p) -> str:
    return p.strip() if isinstance(p, str) else repr(p)


def exclude(ds: datasets.Dataset, prompts: Iterable[str] | None) -> datasets.Dataset:
    """Drop rows whose prompt (whitespace-stripped) is in `prompts`."""
    if prompts is None:
        return ds
    banned = {_normalize_prompt(p) for p in prompts}
    return ds.filter(lambda p: _normalize_prompt(p) not in banned, input_columns="prompt")


def load_preferences(
    spec: str,
    *,
    split: str = "train",
    subtask_names: Sequence[str] | None = None,
    k: int | None = None,
    seed: int = 0,
    column_map: Mapping[str, str] | None = None,
    exclude_prompts: Iterable[str] | None = None,
    subtask_sizes: Sequence[int] | None = None,
    drop_unusable: bool = False,
    **load_kwargs,
) -> datasets.Dataset:
    """Load (or build) the few-shot preference set that defines the target task, validated.

    Args:
        spec (`str`):
            A Hub dataset id or local file with `prompt`/`chosen`/`rejected` (standard or conversational) and an
            optional `subtask` column; a file released with the ROSE paper (`<task>_<k>_shot_preference.json`:
            k and the subtask names are inferred); or `rose:shp`, `rose:se`, `rose:hh` to rebuild the paper's
            few-shot sets from the original Hub datasets.
        split (`str`, *optional*, defaults to `"train"`):
            The split of a Hub dataset (or, for `rose:<task>`, of its source).
        subtask_names (`list[str]`, *optional*):
            Keep only these subtasks (an unknown name is an error listing those present).
        k (`int`, *optional*):
            For `rose:<task>`, the shots per subtask to build (default: the paper's); for a released file, its
            group size (default: from the file name); otherwise a seeded sample of k rows per subtask.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the builders' sampling and the k-per-subtask sample.
        column_map (`dict[str, str]`, *optional*):
            Renames columns before anything else.
        exclude_prompts (iterable of `str`, *optional*):
            Prompts (e.g. the test set's) that must not appear; rows with them are dropped.
        subtask_sizes (`list[int]`, *optional*):
            Released files only: the sizes of the contiguous subtask groups, when they are not all k
            (`load_released_preferences`).
        drop_unusable (`bool`, *optional*, defaults to `False`):
            Released files only: drop records without a distinct chosen/rejected pair instead of refusing them.
        **load_kwargs:
            For `rose:<task>`, passed to the builder; otherwise to `datasets.load_dataset`.

    Returns:
        `datasets.Dataset`: the columns `prompt`, `chosen`, `rejected` and `subtask` ("default" when the set
        names none).

    Example:

    ```python
    from rose_trl import load_preferences

    preferences = load_preferences("preferences.jsonl")
    shp = load_preferences("rose:shp", k=5)  # the paper's SHP 5-shot set, rebuilt from the Hub
    ```
    """
    source = str(spec)
    if source.startswith(REGISTRY_PREFIX):
        from rose_trl.data.builders import build_preference_set

        ds = build_preference_set(
            source[len(REGISTRY_PREFIX) :],
            k=k,
            seed=seed,
            exclude_prompts=exclude_prompts,
            subtasks=subtask_names,
            split=split,
            **load_kwargs,
        )
        validate_preferences(ds, source)
        return ds
    if is_released_preference_file(spec):
        ds = load_released_preferences(spec, k=k, subtask_sizes=subtask_sizes, drop_unusable=drop_unusable)
        k = None  # k was the group size
    else:
        ds = load_table(spec, split=split, column_map=column_map, record_check=check_preference_row, **load_kwargs)
        if "subtask" not in ds.column_names:
            ds = ds.add_column("subtask", [DEFAULT_SUBTASK] * len(ds))
        validate_preferences(ds, source)
        ds = ds.select_columns(list(PREFERENCE_COLUMNS))
    ds = select_subtasks(ds, subtask_names, source)
    ds = exclude(ds, exclude_prompts)
    if k is not None:
        ds = sample_per_subtask(ds, k, seed, source)
    validate_preferences(ds, source)
    return ds
