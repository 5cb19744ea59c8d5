"""Compare selection folders with stored references (tests/references/<case>/): the same files, the same
decoded tables (every column and its arrow type; integers and text exactly; floats to TOLERANCE; the picks
exactly, except rows tied at the selection threshold within the tolerance), and, when the running pyarrow and
pandas are the ones that wrote the references (parquet embeds its writer's version) and every float is
bit-identical, the same bytes.

Why TOLERANCE = 2**-9 (about 1.95e-3), absolute, on every float column:

1. What the floats are made of. The gradient rows are computed with float32 kernels and stored in float16
   (store_dtype's default; int8 in one inline case, see 5). Every float the selection writes is a function of
   the stored rows: a cosine between a pool row g and a subtask target t (score_ckpt<i>), an eta-weighted sum of
   such cosines over checkpoints, with the eta summing to 1 (score_<subtask>, and the contribution c(z, p) with
   t the pair's own unit vector), or the max of those over subtasks (score). The target is the mean of its
   pairs' unit gradients, so |t| <= 1.
2. What another CPU changes. Its float32 kernels (summation order, FMA, vector width) move each computed value
   by a few float32 units in the last place (relative 1e-7, up to ~1e-6 after long reductions), far less than
   one float16 step (relative 2**-11 to 2**-10: the rounding error is at most 2**-11 of the value on either
   side). So a stored element is either the same on both machines or, when its float32 value sits at a rounding
   boundary, one step apart: |delta_k| <= 2**-10 |g_k| for every element k, however many of them flip.
3. What that does to a cosine. Only the part of delta orthogonal to g turns unit(g), so unit(g) moves by at most
   |delta| / |g| <= 2**-10 (first order; the second order term is 2**-20). A cosine <t, unit(g)> moves by at most
   2**-10 from the pool row's side, and as much again from the pairs' side (each pair's unit gradient moves by at
   most 2**-10, so their mean t does too): 2**-9. A weighted sum with weights summing to 1, and a max over
   subtasks, keep the bound; so do the contributions. Scoring on the stored values is float32 arithmetic on the
   same inputs, whose own kernel differences (about sqrt(dim) * 2**-24, 5e-6 at 8192 dims) stay inside it.
   (Elements below float16's normal range, 6.1e-5, have an absolute step of 2**-24: negligible next to a row's
   norm unless the whole row is that small. validation_aggregation: eq6 scales the pairs' side by
   mean |g_p| / |mean g_p|, the inverse of how much the pairs agree.)
4. What a real change does. A different loss, a missing Adam preconditioning, other checkpoint weights, another
   projection or a different pick move scores by 1e-2 to 1 (the self-tests in tests/test_references.py edit a
   copy of a reference and check that it is reported).
5. int8 stores (the inline whole_row case) round each row to steps of its largest |element| / 127, not to
   steps relative to each element. A flip then needs a float32 value within about 127 * 1e-7 steps of a
   half-step: about one element in 10**4, one or none in the case's 3 * 10**4 stored elements. One flipped
   element k moves a cosine by step * |t_k - cos * unit(g)_k| / |g| <= rho * (max|t_k| + rho) / 127, where
   rho = max|g_k| / |g| is at most 0.31 on that case's 256-dim rows (a random projection spreads a row over its
   dims): 1.5e-3, under the bound.

Measured: this project's 2-core AMD EPYC (AVX2, no AVX-512) against the machine that recorded the references,
same code and packages: float16 paths within 4.1e-6; the int8 path 5.18e-5 in score_ckpt0 (one flipped
element), 3.7e-5 in score (times eta_0 = 0.714); the picks identical. Simulated another CPU on the inline case
(tests/test_references.py): every float16 element one step away in a random direction moves the outputs by
1.6e-4 at most; one int8 step in every int8 row, 3.5e-4.

Picks: `selected` and `selected_for` must match, except a row whose pick differs while its deciding score lies
within 2 * TOLERANCE of the selection threshold on both sides (each side's score may move by TOLERANCE, so rows
closer than that may swap): under subtask_balance max (read from the new folder's summary.json) the deciding
score is `score` and the threshold the lowest selected `score`; under round_robin and proportional, each
subtask's column and the lowest score of the rows selected for it. contributions.parquet holds the selected
rows only: rows of the excused pool indices may be on one side only; every other row must match.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


FILES = ("scores.parquet", "contributions.parquet")
TOLERANCE = 2.0**-9


def _versions() -> dict:
    import pandas
    import pyarrow

    return {"pyarrow": pyarrow.__version__, "pandas": pandas.__version__}


def _balance(folder: Path) -> str:
    summary = folder / "summary.json"
    return json.loads(summary.read_text()).get("subtask_balance", "max") if summary.exists() else "max"


def _picks(frame):
    """Per row: None when not selected, else the subtask it was selected for ("" when the table names none)."""
    owner = frame["selected_for"].fillna("") if "selected_for" in frame else [""] * len(frame)
    return [str(o) if s else None for s, o in zip(frame["selected"], owner, strict=True)]


def tied_at_threshold(new, old, balance: str, tolerance: float = TOLERANCE) -> tuple[set[int], list[str]]:
    """(pool indices whose pick differs but which are tied at the threshold, problems): see the module's doc."""
    picks_new, picks_old = _picks(new), _picks(old)
    changed = [i for i, (a, b) in enumerate(zip(picks_new, picks_old, strict=True)) if a != b]
    if not changed:
        return set(), []
    if sum(p is not None for p in picks_new) != sum(p is not None for p in picks_old):
        return set(), [
            f"{sum(p is not None for p in picks_new)} rows selected, were {sum(p is not None for p in picks_old)}"
        ]

    def column(owner: str) -> str:
        per_subtask = balance != "max" and owner and f"score_{owner}" in old
        return f"score_{owner}" if per_subtask else "score"

    def threshold(frame, picks, owner: str) -> float | None:
        col = column(owner)
        rows = [i for i, p in enumerate(picks) if p is not None and (col == "score" or p == owner)]
        return float(frame[col].iloc[rows].min()) if rows else None

    excused, problems = set(), []
    for i in changed:
        index = int(old["pool_index"].iloc[i])
        owners = {p for p in (picks_new[i], picks_old[i]) if p is not None}
        near = []
        for owner in owners:
            col = column(owner)
            for frame, picks in ((new, picks_new), (old, picks_old)):
                theta = threshold(frame, picks, owner)
                near.append(theta is None or abs(float(frame[col].iloc[i]) - theta) <= 2 * tolerance)
        if all(near):
            excused.add(index)
        else:
            problems.append(
                f"pool row {index}: picked {picks_new[i]!r}, was {picks_old[i]!r} (not tied at the threshold)"
            )
    return excused, problems


