"""Do a subtask's validation pairs agree? Their gradients' agreement, the target's reliability, and the warning.

A subtask's target is the mean of its k pairs' unit validation gradients. What the pairs share (the preference
they all express) adds up in that mean; what each pair has of its own (its topic, its wording) averages out
only slowly. With a = the mean pairwise cosine of the k unit gradients (`pair_agreement`), the share of the
target that the pairs have in common is the Spearman-Brown reliability of a mean of k items:

    R(a, k) = k a / (1 + (k - 1) a)            (`reliability`; a <= 0 gives R = 0)

R near 1: the pairs agree, and the selection follows what they share. R near 0: the target is the sum of the
pairs' particulars, and the picks follow single pairs: another draw of as many pairs would pick other rows.

The threshold `RELIABILITY_THRESHOLD` comes from the shots sweep of docs/selection_quality.md (d)
(benchmarks/quality/property_sweep.py): on SmolLM2-135M, with property targets whose preference the model can learn,
it is the lowest reliability from which two disjoint draws of as many pairs pick, at the median, at least
half of the same rows. Below it the selection is more the pairs' draw than their preference.
`validation_agreement` computes the report that selection/summary.json, the HTML report and `rose-trl
explain` show; `agreement_warnings` words it.
"""

from __future__ import annotations

import math

import numpy as np

from rose_trl.utils.timing import stage


# Measured, not chosen: docs/selection_quality.md (d), "the shots sweep" (benchmarks/quality/property_sweep.py). On
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


def agreement_warnings(report: dict[str, dict]) -> list[str]:
    """One sentence per subtask whose pairs do not agree enough (or cannot be checked: a single pair)."""
    out = []
    for name, s in report.items():
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
