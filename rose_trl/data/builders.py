"""Rebuild the paper's few-shot preference sets from the original Hub datasets, seeded.

`build_preference_set(task, k, seed, exclude_prompts)` (or `load_preferences("rose:<task>", k=..., seed=...)`)
-> Dataset(prompt, chosen, rejected, subtask), k pairs per subtask. Prompts and responses follow the
released files: prompt "\\n\\nHuman: <text>\\n\\nAssistant:", responses with a leading space.

  shp  stanfordnlp/SHP, one subtask per subreddit (18), k=5. Pairs with score_ratio >= 3; one pair per
       post (its highest score_ratio), posts drawn at random.
  se   HuggingFaceH4/stack-exchange-preferences, one subtask per site (10; each site is its own data_dir
       `data/<site host>`), k=2. Chosen: the answer with the highest pm_score (accepted first on ties);
       rejected: a random answer with a strictly lower pm_score.
  hh   Anthropic/hh-rlhf, subtasks harmless-base and red-team-attempts, k=1. Pairs are harmless-base
       {chosen, rejected} dialogues split at their last "\\n\\nAssistant:". red-team-attempts rows are single
       transcripts with no rejected response; the HH card says they extend harmlessness conversations
       with the chosen responses, so a harmless-base pair goes to subtask "red-team-attempts" when its
       prompt begins a red-team transcript (whitespace-normalized), and to "harmless-base" otherwise.

Every subtask draws from its own generator seeded with (seed, subtask position), so asking for fewer
subtasks does not change the pairs of the others. Prompts in `exclude_prompts` (compared stripped,
e.g. the released test prompts) are never drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np


HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"

SHP_SUBREDDITS = (
    "askacademia",
    "askanthropology",
    "askbaking",
    "askcarguys",
    "askculinary",
    "askdocs",
    "askengineers",
    "askhistorians",
    "askhr",
    "askphilosophy",
    "askphysics",
    "askscience",
    "asksciencefiction",
    "asksocialscience",
    "askvet",
    "changemyview",
    "explainlikeimfive",
    "legaladvice",
)
SE_SITES = {
    "academia": "academia.stackexchange.com",
    "apple": "apple.stackexchange.com",
    "askubuntu": "askubuntu.com",
    "english": "english.stackexchange.com",
    "gaming": "gaming.stackexchange.com",
    "physics": "physics.stackexchange.com",
    "security": "security.stackexchange.com",
    "sharepoint": "sharepoint.stackexchange.com",
    "softwareengineering": "softwareengineering.stackexchange.com",
    "workplace": "workplace.stackexchange.com",
}
HH_SUBTASKS = ("harmless-base", "red-team-attempts")


def hh_prompt(text: str) -> str:
    return f"{HUMAN}{text}{ASSISTANT}"


def split_dialogue(text: str) -> tuple[str, str] | None:
    """HH dialogue -> (prompt through the last "\\n\\nAssistant:", final response); None without one."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        return None
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _take(candidates: Iterator[dict], k: int, banned: set[str], task: str, subtask: str) -> list[dict]:
    rows, seen = [], set()
    for row in candidates:
        key = row["prompt"].strip()
        if (
            key in banned
            or key in seen
            or row["chosen"] == row["rejected"]
            or not row["chosen"].strip()
            or not row["rejected"].strip()
        ):
            continue
        seen.add(key)
        rows.append({**row, "subtask": subtask})
        if len(rows) == k:
            return rows
    raise ValueError(f"{task}: subtask {subtask!r} has only {len(rows)} usable pairs, fewer than k={k}")


def _shp_candidates(ds: datasets.Dataset, rng: np.random.Generator, min_score_ratio: float) -> Iterator[dict]:
    cols = ds.select_columns(["post_id", "history", "human_ref_A", "human_ref_B", "labels", "score_ratio"]).to_dict()
    best: dict[str, int] = {}
    for i, (post, ratio) in enumerate(zip(cols["post_id"], cols["score_ratio"], strict=True)):
        if (
            ratio is not None
            and ratio >= min_score_ratio
            and (post not in best or ratio > cols["score_ratio"][best[post]])
        ):
            best[post] = i
    posts = sorted(best)
    for j in rng.permutation(len(posts)):
        i = best[posts[j]]
        a, b = cols["human_ref_A"][i], cols["human_ref_B"][i]
        win, lose = (a, b) if cols["labels"][i] == 1 else (b, a)
        yield {"prompt": hh_prompt(cols["history"][i]), "chosen": " " + win, "rejected": " " + lose}


def build_shp(
    *,
    k: int = 5,
    seed: int = 0,
    exclude_prompts: Iterable[str] | None = None,
    subtasks: Sequence[str] | None = None,
    split: str = "train",
    min_score_ratio: float = 3.0,
    dataset: str = "stanfordnlp/SHP",
    **load_kwargs,
) -> datasets.Dataset:
    banned = {p.strip() for p in exclude_prompts or ()}
    rows = []
    for pos, sub in enumerate(SHP_SUBREDDITS):
        if subtasks is not None and sub not in subtasks:
            continue
        ds = datasets.load_dataset(dataset, data_dir=sub, split=split, **load_kwargs)
        rng = np.random.default_rng([seed, pos])
        rows += _take(_shp_candidates(ds, rng, min_score_ratio), k, banned, "shp", sub)
    return datasets.Dataset.from_list(rows)


