"""Statistics and tables of benchmarks/quality/real_model.py: what a selection holds, how the trained model does on
held-out pairs, and paired differences against random (the same pairs, so pair-to-pair variance cancels)."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from rose_trl.evaluation.metrics import bootstrap_interval


ANSWERS = ("chosen", "rejected", "other")


def auc(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive row > score of a negative row), ties 1/2."""
    diff = scores[positive][:, None] - scores[negative][None, :]
    credit = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))  # a win 1, a tie 1/2, a loss 0
    return float(credit.mean())


def auc_interval(
    scores: np.ndarray, positive: np.ndarray, negative: np.ndarray, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of `auc`, rows resampled within each class."""
    rng = np.random.default_rng(seed)
    values = [
        auc(scores, rng.choice(positive, len(positive)), rng.choice(negative, len(negative))) for _ in range(resamples)
    ]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def composition(pool: Dataset, picks: list[int], scores) -> dict:
    """Shares of target-chosen / target-rejected / other rows in the picks, the chosen share of the target
    picks with its interval, how many target subtasks they cover, and (scored methods) the AUC of the score
    for target-chosen over target-rejected rows."""
    answers = np.asarray(pool["answer"])
    subtasks = np.asarray(pool["subtask"])
    picked = answers[np.asarray(picks, dtype=np.int64)]
    out = {a: float(np.mean(picked == a)) for a in ANSWERS}
    target_picks = picked[picked != "other"]
    out["chosen_of_target"] = float(np.mean(target_picks == "chosen")) if len(target_picks) else float("nan")
    out["chosen_of_target_ci"] = bootstrap_interval((target_picks == "chosen").astype(float))
    out["subtasks"] = len(set(subtasks[np.asarray(picks, dtype=np.int64)][picked != "other"].tolist()))
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        pos, neg = np.flatnonzero(answers == "chosen"), np.flatnonzero(answers == "rejected")
        out["auc_chosen_rejected"] = auc(scores, pos, neg)
        out["auc_chosen_rejected_ci"] = auc_interval(scores, pos, neg)
    return out


def pool_shares(pool: Dataset) -> dict:
    answers = np.asarray(pool["answer"])
    return {a: float(np.mean(answers == a)) for a in ANSWERS}


def paired_difference(rows: list[dict], baseline: list[dict], half: str, key: str) -> dict | None:
    """Mean over pairs of (this method's per-pair `key` - the baseline's), each side averaged over its runs
    (random: its seeds), with a 95% bootstrap interval over pairs. key: "wins" (accuracy) or "margins"."""
    if not rows or not baseline or half not in rows[0] or half not in baseline[0]:
        return None
    mine = np.mean([r[half][key] for r in rows], axis=0)
    theirs = np.mean([r[half][key] for r in baseline], axis=0)
    diff = np.asarray(mine) - np.asarray(theirs)
    return {"mean": float(diff.mean()), "ci": bootstrap_interval(diff)}


def fmt_ci(value, ci, digits=3) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_diff(d: dict | None, digits=3) -> str:
    if d is None:
        return "-"
    return f"{d['mean']:+.{digits}f} [{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]"


def _auc_text(rows: list[dict]) -> str:
    aucs = [r["composition"].get("auc_chosen_rejected") for r in rows]
    if aucs[0] is None:
        return "-"
    if len(rows) == 1:
        return fmt_ci(aucs[0], rows[0]["composition"]["auc_chosen_rejected_ci"], 2)
    return f"{np.mean(aucs):.2f} +- {np.std(aucs):.2f}"


def _accuracy_text(rows: list[dict], half: str) -> tuple[str, str, float]:
    if len(rows) == 1:
        r = rows[0][half]
        return (
            fmt_ci(r["accuracy"], r["accuracy_ci"]),
            fmt_ci(r["reward_margin"], r["reward_margin_ci"], 4),
            r["chosen_nll"],
        )
    acc = [r[half]["accuracy"] for r in rows]
    margin = [r[half]["reward_margin"] for r in rows]
    return (
        f"{np.mean(acc):.3f} +- {np.std(acc):.3f} ({len(rows)} seeds)",
        f"{np.mean(margin):.4f} +- {np.std(margin):.4f}",
        float(np.mean([r[half]["chosen_nll"] for r in rows])),
    )


HEADER = (
    "| budget | method | picks chosen / rejected / other | AUC chosen>rejected | accuracy [95% CI] "
    "| accuracy - random [95% CI] | mean margin [95% CI] | margin - random [95% CI] | chosen NLL |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def method_rows(by_method: dict, budgets, half: str, random_runs: dict | None = None) -> list[str]:
    """Table rows; `random_runs` (random's {budget: rows}) when this table has no random of its own (a larger
    k: the pool, the held-out pairs and random's picks are the default k's)."""
    lines = []
    for budget in budgets:
        random_rows = (by_method.get("random") or random_runs or {}).get(str(budget), [])
        for method, by_budget in by_method.items():
            rows = by_budget.get(str(budget))
            if not rows:
                continue
            comp = " / ".join(f"{np.mean([r['composition'][x] for r in rows]):.2f}" for x in ANSWERS)
            if half not in rows[0]:
                lines.append(f"| {budget:.0%} | {method} | {comp} | {_auc_text(rows)} | not trained | | | | |")
                continue
            acc, margin, nll = _accuracy_text(rows, half)
            vs = (
                (None, None)
                if method == "random"
                else (
                    paired_difference(rows, random_rows, half, "wins"),
                    paired_difference(rows, random_rows, half, "margins"),
                )
            )
            lines.append(
                f"| {budget:.0%} | {method} | {comp} | {_auc_text(rows)} | {acc} | {fmt_diff(vs[0])} "
                f"| {margin} | {fmt_diff(vs[1], 4)} | {nll:.3f} |"
            )
    return lines


def print_tables(results: dict, args) -> None:
    mode = "quick" if args.quick else "full"
    for name, res in results.items():
        if name.endswith("_variants"):
            continue
        shares = res["pool"]
        print(
            f"\n### {name} ({mode}): pool {shares['rows']} rows (chosen {shares['chosen']:.2f} / rejected "
            f"{shares['rejected']:.2f} / other {shares['other']:.2f}: random's expected shares), "
            f"{res['validation_pairs']} validation pairs, held-out pairs {res['heldout']}"
        )
        for h in res.get("base", {}):
            base = res["base"][h]
            print(
                f"\n{h} half ({res['heldout'][h]} pairs). base: likelihood accuracy "
                f"{fmt_ci(base['likelihood_accuracy'], base['likelihood_accuracy_ci'])}, chosen NLL "
                f"{base['chosen_nll']:.3f}"
            )
            print(HEADER)
            print("\n".join(method_rows(res["methods"], args.budgets, h, random_runs(results, name))))
    for name, res in results.items():
        if name.endswith("_variants"):
            print_variants(name.replace("_variants", ""), res)


def random_runs(results: dict, name: str) -> dict | None:
    """random's runs for the table `name` (<target>_k<k>): its own, or those of another k of the same target."""
    target = name.rsplit("_k", 1)[0]
    for other, res in results.items():
        if other.rsplit("_k", 1)[0] == target and "random" in res.get("methods", {}):
            return res["methods"]["random"]
    return None


def print_variants(target: str, res: dict) -> None:
    budget, half = res["budget"], res["half"]
    random_rows = res["random"]
    acc, margin, _ = _accuracy_text(random_rows, half) if random_rows else ("-", "-", 0)
    print(
        f"\n### {target}: ROSE's options on the {half} half, each selection at {budget:.0%} trained and evaluated "
        f"({res['pairs']} pairs); random: accuracy {acc}, margin {margin}"
    )
    print(
        "| variant | chosen / rejected / other | AUC chosen>rejected [95% CI] | subtasks | accuracy [95% CI] "
        "| accuracy - random [95% CI] | margin - random [95% CI] |\n|---|---|---|---|---|---|---|"
    )
    for variant, row in res["variants"].items():
        if "refused" in row:
            print(f"| {variant} | refused: {row['refused'][:80]} | | | | | |")
            continue
        c = row["composition"]
        auc_text = (
            fmt_ci(c["auc_chosen_rejected"], c["auc_chosen_rejected_ci"], 2) if "auc_chosen_rejected" in c else "-"
        )
        print(
            f"| {variant} | {c['chosen']:.2f} / {c['rejected']:.2f} / {c['other']:.2f} | {auc_text} | {c['subtasks']} "
            f"| {fmt_ci(row[half]['accuracy'], row[half]['accuracy_ci'])} "
            f"| {fmt_diff(paired_difference([row], random_rows, half, 'wins'))} "
            f"| {fmt_diff(paired_difference([row], random_rows, half, 'margins'), 4)} |"
        )


def summary_line(results: dict, args) -> str:
    parts = [f"mode={'quick' if args.quick else 'full'}"]
    for name, res in results.items():
        if name.endswith("_variants") or "test" not in res.get("base", {}):
            continue
        for budget in args.budgets:
            by = {m: res["methods"].get(m, {}).get(str(budget)) for m in ("rose", "less", "random")}
            for method, rows in by.items():
                if rows and "test" in rows[0]:
                    parts.append(
                        f"{name}@{round(budget * 100)}%.{method}={np.mean([r['test']['accuracy'] for r in rows]):.3f}"
                    )
            d = paired_difference(
                by["rose"], by["random"] or (random_runs(results, name) or {}).get(str(budget)), "test", "wins"
            )
            if d:
                parts.append(f"{name}@{round(budget * 100)}%.rose-random={d['mean']:+.3f}")
    return " ".join(parts)
