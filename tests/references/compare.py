"""Compare selection folders with stored references (tests/references/<case>/): the same files, the same
decoded tables (every column and its arrow type; integer, boolean and text values exactly, float values to
FLOAT_TOLERANCE), and, when the running pyarrow and pandas are the ones that wrote the references (parquet
embeds its writer's version) and every float is bit-identical, the same bytes.

Floats get a tolerance because another CPU takes other float32 kernels: on 2026-12-02 a machine of the same
kind, with the same packages, gave scores within 4e-6 of the references (fp16 gradient stores hold about 3
decimal digits), while a change of the computation moves them by orders of magnitude more."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


FILES = ("scores.parquet", "contributions.parquet")
FLOAT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


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
    problems = [
        f"{key}: {'missing' if key in manifest['files'] else 'not in the references'}"
        for key in sorted(found ^ set(manifest["files"]))
    ]
    for key in sorted(found & set(manifest["files"])):
        name, f = key.split("/")
        path = folders[name] / f
        new, old = pq.read_table(path), pq.read_table(reference / key)
        if new.schema.remove_metadata() != old.schema.remove_metadata():
            problems.append(f"{key}: schema {new.schema} != {old.schema}")
            continue
        bit_identical = True
        for column in old.column_names:
            a, b = new[column].to_numpy(zero_copy_only=False), old[column].to_numpy(zero_copy_only=False)
            if a.dtype != b.dtype:
                problems.append(f"{key}: column {column!r} is {a.dtype}, was {b.dtype}")
            elif a.dtype.kind == "f":
                bit_identical &= np.array_equal(a, b, equal_nan=True)
                if not np.allclose(a, b, equal_nan=True, **FLOAT_TOLERANCE):
                    problems.append(f"{key}: column {column!r} differs by up to {np.nanmax(np.abs(a - b)):.3g}")
            elif not np.array_equal(a, b):
                problems.append(f"{key}: column {column!r} differs")
        if same_writer and bit_identical and hashlib.sha256(path.read_bytes()).hexdigest() != manifest["files"][key]:
            problems.append(f"{key}: bytes differ")
    return problems