def _se_candidates(ds: datasets.Dataset, host: str, rng: np.random.Generator) -> Iterator[dict]:
    for i in rng.permutation(len(ds)):
        row = ds[int(i)]
        urls = row.get("metadata") or []
        if urls and not any(host in str(u) for u in urls):
            continue  # a row from another site: the data_dir did not hold what it should
        answers = [a for a in row.get("answers") or [] if isinstance(a.get("text"), str) and a["text"].strip()]
        if len(answers) < 2:
            continue
        best = max(answers, key=lambda a: (a["pm_score"], bool(a.get("selected"))))
        lower = [a for a in answers if a["pm_score"] < best["pm_score"]]
        if not lower:
            continue
        worse = lower[int(rng.integers(len(lower)))]
        yield {"prompt": hh_prompt(row["question"]), "chosen": " " + best["text"], "rejected": " " + worse["text"]}


def build_se(
    *,
    k: int = 2,
    seed: int = 0,
    exclude_prompts: Iterable[str] | None = None,
    subtasks: Sequence[str] | None = None,
    split: str = "train",
    dataset: str = "HuggingFaceH4/stack-exchange-preferences",
    **load_kwargs,
) -> datasets.Dataset:
    banned = {p.strip() for p in exclude_prompts or ()}
    rows = []
    for pos, (site, host) in enumerate(SE_SITES.items()):
        if subtasks is not None and site not in subtasks:
            continue
        ds = datasets.load_dataset(dataset, data_dir=f"data/{host}", split=split, **load_kwargs)
        rng = np.random.default_rng([seed, pos])
        rows += _take(_se_candidates(ds, host, rng), k, banned, "se", site)
    return datasets.Dataset.from_list(rows)


def _hh_pairs(ds: datasets.Dataset) -> list[dict]:
    pairs = []
    cols = ds.select_columns(["chosen", "rejected"]).to_dict()
    for chosen, rejected in zip(cols["chosen"], cols["rejected"], strict=True):
        c, r = split_dialogue(chosen), split_dialogue(rejected)
        if c is None or r is None or c[0] != r[0]:
            continue  # the two dialogues must share their context
        pairs.append({"prompt": c[0], "chosen": c[1], "rejected": r[1]})
    return pairs


def _first_turn(text: str) -> str:
    body = text.split(HUMAN.strip(), 1)[-1]
    return _norm(body.split("Assistant:", 1)[0])


def build_hh(
    *,
    k: int = 1,
    seed: int = 0,
    exclude_prompts: Iterable[str] | None = None,
    subtasks: Sequence[str] | None = None,
    split: str = "train",
    dataset: str = "Anthropic/hh-rlhf",
    **load_kwargs,
) -> datasets.Dataset:
    banned = {p.strip() for p in exclude_prompts or ()}
    pairs = _hh_pairs(datasets.load_dataset(dataset, data_dir="harmless-base", split=split, **load_kwargs))
    # Red-team transcripts exist only as a train file; bucket them by first human turn for the prefix join.
    red = datasets.load_dataset(dataset, data_dir="red-team-attempts", split="train", **load_kwargs)
    buckets: dict[str, list[str]] = {}
    for t in red.select_columns(["transcript"]).to_dict()["transcript"]:
        buckets.setdefault(_first_turn(t), []).append(_norm(t))
    groups: dict[str, list[dict]] = {name: [] for name in HH_SUBTASKS}
    for p in pairs:
        context = _norm(p["prompt"])
        in_red = any(t.startswith(context) for t in buckets.get(_first_turn(p["prompt"]), ()))
        groups["red-team-attempts" if in_red else "harmless-base"].append(p)
    rows = []
    for pos, name in enumerate(HH_SUBTASKS):
        if subtasks is not None and name not in subtasks:
            continue
        rng = np.random.default_rng([seed, pos])
        cands = groups[name]
        rows += _take((cands[int(i)] for i in rng.permutation(len(cands))), k, banned, "hh", name)
    return datasets.Dataset.from_list(rows)


@dataclass(frozen=True)
class PreferenceTask:
    """A task the registry can build: its builder, the paper's k and its subtasks (in released order)."""

    name: str
    builder: Callable[..., datasets.Dataset]
    default_k: int
    subtasks: tuple[str, ...]
    hub_dataset: str


PREFERENCE_TASKS = {
    "shp": PreferenceTask("shp", build_shp, 5, SHP_SUBREDDITS, "stanfordnlp/SHP"),
    "se": PreferenceTask("se", build_se, 2, tuple(SE_SITES), "HuggingFaceH4/stack-exchange-preferences"),
    "hh": PreferenceTask("hh", build_hh, 1, HH_SUBTASKS, "Anthropic/hh-rlhf"),
}


def build_preference_set(
    task: str,
    k: int | None = None,
    seed: int = 0,
    exclude_prompts: Iterable[str] | None = None,
    subtasks: Sequence[str] | None = None,
    split: str = "train",
    **kwargs,
) -> datasets.Dataset:
    """The paper's few-shot preference set for `task` ("shp", "se", "hh"), rebuilt from the Hub, seeded.

    k: pairs per subtask (default: the paper's, shp 5, se 2, hh 1). subtasks: a subset of the task's
    subtasks (default all). kwargs go to the builder (e.g. `min_score_ratio` for shp, `revision`)."""
    if task not in PREFERENCE_TASKS:
        raise ValueError(f"unknown preference task {task!r}; known: {sorted(PREFERENCE_TASKS)}")
    spec = PREFERENCE_TASKS[task]
    if subtasks is not None:
        unknown = [s for s in subtasks if s not in spec.subtasks]
        if unknown:
            raise ValueError(f"{task}: unknown subtask(s) {unknown}; known: {list(spec.subtasks)}")
    k = spec.default_k if k is None else k
    if k < 1:
        raise ValueError(f"{task}: k must be >= 1, got {k}")
    return spec.builder(k=k, seed=seed, exclude_prompts=exclude_prompts, subtasks=subtasks, split=split, **kwargs)
