"""One way to open a table, whatever `spec` names: a local file, a `save_to_disk` folder, or a Hub dataset id.

Every loader of this package goes through `load_table`, so local files and Hub datasets get the same
column renaming and the same error messages (which name the spec, i.e. the file, they come from).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import datasets

from rose_trl.data.sft import BadRecordError


RecordCheck = Callable[[dict, str, int], None]

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _read_json_records(path: Path) -> list | None:
    """Records of a .json list or a .jsonl file as Python objects; None for another JSON layout."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe one object per line after all
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            raise ValueError(
                f"{path}: a JSON object, not a list of records (ROSE's released preference "
                "files are read by load_preferences)"
            )
    records = []
    for line_no, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadRecordError(
                    str(path), len(records), "*", f"line {line_no + 1} is not valid JSON: {e}"
                ) from None
    return records


def _load_local_file(path: Path, column_map, record_check: RecordCheck | None) -> datasets.Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return rename_columns(datasets.Dataset.from_parquet(str(path)), column_map, str(path))
    # JSON is read here rather than by the json builder so that each record is checked as written, before
    # Arrow unifies the records' types (an int among strings, a missing key): errors then name the record.
    records = _read_json_records(path)
    if column_map and records and isinstance(records[0], dict):
        _check_column_map(list(records[0]), column_map, str(path))
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BadRecordError(str(path), i, "*", f"expected a JSON object, got {type(rec).__name__}")
        if column_map:
            records[i] = rec = {column_map.get(key, key): value for key, value in rec.items()}
        if record_check is not None:
            record_check(rec, str(path), i)
    if not records:
        return datasets.Dataset.from_dict({})
    return datasets.Dataset.from_list(records)


def load_table(
    spec,
    *,
    split: str = "train",
    column_map: Mapping[str, str] | None = None,
    record_check: RecordCheck | None = None,
    **load_kwargs,
) -> datasets.Dataset:
    """`spec` -> Dataset. Local `.jsonl/.json/.parquet`, a folder written by `save_to_disk`
    (a DatasetDict folder gives `split`), or else a Hub id passed to `datasets.load_dataset(spec, split=split)`.

    record_check(record, source, index) is called on each raw record of a JSON/JSONL file (after
    renaming), so type errors are reported before Arrow would coerce or reject them."""
    path = Path(str(spec))
    if path.suffix in LOCAL_SUFFIXES:
        return _load_local_file(path, column_map, record_check)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"{path}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(spec), split=split, **load_kwargs)
    return rename_columns(ds, column_map, str(spec))


def _check_column_map(columns: list[str], column_map: Mapping[str, str], source: str) -> None:
    missing = [c for c in column_map if c not in columns]
    if missing:
        raise KeyError(f"{source}: column_map names columns {missing} that are not in {columns}")
    # A target that already exists would silently be shadowed: refuse rather than guess which to keep.
    clash = [t for s, t in column_map.items() if t in columns and t not in column_map and t != s]
    if clash:
        raise KeyError(f"{source}: column_map targets {clash} already exist as columns")


def rename_columns(ds: datasets.Dataset, column_map: Mapping[str, str] | None, source: str) -> datasets.Dataset:
    if not column_map:
        return ds
    _check_column_map(ds.column_names, column_map, source)
    return ds.rename_columns({s: t for s, t in column_map.items() if s != t})
