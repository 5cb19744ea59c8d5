"""Tables of benchmarks/quality/property_targets.py (markdown, as docs/results/property_targets.md quotes them)."""

from __future__ import annotations

import numpy as np
from real_model_report import fmt_ci, fmt_diff

from rose_trl.evaluation.metrics import bootstrap_interval


def paired(rows: list[dict], baseline: list[dict], key: str) -> dict:
    """Mean over pairs of (rows' mean per pair - baseline's mean per pair), with a 95% bootstrap interval."""
    diff = np.mean([r[key] for r in rows], axis=0) - np.mean([r[key] for r in baseline], axis=0)
    return {"mean": float(diff.mean()), "ci": bootstrap_interval(diff)}


def _mean_sd(values) -> str:
    return f"{np.mean(values):.2f} +- {np.std(values):.2f}"


def _cell(entry: dict, key: str, digits: int = 2) -> str:
    """A sweep summary's (mean, sd) entry as "mean +- sd", or "-" where it is missing."""
    if entry[key] is None:
        return "-"
    mean, sd = entry[key]
    return f"{mean:.{digits}f} +- {sd:.{digits}f}"


def data_table(results: dict) -> list[str]:
    run = set(results["settings"]["properties"])
    suite = results["suite"]
    lines = [
        f"\n#### What the data holds (answers of at most {results['settings']['max_chars']} characters; a pair's "
        f"answers differ within their first {results['settings']['window_chars']}); held-out pairs from "
        f"{results['held_out_source']}",
        "| property | slice answers with it | slice prompts giving a minimal pair | test answers with it "
        "| test prompts giving a minimal pair | suite: pool rows with it / task rows | validation | dev / test "
        "| run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in results["data"].items():
        s = suite.get(name)
        in_suite = (
            f"{s['pool_with']} / {s['pool_task_rows']} | {s['validation']} | {s['dev']} / {s['test']}"
            if s
            else "- | - | -"
        )
        lines.append(
            f"| {name} | {c['slice_with']} of {c['slice_answers']} | {c['slice_pair_prompts']} "
            f"| {c.get('test_with', '-')}{' of ' + str(c['test_answers']) if 'test_answers' in c else ''} "
            f"| {c.get('test_pair_prompts', '-')} | {in_suite} | {'yes' if name in run else 'no'} |"
        )
    return lines


def oracle_table(results: dict) -> list[str]:
    lines = [
        "\n#### The oracle: LoRA SFT on pool rows with the property against as many without it "
        "(prefer pairs, test half)",
        "| property | budget | with: accuracy [95% CI] | with: margin | without: accuracy [95% CI] | without: margin "
        "| margin difference [95% CI] | accuracy difference [95% CI] | learnable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prop, by_budget in results["oracle"].items():
        for budget, r in by_budget.items():
            w, wo, d = r["with"], r["without"], r["difference"]
            lines.append(
                f"| {prop} | {float(budget):.0%} | {fmt_ci(w['accuracy'], w['accuracy_ci'])} "
                f"| {w['reward_margin']:+.4f} "
                f"| {fmt_ci(wo['accuracy'], wo['accuracy_ci'])} | {wo['reward_margin']:+.4f} "
                f"| {fmt_diff(d['margins'], 4)} | {fmt_diff(d['wins'])} | {'yes' if r['passes'] else 'no'} |"
            )
    return lines


def _picks(rows: list[dict]) -> str:
    return " / ".join(f"{np.mean([r['composition'][x] for r in rows]):.2f}" for x in ("chosen", "rejected", "other"))


def _auc(rows: list[dict]) -> str:
    values = [r["composition"].get("auc_chosen_rejected") for r in rows]
    if values[0] is None:
        return "-"
    if len(rows) == 1:
        return fmt_ci(values[0], rows[0]["composition"]["auc_chosen_rejected_ci"], 2)
    return _mean_sd(values)


def _trained_row(method: str, rows: list[dict], random_rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"| {method} | {fmt_ci(r['accuracy'], r['accuracy_ci'])} | {fmt_diff(paired(rows, random_rows, 'wins'))} "
        f"| {fmt_ci(r['reward_margin'], r['reward_margin_ci'], 4)} "
        f"| {fmt_diff(paired(rows, random_rows, 'margins'), 4)} |"
    )


def target_tables(prop: str, res: dict, budgets: list[float], train_budgets: list[float]) -> list[str]:
    lines = []
    for direction, d in res["directions"].items():
        pool = d["pool"]
        lines.append(
            f"\n#### {prop}, {direction}: selections (pool: preferred {pool['chosen']:.2f} / other side "
            f"{pool['rejected']:.2f} / other task {pool['other']:.2f})"
        )
        lines += [
            "| budget | method | picks preferred / other side / other task | AUC preferred > other side |",
            "|---|---|---|---|",
        ]
        for budget in budgets:
            for method, by_budget in d["methods"].items():
                rows = by_budget[str(budget)]
                lines.append(
                    f"| {budget:.0%} | {method}{f' ({len(rows)} seeds)' if len(rows) > 1 else ''} "
                    f"| {_picks(rows)} | {_auc(rows)} |"
                )
        for budget in train_budgets:
            random_rows = [r["test"] for r in d["methods"]["random"][str(budget)]]
            lines.append(
                f"\n#### {prop}, {direction}: trained on the {budget:.0%} selections, test pairs "
                f"({len(random_rows[0]['wins'])})"
            )
            lines += [
                "| method | accuracy [95% CI] | accuracy - random [95% CI] | margin [95% CI] "
                "| margin - random [95% CI] |",
                "|---|---|---|---|---|",
            ]
            for method, by_budget in d["methods"].items():
                rows = [r["test"] for r in by_budget[str(budget)]]
                if method == "random":
                    accuracies = [r["accuracy"] for r in rows]
                    margins = [r["reward_margin"] for r in rows]
                    acc = f"{np.mean(accuracies):.3f} +- {np.std(accuracies):.3f}"
                    margin = f"{np.mean(margins):+.4f} +- {np.std(margins):.4f}"
                    lines.append(f"| random ({len(rows)} seeds) | {acc} | - | {margin} | - |")
                    continue
                lines.append(_trained_row(method, rows, random_rows))
            for name, r in d.get("bounds", {}).get(str(budget), {}).items():
                lines.append(_trained_row(f"{name} (reads the labels)", [r], random_rows))
    return lines


def flip_table(results: dict, budget: float) -> list[str]:
    lines = [
        f"\n#### The flip test at {budget:.0%}: does the trained model move toward the preferred side in each "
        "direction? (implicit-reward margin against the base model, test pairs of that direction)",
        "| property | method | prefer: margin [95% CI] | avoid: margin [95% CI] | moves both ways |",
        "|---|---|---|---|---|",
    ]
    for prop, res in results["targets"].items():
        dirs = res["directions"]
        if set(dirs) != {"prefer", "avoid"}:
            continue
        for method in dirs["prefer"]["methods"]:
            cells, moves = [], []
            for direction in ("prefer", "avoid"):
                rows = [r["test"] for r in dirs[direction]["methods"][method][str(budget)]]
                margins = np.mean([r["margins"] for r in rows], axis=0)
                ci = bootstrap_interval(margins)
                cells.append(fmt_ci(float(margins.mean()), ci, 4))
                moves.append(ci[0] > 0)
            lines.append(f"| {prop} | {method} | {cells[0]} | {cells[1]} | {'yes' if all(moves) else 'no'} |")
    return lines


def answer_table(results: dict, budget: float) -> list[str]:
    """Per target and direction, ROSE against random and against LESS: the AUC of each (selection level) and
    the paired differences of held-out accuracy and margin at `budget` (training level)."""
    lines = [
        f"\n#### The answer per target at {budget:.0%}: ROSE against random (5 seeds) and against LESS, paired "
        "over the same test pairs",
        "| target | AUC rose / less / random | accuracy rose | rose - random [95% CI] | rose - less [95% CI] "
        "| margin: rose - random [95% CI] | margin: rose - less [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for prop, res in results["targets"].items():
        for direction, d in res["directions"].items():
            m = d["methods"]
            rows = {name: m[name][str(budget)] for name in ("rose", "less", "random") if name in m}
            if set(rows) != {"rose", "less", "random"}:
                continue
            test = {name: [r["test"] for r in rs] for name, rs in rows.items()}
            aucs = " / ".join(
                f"{np.mean([r['composition'].get('auc_chosen_rejected') for r in rows[x]]):.2f}"
                for x in ("rose", "less", "random")
            )
            lines.append(
                f"| {prop} {direction} | {aucs} | {test['rose'][0]['accuracy']:.3f} "
                f"| {fmt_diff(paired(test['rose'], test['random'], 'wins'))} "
                f"| {fmt_diff(paired(test['rose'], test['less'], 'wins'))} "
                f"| {fmt_diff(paired(test['rose'], test['random'], 'margins'), 4)} "
                f"| {fmt_diff(paired(test['rose'], test['less'], 'margins'), 4)} |"
            )
    return lines


def sweep_tables(sweep: dict) -> list[str]:
    lines = []
    for prop, res in sweep["targets"].items():
        lines += [
            f"\n#### Shots sweep, {prop} (prefer; avoid: the same agreement, AUC and reproducibility): "
            f"draws of k of its {res['pairs']} validation pairs",
            "| k | draws | agreement | reliability | AUC preferred > other side | preferred share of the top 10% "
            "| reproducibility (disjoint draw) |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in res["summary"]:
            lines.append(
                f"| {e['k']} | {e['draws']} | {_cell(e, 'agreement', 3)} | {_cell(e, 'reliability')} "
                f"| {_cell(e, 'auc')} | {_cell(e, 'share')} | {_cell(e, 'reproducibility')} |"
            )
    t = sweep["threshold"]
    lines += [
        f"\n#### Reproducibility by reliability, pooled over the targets ({t['points']} pairs of disjoint draws)",
        "| reliability | draws | median reproducibility |",
        "|---|---|---|",
    ]
    for b in t["bins"]:
        median = "-" if b["median_reproducibility"] is None else f"{b['median_reproducibility']:.2f}"
        lines.append(f"| {b['from']:.1f}-{b['to']:.1f} | {b['draws']} | {median} |")
    lines.append(
        f"\nthreshold (lowest reliability from which the median reproducibility stays >= 0.5): {t['threshold']}"
    )
    for task, r in sweep.get("released", {}).items():
        lines += [
            f"\n#### Released {task.upper()} {r['k']}-shot pairs on the same warm-up ({r['pairs']} pairs)",
            "| subtask | pairs | agreement |",
            "|---|---|---|",
        ]
        for name, s in r["subtasks"].items():
            a = "-" if s["agreement"] is None else f"{s['agreement']:+.4f}"
            lines.append(f"| {name} | {s['pairs']} | {a} |")
        mean = "-" if r["agreement"] is None else f"{r['agreement']:+.4f}"
        rel = ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in r["reliability"].items())
        lines.append(
            f"\nmean agreement per subtask {mean}; all pairs together {r['all_pairs_agreement']:+.4f}; "
            f"reliability {rel}"
        )
        lines += [
            f"\nall {r['pairs']} {task.upper()} pairs as one target, swept like the properties",
            "| k | draws | agreement | reliability | reproducibility (disjoint draw) |",
            "|---|---|---|---|---|",
        ]
        for e in r["sweep"]["summary"]:
            lines.append(
                f"| {e['k']} | {e['draws']} | {_cell(e, 'agreement', 3)} | {_cell(e, 'reliability')} "
                f"| {_cell(e, 'reproducibility')} |"
            )
    return lines


def print_report(results: dict) -> None:
    s = results["settings"]
    lines = data_table(results) + oracle_table(results)
    for prop, reason in results["skipped"].items():
        lines.append(f"\n{prop}: dropped: {reason}")
    for prop, res in results["targets"].items():
        lines += target_tables(prop, res, s["budgets"], s["train_budgets"])
    for budget in s["train_budgets"]:
        lines += flip_table(results, budget) + answer_table(results, budget)
    if "sweep" in results:
        lines += sweep_tables(results["sweep"])
    lines.append("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    print("\n".join(lines))
    print(summary_line(results))


def summary_line(results: dict) -> str:
    parts = []
    for prop, r in results["oracle"].items():
        for budget, o in r.items():
            parts.append(f"oracle.{prop}@{round(float(budget) * 100)}%={o['difference']['margins']['mean']:+.4f}")
    for prop, res in results["targets"].items():
        for direction, d in res["directions"].items():
            for budget in results["settings"]["train_budgets"]:
                random_rows = [r["test"] for r in d["methods"]["random"][str(budget)]]
                rose = [r["test"] for r in d["methods"]["rose"][str(budget)]]
                parts.append(
                    f"{prop}.{direction}@{round(budget * 100)}%.rose-random="
                    f"{paired(rose, random_rows, 'wins')['mean']:+.3f}"
                )
    return " ".join(parts)
