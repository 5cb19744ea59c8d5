"""Compare selection folders with stored references (tests/references/<case>/): the same files, the same
decoded tables (every column, its arrow type and values, exactly), and, when the running pyarrow and pandas
are the ones that wrote the references (parquet embeds its writer's version), the same bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FILES = ("scores.parquet", "contributions.parquet")


def _versions() -> dict:
    import pandas
    import pyarrow

    return {"pyarrow": pyarrow.__version__, "pandas": pandas.__version__}


def differences(reference: Path, folders: dict[str, Path]) -> list[str]:
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((reference / "manifest.json").read_text())
    same_writer = manifest["versions"] == _versions()
    found = {f"{name}/{f}" for name, folder in folders.items() for f in FILES if (folder / f).exists()}
    problems = [f"{key}: {'missing' if key in manifest['files'] else 'not in the references'}"
                for key in sorted(found ^ set(manifest["files"]))]
    for key in sorted(found & set(manifest["files"])):
        name, f = key.split("/")
        path = folders[name] / f
        if same_writer and hashlib.sha256(path.read_bytes()).hexdigest() != manifest["files"][key]:
            problems.append(f"{key}: bytes differ")
        new, old = pq.read_table(path), pq.read_table(reference / key)
        if new.schema.remove_metadata() != old.schema.remove_metadata():
            problems.append(f"{key}: schema {new.schema} != {old.schema}")
            continue
        for column in old.column_names:
            a, b = new[column].to_numpy(zero_copy_only=False), old[column].to_numpy(zero_copy_only=False)
            if a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                problems.append(f"{key}: column {column!r} differs")
    return problems
