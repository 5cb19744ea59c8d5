"""One way to open a table, whatever `spec` names: a local file, a `save_to_disk` folder, or a Hub dataset id.

Every loader of this package goes through `load_table`, so local files and Hub datasets get the same
column renaming and the same error messages (which name the spec, i.e. the file, they come from).

Local files, by extension: `.jsonl` (one JSON object a line), `.json` (a list of objects), `.csv` and `.tsv`
(a header row, then one record a row; comma- or tab-separated, quoted fields may hold separators and line
breaks; every value is read as text, an empty cell as an empty string), `.parquet`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import datasets

from rose_trl.data.sft import BadRecordError
from rose_trl.utils.errors import BadInputError, InputNotFoundError, UserError


RecordCheck = Callable[[dict, str, int], None]

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
# Files read record by record here, each record checked as written (`record_check`), before Arrow sees them.
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


class DataKeyError(UserError, KeyError):
    """A name the data does not have (a column a column map names, a split), or a column map that would shadow one."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0])


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
            raise BadInputError(
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


def _read_csv_records(path: Path) -> list[dict]:
    """Records of a .csv (comma) or .tsv (tab) file with a header row: every value a string."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: the BOM a spreadsheet may write
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        records = []
        for i, rec in enumerate(reader):
            if None in rec:
                raise BadRecordError(
                    str(path),
                    i,
                    "*",
                    f"{len(reader.fieldnames) + len(rec[None])} fields, the header has "
                    f"{len(reader.fieldnames)} (line {reader.line_num}; quote a field that holds the separator)",
                )
            records.append(rec)
    if reader.fieldnames is None:
        return []
    return records


def _load_local_file(path: Path, column_map, record_check: RecordCheck | None) -> datasets.Dataset:
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return rename_columns(datasets.Dataset.from_parquet(str(path)), column_map, str(path))
    # JSON and CSV are read here rather than by the datasets builders so that each record is checked as written,
    # before Arrow unifies the records' types (an int among strings, a missing key): errors then name the record.
    records = _read_csv_records(path) if LOCAL_SUFFIXES[path.suffix] == "csv" else _read_json_records(path)
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
    """`spec` -> Dataset. Local `.jsonl/.json/.csv/.tsv/.parquet`, a folder written by `save_to_disk`
    (a DatasetDict folder gives `split`), or else a Hub id passed to `datasets.load_dataset(spec, split=split)`.

    record_check(record, source, index) is called on each raw record of a JSON/JSONL/CSV/TSV file (after
    renaming), so type errors are reported before Arrow would coerce or reject them."""
    path = Path(str(spec))
    if path.suffix in LOCAL_SUFFIXES:
        return _load_local_file(path, column_map, record_check)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataKeyError(f"{path}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(spec), split=split, **load_kwargs)
    return rename_columns(ds, column_map, str(spec))


def _check_column_map(columns: list[str], column_map: Mapping[str, str], source: str) -> None:
    missing = [c for c in column_map if c not in columns]
    if missing:
        raise DataKeyError(f"{source}: the column map names columns {missing} that are not in {columns}")
    # A target that already exists would silently be shadowed: refuse rather than guess which to keep.
    clash = [t for s, t in column_map.items() if t in columns and t not in column_map and t != s]
    if clash:
        raise DataKeyError(f"{source}: the column map's targets {clash} already exist as columns")


def rename_columns(ds: datasets.Dataset, column_map: Mapping[str, str] | None, source: str) -> datasets.Dataset:
    if not column_map:
        return ds
    _check_column_map(ds.column_names, column_map, source)
    return ds.rename_columns({s: t for s, t in column_map.items() if s != t})
