"""Do a subtask's validation pairs agree? Their gradients' agreement, the target's reliability, and the warning.

A subtask's target is the mean of its k pairs' unit validation gradients. What the pairs share (the preference
they all express) adds up in that mean; what each pair has of its own (its topic, its wording) averages out
only slowly. With a = the mean pairwise cosine of the k unit gradients (`pair_agreement`), the share of the
target that the pairs have in common is the Spearman-Brown reliability of a mean of k items:

    R(a, k) = k a / (1 + (k - 1) a)            (`reliability`; a <= 0 gives R = 0)

R near 1: the pairs agree, and the selection follows what they share. R near 0: the target is the sum of the
pairs' particulars, and the picks follow single pairs: another draw of as many pairs would pick other rows.

The threshold `RELIABILITY_THRESHOLD` comes from the shots sweep, docs/results/shots_sweep.md
(benchmarks/quality/property_sweep.py): on SmolLM2-135M, with property targets whose preference the model can learn,
it is the lowest reliability from which two disjoint draws of as many pairs pick, at the median, at least
half of the same rows. Below it the selection is more the pairs' draw than their preference.
`validation_agreement` computes the report that selection/summary.json, the HTML report and `rose-trl
explain` show; `across_subtasks` adds how the pairs of different subtasks agree and what one subtask of all of them
would give (the only figure there is when every subtask holds one pair, the paper's HH design); `agreement_warnings`
words both.
"""

from __future__ import annotations

import math

import numpy as np

from rose_trl.utils.timing import stage


# Measured, not chosen: docs/results/shots_sweep.md (benchmarks/quality/property_sweep.py). On
# SmolLM2-135M's three property targets (se_link, se_code, se_emphasis; 300 pairs of disjoint draws of 1-25
# pairs), the median share of the top 10% that a disjoint draw of as many pairs picks too is 0.20 below a
# reliability of 0.1, 0.40 at 0.1-0.2, 0.47 at 0.2-0.3 and 0.70-0.90 above: 0.3 is the lowest bin edge from
# which it stays >= 0.5 (on se_link and se_code alone the same rule gave 0.2).
RELIABILITY_THRESHOLD = 0.3
WHAT_HELPS = (
    "more validation pairs for this subtask; pairs that differ only in what you prefer (the same "
    "answer with and without it), so that what they share is the preference; fewer, broader subtasks"
)


