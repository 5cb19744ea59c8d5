"""The instruction-tuning pool ROSE selects from.

A pool row is chat (`messages`: a list of {"role", "content"}) or `prompt`/`completion` strings (TRL's
conversational prompt/completion, lists of messages, also works); every other column is kept. Each row
also gets a `source` column (which sub-dataset it comes from) so a selection can be broken down by source.

The paper's pool (as in LESS) is the FLAN V2, CoT, Dolly and Open Assistant 1 parts of the open-instruct
/ Tulu processed data (~270k rows). On the Hub, `allenai/tulu-v2-sft-mixture` has rows
{"dataset", "id", "messages"} whose `dataset` names the part ("flan_v2", "cot", "oasst1", ...):
`load_pool("allenai/tulu-v2-sft-mixture", sources=["flan_v2", "cot", "oasst1"])` (~108k rows: that mixture
samples 50k FLAN, 50k CoT and 7.7k OASST1, and has no Dolly). The paper's exact 270k pool is LESS's
release (`less-data.zip` of the Hub dataset `princeton-nlp/less_data`): `load_pool("<unzipped>/train/processed")`
reads its {cot,dolly,flan_v2,oasst1}/*_data.jsonl files, which are in the same {dataset, id, messages} format.

Long rows are not cut here: truncation happens at tokenization (`rose_trl.data.sft.tokenize_pool`,
`max_length`), by the rule in the `rose_trl.data.sft` module docstring (the prompt keeps its last
tokens, the response its first ones, a response always keeps at least max_length - max_length // 2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np

from rose_trl.data.io import load_table
from rose_trl.data.sft import BadRecordError, _check_messages


SOURCE_COLUMN = "source"
# Columns that already say which sub-dataset a row comes from (tulu / open-instruct use `dataset`).
SOURCE_HINTS = ("source", "dataset")


def _spec_name(spec) -> str:
    path = Path(str(spec))
    return path.stem if path.suffix else str(spec)


def _column(ds: datasets.Dataset, name: str) -> list:
    # One bulk read: `ds[name]` is a lazy column whose per-element access is slow on a 300k-row pool.
    return ds.select_columns([name]).to_dict()[name]


def _with_source(ds: datasets.Dataset, spec) -> datasets.Dataset:
    if SOURCE_COLUMN in ds.column_names:
        return ds
    for hint in SOURCE_HINTS:
        if hint in ds.column_names:
            values = [str(v) for v in _column(ds, hint)]
            break
    else:
        values = [_spec_name(spec)] * len(ds)
    # Given a fingerprint, add_column skips hashing the whole new column (seconds on a 300k-row pool).
    fingerprint = hashlib.sha256(f"{ds._fingerprint}|{SOURCE_COLUMN}|{values[:1]}".encode()).hexdigest()[:16]
    return ds.add_column(SOURCE_COLUMN, values, new_fingerprint=fingerprint)


def _source_matches(value: str, wanted: Sequence[str]) -> bool:
    # tulu names some parts with a family prefix ("science.scierc_ner"): "science" selects the family.
    return any(value == w or value.startswith(w + ".") for w in wanted)


def check_pool_row(row: dict, source: str, index: int) -> None:
    """Raise `BadRecordError` unless `row` is a usable pool row (chat or prompt/completion)."""
    if row.get("messages") is not None:
        _check_messages(row["messages"], source, index)
        return
    if "prompt" not in row or "completion" not in row:
        raise BadRecordError(
            source,
            index,
            "messages|prompt,completion",
            f"a pool row needs 'messages' or 'prompt' and 'completion'; it has {sorted(row)} "
            "(rename columns with column_map)",
        )
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise BadRecordError(source, index, "prompt,completion", "mixes a message list and a string")
        _check_messages(prompt + completion, source, index, "prompt+completion")
        return
    for field, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise BadRecordError(source, index, field, "missing")
        if not isinstance(value, str):
            raise BadRecordError(source, index, field, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            raise BadRecordError(source, index, field, "empty")


def _expand_folder(spec) -> list:
    """A plain folder (not written by `save_to_disk`) stands for its .jsonl files, sorted: e.g. LESS's
    `train/processed/` with {cot,dolly,flan_v2,oasst1}/*_data.jsonl."""
    path = Path(str(spec))
    if not path.is_dir() or any((path / m).exists() for m in ("state.json", "dataset_dict.json")):
        return [spec]
    files = sorted(path.rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{path}: neither a save_to_disk folder nor a folder of .jsonl files")
    return files


def _load_one(spec, split, column_map, load_kwargs) -> datasets.Dataset:
    ds = load_table(spec, split=split, column_map=column_map, record_check=check_pool_row, **load_kwargs)
    if len(ds) == 0:
        raise BadRecordError(str(spec), 0, "*", "the pool is empty")
    if "messages" not in ds.column_names and not {"prompt", "completion"} <= set(ds.column_names):
        raise BadRecordError(
            str(spec),
            0,
            "messages|prompt,completion",
            f"a pool needs a 'messages' column or 'prompt' and 'completion' columns; it has "
            f"{ds.column_names} (rename columns with column_map)",
        )
    return _with_source(ds, spec)


def load_pool(
    spec: str | Sequence[str],
    *,
    split: str = "train",
    sources: Sequence[str] | None = None,
    column_map: Mapping[str, str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    **load_kwargs,
) -> datasets.Dataset:
    """Load and validate the training pool to select from.

    Rows are chat (`messages`: a list of `{"role", "content"}`, at least one non-empty assistant turn) or
    `prompt`/`completion`; every row is checked before any work.

    Args:
        spec (`str`, `pathlib.Path` or a list of them):
            A Hub dataset id, a local .jsonl/.json/.parquet file, a `save_to_disk` folder, a folder of .jsonl files
            (all of them, sorted: LESS's released pool), or a list of these (concatenated, in order).
        split (`str`, *optional*, defaults to `"train"`):
            The split of a Hub dataset or `DatasetDict` folder.
        sources (`list[str]`, *optional*):
            Keep only rows whose `source` is one of these (or "<name>.<anything>"); an unknown name is an error
            listing the sources present.
        column_map (`dict[str, str]`, *optional*):
            Renames columns before anything else, e.g. `{"instruction": "prompt", "output": "completion"}`.
        max_examples (`int`, *optional*):
            A seeded uniform sample of that many rows (after the `sources` filter), kept in pool order.
        seed (`int`, *optional*, defaults to `0`):
            The seed of that sample.
        **load_kwargs:
            Passed to `datasets.load_dataset` for Hub ids (e.g. `revision`, `data_dir`).

    Returns:
        `datasets.Dataset`: the rows with their original columns plus `source` (the row's own `source` or
        Tulu's `dataset` field, else the file's name).

    Raises:
        `BadRecordError`: a malformed row (naming the spec, the record's index in it and the field), or an
            empty pool.

    Example:

    ```python
    from rose_trl import load_pool

    pool = load_pool("pool.jsonl")  # or ["part1.jsonl", "part2.parquet"], or a Hub id
    pool = load_pool("allenai/tulu-v2-sft-mixture", sources=["flan_v2", "cot", "oasst1"], max_examples=10_000)
    ```
    """
    specs = [f for s in ([spec] if isinstance(spec, (str, Path)) else spec) for f in _expand_folder(s)]
    if not specs:
        raise ValueError("load_pool: no dataset given")
    parts = [_load_one(s, split, column_map, load_kwargs) for s in specs]
    # Record indices in errors refer to the spec the row comes from.
    origin = [(str(s), i) for s, part in zip(specs, parts, strict=True) for i in range(len(part))]
    if any(set(p.column_names) != set(parts[0].column_names) for p in parts):
        raise ValueError(
            "load_pool: the parts have different columns, "
            + "; ".join(f"{s}: {p.column_names}" for s, p in zip(specs, parts, strict=True))
            + " (align them with column_map, or prepare one file)"
        )
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    name = " + ".join(str(s) for s in specs)

    keep = np.arange(len(ds))
    if sources is not None:
        col = [str(v) for v in _column(ds, SOURCE_COLUMN)]
        present = sorted(set(col))
        unknown = [s for s in sources if not any(_source_matches(p, [s]) for p in present)]
        if unknown:
            raise ValueError(f"{name}: unknown sources {unknown}; the pool has {present}")
        wanted = {p for p in present if _source_matches(p, sources)}
        keep = np.array([i for i, v in enumerate(col) if v in wanted], dtype=np.int64)
    if max_examples is not None and max_examples < len(keep):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(keep, size=max_examples, replace=False))
    if len(keep) == 0:
        raise BadRecordError(
            name, 0, "*", "the pool is empty" + (f" (after keeping sources {list(sources)})" if sources else "")
        )
    if len(keep) != len(ds):
        ds = ds.select(keep)

    # JSON parts were checked record by record while reading; the others are checked here.
    prechecked = {str(s) for s in specs if Path(str(s)).suffix in (".json", ".jsonl")}
    if len(prechecked) < len(specs):
        cols = [c for c in ("messages", "prompt", "completion") if c in ds.column_names]
        pos = 0
        for batch in ds.select_columns(cols).iter(batch_size=2048):
            for j in range(len(batch[cols[0]])):
                file, index = origin[int(keep[pos])]
                pos += 1
                if file not in prechecked:
                    check_pool_row({c: batch[c][j] for c in cols}, file, index)
    return ds