def _compare_floats(key: str, column: str, a, b, tolerance: float) -> list[str]:
    import numpy as np

    if a.shape != b.shape:
        return [f"{key}: column {column!r} has {len(a)} rows, had {len(b)}"]
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return [f"{key}: column {column!r} has NaN where the reference does not (or the reverse)"]
    gap = np.abs(np.where(nan_a, 0.0, a - b))
    if len(gap) and gap.max() > tolerance:
        return [f"{key}: column {column!r} differs by up to {gap.max():.3g} (tolerance {tolerance:.3g})"]
    return []


def _compare_tables(key: str, new, old, tolerance: float, excused: set[int], is_scores: bool) -> list[str]:
    import numpy as np

    problems = []
    if not is_scores and excused:  # contributions of rows selected on one side only
        new = new[~new["pool_index"].isin(excused)].reset_index(drop=True)
        old = old[~old["pool_index"].isin(excused)].reset_index(drop=True)
    if len(new) != len(old):
        return [f"{key}: {len(new)} rows, had {len(old)}"]
    for column in old.columns:
        a, b = new[column].to_numpy(), old[column].to_numpy()
        if a.dtype.kind == "f":
            problems += _compare_floats(key, column, a.astype(np.float64), b.astype(np.float64), tolerance)
        elif is_scores and column in ("selected", "selected_for"):
            continue  # compared by tied_at_threshold
        elif not new[column].equals(old[column]):
            problems.append(f"{key}: column {column!r} differs")
    return problems


def differences(reference: Path, folders: dict[str, Path], tolerance: float = TOLERANCE) -> list[str]:
    import numpy as np
    import pyarrow.parquet as pq

    manifest = json.loads((reference / "manifest.json").read_text())
    same_writer = manifest["versions"] == _versions()
    found = {f"{name}/{f}" for name, folder in folders.items() for f in FILES if (folder / f).exists()}
    problems = [
        f"{key}: {'missing' if key in manifest['files'] else 'not in the references'}"
        for key in sorted(found ^ set(manifest["files"]))
    ]
    excused: dict[str, set[int]] = {}
    for key in sorted(found & set(manifest["files"]), key=lambda k: (k.split("/")[0], k.split("/")[1] != FILES[0])):
        name, f = key.split("/")
        path = folders[name] / f
        new, old = pq.read_table(path), pq.read_table(reference / key)
        if new.schema.remove_metadata() != old.schema.remove_metadata():
            problems.append(f"{key}: schema {new.schema} != {old.schema}")
            continue
        new_frame, old_frame = new.to_pandas(), old.to_pandas()
        is_scores, found_problems = f == FILES[0], []
        if is_scores:
            if not new_frame["pool_index"].equals(old_frame["pool_index"]):
                problems.append(f"{key}: column 'pool_index' differs")
                continue
            excused[name], found_problems = tied_at_threshold(new_frame, old_frame, _balance(folders[name]), tolerance)
            found_problems = [f"{key}: {p}" for p in found_problems]
        found_problems += _compare_tables(key, new_frame, old_frame, tolerance, excused.get(name, set()), is_scores)
        problems += found_problems
        floats = [c for c in old_frame.columns if old_frame[c].dtype.kind == "f"]
        bit_identical = all(np.array_equal(new_frame[c], old_frame[c], equal_nan=True) for c in floats)
        if same_writer and bit_identical and not found_problems and _sha256(path) != manifest["files"][key]:
            problems.append(f"{key}: bytes differ")
    return problems


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