def pair_agreement(vectors: np.ndarray) -> float | None:
    """Mean cosine over the ordered pairs of distinct rows of `vectors` [k, dim] (None for k < 2; zero rows are
    left out). |sum of unit rows|^2 = k + k (k - 1) a."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    units = vectors[norms > 0] / norms[norms > 0, None]
    k = len(units)
    if k < 2:
        return None
    total = float(np.linalg.norm(units.sum(axis=0)) ** 2)
    return (total - k) / (k * (k - 1))


def reliability(agreement: float | None, k: int) -> float | None:
    """Spearman-Brown: the share of a k-pair target that the pairs have in common (0 when a <= 0)."""
    if agreement is None:
        return None
    a = max(float(agreement), 0.0)
    return k * a / (1 + (k - 1) * a) if a > 0 else 0.0


def pairs_needed(agreement: float | None, target: float = RELIABILITY_THRESHOLD) -> int | None:
    """The k at which pairs agreeing at `agreement` reach reliability `target` (None when a <= 0: no k does)."""
    if agreement is None or agreement <= 0:
        return None
    return max(2, math.ceil(target * (1 - agreement) / (agreement * (1 - target)) - 1e-9))


@stage("scoring")
def validation_agreement(
    vectors: list[np.ndarray], learning_rates: list[float], subtasks: list[str], usable: np.ndarray | None = None
) -> dict[str, dict]:
    """Per subtask: its usable pairs, their agreement (the checkpoints' eta-weighted mean of `pair_agreement`;
    `vectors[i]`: checkpoint i's [n_pairs, dim] pair vectors), the reliability and the pairs needed to reach
    RELIABILITY_THRESHOLD, and whether it falls short (`agrees`: False, or None with a single pair)."""
    eta = np.asarray(learning_rates, dtype=np.float64)
    eta = eta / eta.sum() if eta.sum() > 0 else np.full(len(eta), 1 / len(eta))
    labels = np.asarray(subtasks)
    usable = np.ones(len(labels), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    out = {}
    for name in dict.fromkeys(subtasks):
        rows = np.flatnonzero((labels == name) & usable)
        per_checkpoint = [pair_agreement(v[rows]) for v in vectors]
        a = None if any(x is None for x in per_checkpoint) else float(np.dot(eta, per_checkpoint))
        r = reliability(a, len(rows))
        out[name] = {
            "pairs": int(len(rows)),
            "agreement": a,
            "reliability": r,
            "pairs_needed": pairs_needed(a),
            "threshold": RELIABILITY_THRESHOLD,
            "agrees": None if r is None else bool(r >= RELIABILITY_THRESHOLD),
        }
    return out


def _units(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    return vectors[norms > 0] / norms[norms > 0, None]


def between_agreement(vectors: np.ndarray, subtasks: list[str]) -> float | None:
    """Mean cosine over the ordered pairs of rows of `vectors` [k, dim] from different subtasks (zero rows left
    out; None when no two rows differ in subtask). With unit rows u and per-subtask sums S_s:
    sum over different-subtask pairs = |sum u|^2 - sum_s |S_s|^2, over k^2 - sum_s k_s^2 pairs."""
    vectors, labels = np.asarray(vectors, dtype=np.float64), np.asarray(subtasks)
    keep = np.linalg.norm(vectors, axis=1) > 0
    units, labels = _units(vectors), labels[keep]
    names = list(dict.fromkeys(labels.tolist()))
    counts = np.array([(labels == n).sum() for n in names])
    pairs = len(units) ** 2 - int((counts**2).sum())
    if pairs == 0:
        return None
    within = sum(float(np.linalg.norm(units[labels == n].sum(axis=0)) ** 2) for n in names)
    return (float(np.linalg.norm(units.sum(axis=0)) ** 2) - within) / pairs


def across_subtasks(
    vectors: list[np.ndarray], learning_rates: list[float], subtasks: list[str], usable: np.ndarray | None = None
) -> dict:
    """Beside each subtask's own agreement (`validation_agreement`): whether the pairs of different subtasks agree
    with each other (`between`: the checkpoints' eta-weighted mean cosine of pairs from different subtasks), and
    what one subtask of all the usable pairs would give (`merged`: its agreement, reliability, pairs needed and
    flag), with the subtasks that hold a single usable pair (`single_pair_subtasks`), whose own agreement cannot be
    measured: the paper's HH design, one pair a subtask, is all such subtasks."""
    eta = np.asarray(learning_rates, dtype=np.float64)
    eta = eta / eta.sum() if eta.sum() > 0 else np.full(len(eta), 1 / len(eta))
    labels = np.asarray(subtasks)
    usable = np.ones(len(labels), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    rows = np.flatnonzero(usable)
    between = [between_agreement(v[rows], labels[rows].tolist()) for v in vectors]
    merged = [pair_agreement(v[rows]) for v in vectors]
    b = None if any(x is None for x in between) else float(np.dot(eta, between))
    a = None if any(x is None for x in merged) else float(np.dot(eta, merged))
    r = reliability(a, len(rows))
    names = list(dict.fromkeys(subtasks))
    return {
        "subtasks": len(names),
        "between": b,
        "single_pair_subtasks": [n for n in names if int(((labels == n) & usable).sum()) == 1],
        "merged": {
            "pairs": int(len(rows)),
            "agreement": a,
            "reliability": r,
            "pairs_needed": pairs_needed(a),
            "threshold": RELIABILITY_THRESHOLD,
            "agrees": None if r is None else bool(r >= RELIABILITY_THRESHOLD),
        },
    }


def _merged_sentence(across: dict) -> str:
    m = across["merged"]
    if m["agrees"] is None:
        return "merged into one subtask, its agreement could not be measured either"
    verdict = "at or over" if m["agrees"] else "under"
    need = (
        ""
        if m["agrees"]
        else (
            f"; at that agreement about {m['pairs_needed']} such pairs would reach it"
            if m["pairs_needed"]
            else "; at that agreement no number of such pairs reaches it"
        )
    )
    return (
        f"merged into one subtask of {m['pairs']} pairs they would agree at {m['agreement']:+.3f}, a reliability of "
        f"{m['reliability']:.2f}, {verdict} the threshold {m['threshold']:.2f}{need}"
    )


def agreement_warnings(report: dict[str, dict], across: dict | None = None) -> list[str]:
    """One sentence per subtask whose pairs do not agree enough (or cannot be checked: a single pair). With
    `across` (`across_subtasks`), the subtasks of a single pair get one sentence together: how their pairs agree
    across subtasks, and what merging every subtask's pairs into one would give."""
    out = []
    singles = set(across["single_pair_subtasks"]) if across and len(across["single_pair_subtasks"]) > 1 else set()
    if singles:
        names = [n for n in report if n in singles]
        shown = ", ".join(repr(n) for n in names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        between = (
            f"across subtasks the pairs agree at {across['between']:+.3f} (mean cosine of the gradients of pairs of "
            "different subtasks)"
            if across["between"] is not None
            else "their agreement across subtasks could not be measured"
        )
        helps = (
            "give the pairs one subtask, so that the selection follows what they share"
            if across["merged"]["agrees"]
            else WHAT_HELPS
        )
        out.append(
            f"{len(names)} subtasks hold a single validation pair each ({shown}): their own agreement cannot be "
            f"measured, and each one's picks follow its one pair; {between}; {_merged_sentence(across)}. What "
            f"helps: {helps}."
        )
    for name, s in report.items():
        if name in singles:
            continue
        if s["agrees"] is None:
            out.append(
                f"subtask {name!r} has a single validation pair: its agreement cannot be measured, and the "
                f"picks follow that one pair. What helps: {WHAT_HELPS}."
            )
        elif not s["agrees"]:
            need = (
                f"at this agreement about {s['pairs_needed']} pairs would reach it"
                if s["pairs_needed"]
                else "at this agreement no number of such pairs reaches it"
            )
            out.append(
                f"subtask {name!r}: its {s['pairs']} validation pairs agree at {s['agreement']:+.3f} (mean "
                f"cosine of their gradients), a reliability of {s['reliability']:.2f}, under "
                f"{s['threshold']:.2f}: the picks will follow single pairs rather than what the pairs share "
                f"({need}). What helps: {WHAT_HELPS}."
            )
    return out


def agreement_report(
    vectors: list[np.ndarray], learning_rates: list[float], subtasks: list[str], usable: np.ndarray | None = None
) -> tuple[dict[str, dict], dict, list[str]]:
    """The run's whole agreement report: (`validation_agreement`, `across_subtasks`, `agreement_warnings`)."""
    agreement = validation_agreement(vectors, learning_rates, subtasks, usable)
    across = across_subtasks(vectors, learning_rates, subtasks, usable)
    return agreement, across, agreement_warnings(agreement, across)
