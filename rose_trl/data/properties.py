"""Property targets on real text: a preference for one visible property of real answers, in either direction,
shown as minimal pairs.

A property is something an answer visibly has or lacks: SE answers that link (`<a href=...>`), that use code
markup, that emphasize words or quote a source; HH replies that end by asking the user a question. Its pairs
are **minimal pairs**: chosen = a real answer that has the property, rejected = the same answer with only the
property removed (`Property.remove`, e.g. every link unwrapped to its text), or the other way round for the
direction that prefers its absence. Where removal is impossible (a reply that declines) the closest natural
counterpart is used instead, the other answer to the same prompt when it does not decline, and the property
says so (`Property.removal`).

The pairs are built from real text (the shipped slice, `rose_trl/data/real/`, and optionally the paper's
test answers) but the preference is a constructed one: a task like this tests the mechanism (does a selector
follow the direction of its validation pairs, and does training on its picks move a model that way), not the
paper's benchmark.

`property_suite` allocates every property of a suite at once, so that all its targets share one pool (one
warm-up and one pool gradient store serve every property and both directions):
- validation: per property, up to `n_validation` minimal pairs from the slice; a target's validation set is
  the first k of them (`PropertySuite.task(..., k=...)`), and a shots sweep reads all of them;
- held-out: per property, `heldout_dev` + `heldout_test` minimal pairs, from the paper's test answers when
  `test_root` (a copy of the release: `<root>/test/<task>/*.json`) is given, else from the slice;
- pool: real answers from the slice, one per prompt, `pool_sizes[task]` per task, with at least `pool_min`
  rows of each property (drawn first, then the rest at random), labelled `has_<property>` for every property.
No prompt is used twice: a pool row, a validation pair and a held-out pair never share a prompt.

What a model sees: every answer is at most `max_chars` characters; a pair's two answers differ within their
first `window_chars` characters, and a pool row's labels read the same on its first `window_chars` characters,
so that a model reading the start of each answer (SFT and evaluation keep a response's first tokens) sees every
difference. Validation pairs are also at most `validation_max_chars` characters: ROSE's DPO validation pass
keeps a sequence's *last* tokens (validation.py), so the whole answer must fit (450 characters: about 130
SmolLM2 tokens of SE HTML, within `max_length` 160).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from rose_trl.data.realtext import TASKS, RealTask, load_slice


DIRECTIONS = ("prefer", "avoid")

# ---------------------------------------------------------------------------------- the properties

_ANCHOR = re.compile(r"<a\s[^>]*>(.*?)</a>", re.S | re.I)
_URL = re.compile(r"https?://|www\.", re.I)


def _unwrap_links(text: str) -> str | None:
    out = _ANCHOR.sub(lambda m: m.group(1), text)
    return None if re.search(r"<a\s", out, re.I) or _URL.search(out) else out


_PRE_CODE = re.compile(r"<pre[^>]*>\s*<code>(.*?)</code>\s*</pre>", re.S | re.I)
_PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S | re.I)
_CODE = re.compile(r"<code>(.*?)</code>", re.S | re.I)


def _unwrap_code(text: str) -> str | None:
    out = _PRE_CODE.sub(lambda m: f"<p>{m.group(1)}</p>", text)
    out = _PRE.sub(lambda m: f"<p>{m.group(1)}</p>", out)
    out = _CODE.sub(lambda m: m.group(1), out)
    return None if re.search(r"<(code|pre)\b", out, re.I) else out


_EMPHASIS = re.compile(r"<(strong|em|b|i)>(.*?)</\1>", re.S | re.I)


def _unwrap_emphasis(text: str) -> str | None:
    out = text
    for _ in range(3):  # nested emphasis (<strong><em>x</em></strong>)
        out = _EMPHASIS.sub(lambda m: m.group(2), out)
    return None if re.search(r"<(strong|em|b|i)>", out, re.I) else out


_QUOTE = re.compile(r"<blockquote>\s*(.*?)\s*</blockquote>", re.S | re.I)


def _unquote(text: str) -> str | None:
    out = text
    for _ in range(3):  # nested quotes
        out = _QUOTE.sub(lambda m: m.group(1), out)
    return None if "<blockquote" in out.lower() else out


_LIST = re.compile(r"<(ul|ol)>\s*(.*?)\s*</\1>", re.S | re.I)
_ITEM = re.compile(r"<li>\s*(.*?)\s*</li>", re.S | re.I)


def _list_to_paragraphs(text: str) -> str | None:
    def paragraphs(m: re.Match) -> str:
        items = [re.sub(r"^<p>(.*)</p>$", r"\1", i.strip(), flags=re.S) for i in _ITEM.findall(m.group(2))]
        return "\n".join(f"<p>{i}</p>" for i in items)

    out = _LIST.sub(paragraphs, text)
    return None if re.search(r"<(ul|ol|li)>", out, re.I) else out


# A sentence ends at . ! or ? (closing quotes or brackets may follow) before white space.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s)")


def _drop_trailing_questions(text: str) -> str | None:
    """The reply without the question(s) it ends on; None when nothing (or under 20 characters) is left."""
    stripped = text.rstrip()
    if not stripped.endswith("?"):
        return None
    starts = [0] + [m.end() for m in _SENTENCE_END.finditer(stripped)]
    cut = len(stripped)
    for start in reversed(starts):  # walk back over the sentences that end with "?"
        if stripped[start:cut].strip().endswith("?"):
            cut = start
        else:
            break
    kept = stripped[:cut].rstrip()
    return kept if len(kept.strip()) >= 20 else None


_DECLINE = re.compile(
    r"\bI (can['’]?t|cannot|won['’]?t)\b|\bI['’]m not (able|going|comfortable)\b|"
    r"\bI don['’]t (think I should|want to|feel comfortable)\b",
    re.I,
)


@dataclass(frozen=True)
class Property:
    """One property of answers of `task`. `detect(answer)`: has it. `remove(answer)`: the same answer with only
    the property removed, or None when that cannot be done cleanly (the answer is then not used in a pair);
    None for a property with no removal, whose pairs are natural counterparts (`removal` says which)."""

    name: str
    task: str
    description: str
    detect: Callable[[str], bool]
    remove: Callable[[str], str | None] | None
    removal: str


PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property(
            "se_link",
            "se",
            "the answer links (an <a href> anchor or a URL)",
            lambda t: bool(re.search(r"<a\s[^>]*href", t, re.I) or _URL.search(t)),
            _unwrap_links,
            "every <a href=...>text</a> unwrapped to its text; answers whose text still holds a URL are not paired",
        ),
        Property(
            "se_code",
            "se",
            "the answer uses code markup (<code> or <pre>)",
            lambda t: bool(re.search(r"<(code|pre)\b", t, re.I)),
            _unwrap_code,
            "<code> unwrapped to its text, <pre> blocks turned into <p> paragraphs (the code text is kept)",
        ),
        Property(
            "se_emphasis",
            "se",
            "the answer emphasizes words (<strong>, <em>, <b>, <i>)",
            lambda t: bool(re.search(r"<(strong|em|b|i)>", t, re.I)),
            _unwrap_emphasis,
            "every <strong>/<em>/<b>/<i> unwrapped to its text",
        ),
        Property(
            "se_quote",
            "se",
            "the answer quotes a source (<blockquote>)",
            lambda t: "<blockquote" in t.lower(),
            _unquote,
            "<blockquote> unwrapped: the quoted paragraphs stay, as the answer's own",
        ),
        Property(
            "se_list",
            "se",
            "the answer is laid out as a list (<ul> or <ol>)",
            lambda t: bool(re.search(r"<(ul|ol)>", t, re.I)),
            _list_to_paragraphs,
            "each list item turned into a <p> paragraph",
        ),
        Property(
            "hh_question",
            "hh",
            "the reply ends by asking the user a question",
            lambda t: t.rstrip().endswith("?"),
            _drop_trailing_questions,
            "the question sentence(s) the reply ends on dropped; replies with under 20 characters left are not paired",
        ),
        Property(
            "hh_decline",
            "hh",
            "the reply declines (I can't / I won't / I'm not comfortable ...)",
            lambda t: bool(_DECLINE.search(t)),
            None,
            "no removal: the natural counterpart is the other answer to the same prompt, where it does not "
            "decline (slice pairs only; the test files hold one answer per prompt)",
        ),
    )
}
# The properties the data holds often enough for a suite (docs/results/property_targets.md gives the counts).
DEFAULT_PROPERTIES = ("se_link", "se_code", "se_emphasis", "hh_question")


# ---------------------------------------------------------------------------------- answers and pairs


@dataclass(frozen=True)
class _Answer:
    prompt: str
    text: str
    task: str
    subtask: str
    source: str  # "slice" or "test"
    other: str | None  # slice answers: the other answer to the same prompt


def _slice_answers(task: str) -> list[_Answer]:
    out = []
    for r in load_slice(task):
        out.append(_Answer(r["prompt"], r["chosen"], task, r["subtask"], "slice", r["rejected"]))
        out.append(_Answer(r["prompt"], r["rejected"], task, r["subtask"], "slice", r["chosen"]))
    return out


def _test_answers(test_root: Path, task: str, exclude: set[str]) -> list[_Answer]:
    from rose_trl.data.released import load_released_test

    folder = Path(test_root) / "test" / task
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: test_root must be a copy of the release (<root>/test/<task>/<task>_<subtask>.json)"
        )
    rows = load_released_test(folder)
    return [
        _Answer(r["prompt"], r["golden_answer"], task, r["subtask"], "test", None)
        for r in rows
        if r["prompt"] not in exclude and r["golden_answer"].strip()
    ]


def minimal_pair(prop: Property, answer: _Answer) -> tuple[str, str] | None:
    """(the answer with the property, without it) or None when the answer gives no clean pair."""
    if not prop.detect(answer.text):
        return None
    if prop.remove is not None:
        without = prop.remove(answer.text)
        if without is None or without == answer.text or not without.strip() or prop.detect(without):
            return None
        return answer.text, without
    if answer.other is None or prop.detect(answer.other) or not answer.other.strip():
        return None
    return answer.text, answer.other


def _fits(answer: _Answer, max_chars: int) -> bool:
    return bool(answer.text.strip()) and len(answer.text) <= max_chars


def first_difference(a: str, b: str) -> int:
    """The index of the first character where a and b differ (the shorter one's length if one extends the other)."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _pairs(
    prop: Property, answers: list[_Answer], used: set[str], n: int, max_chars: int, window_chars: int
) -> list[dict]:
    """Up to n minimal pairs of `prop` from `answers` (in their order), one per unused prompt (marked used);
    both answers of a pair fit max_chars and differ within their first window_chars characters (validation
    pairs are given a smaller max_chars: see property_suite)."""
    out = []
    for a in answers:
        if len(out) == n:
            break
        if a.task != prop.task or a.prompt in used or not _fits(a, max_chars):
            continue
        pair = minimal_pair(prop, a)
        if pair is None or len(pair[1]) > max_chars or first_difference(*pair) >= window_chars:
            continue
        used.add(a.prompt)
        out.append(
            {"prompt": a.prompt, "with": pair[0], "without": pair[1], "origin_subtask": a.subtask, "source": a.source}
        )
    return out


# ---------------------------------------------------------------------------------- the suite


@dataclass
class PropertyTask(RealTask):
    """A RealTask whose target is one property in one direction. pool's `answer`: chosen = the target's
    preferred side (rows of the property's task with the property when direction is "prefer", without it when
    "avoid"), rejected = that task's other rows, other = the other task's rows; `has_<property>` columns for
    every property of the suite. validation / heldout: minimal pairs oriented by the direction (subtask = the
    target's name), heldout with `half` (dev | test) and `source` (slice | test)."""

    property: str = ""
    direction: str = "prefer"
    removal: str = ""


def target_name(prop: str, direction: str) -> str:
    return f"{prop}_{direction}"


@dataclass
class PropertySuite:
    properties: tuple[str, ...]
    pool: datasets.Dataset  # prompt, completion, task, subtask, source, has_<property>...
    validation: dict[str, list[dict]]  # property -> pairs (prompt, with, without, origin_subtask, source)
    heldout: dict[str, list[dict]]  # property -> pairs, with half
    settings: dict = field(default_factory=dict)

    def counts(self) -> dict:
        """Per property: pool rows with it (and of its task), validation pairs, held-out pairs per half."""
        out = {}
        for name in self.properties:
            prop = PROPERTIES[name]
            out[name] = {
                "pool_with": len([has for has in self.pool[f"has_{name}"] if has]),
                "pool_task_rows": len([t for t in self.pool["task"] if t == prop.task]),
                "validation": len(self.validation[name]),
                **{h: len([p for p in self.heldout[name] if p["half"] == h]) for h in ("dev", "test")},
            }
        return out

    def task(self, prop: str, direction: str = "prefer", k: int = 10) -> PropertyTask:
        """The target `prop` in `direction` with its first k validation pairs."""
        if prop not in self.properties:
            raise ValueError(f"property {prop!r} is not in this suite {self.properties}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        pairs = self.validation[prop]
        if not 1 <= k <= len(pairs):
            raise ValueError(f"{prop}: k = {k}, the suite holds {len(pairs)} validation pairs")
        name = target_name(prop, direction)
        prefer = direction == "prefer"
        has, task = self.pool[f"has_{prop}"], self.pool["task"]
        spec = PROPERTIES[prop]
        answer = [
            "other" if t != spec.task else ("chosen" if h == prefer else "rejected")
            for h, t in zip(has, task, strict=True)
        ]
        pool = self.pool.add_column("answer", answer)

        def oriented(p: dict) -> dict:
            chosen, rejected = (p["with"], p["without"]) if prefer else (p["without"], p["with"])
            return {"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "subtask": name}

        validation = datasets.Dataset.from_list([oriented(p) for p in pairs[:k]])
        heldout = datasets.Dataset.from_list(
            [{**oriented(p), "half": p["half"], "source": p["source"]} for p in self.heldout[prop]]
        )
        return PropertyTask(
            name, k, pool, validation, heldout, property=prop, direction=direction, removal=spec.removal
        )


def property_suite(
    properties: tuple[str, ...] | list[str] = DEFAULT_PROPERTIES,
    pool_sizes: dict | None = None,
    pool_min: int = 30,
    n_validation: int = 50,
    heldout_dev: int = 40,
    heldout_test: int = 80,
    max_chars: int = 1000,
    window_chars: int = 250,
    validation_max_chars: int = 450,
    seed: int = 0,
    test_root: str | Path | None = None,
) -> PropertySuite:
    """Allocate `properties` (names in PROPERTIES) at once: see the module docstring. Raises ValueError naming
    the property and the counts when the data cannot fill a request."""
    properties = tuple(properties)
    unknown = [p for p in properties if p not in PROPERTIES]
    if unknown or not properties:
        raise ValueError(f"unknown properties {unknown}; known: {sorted(PROPERTIES)}")
    pool_sizes = dict(pool_sizes or {"se": 130, "hh": 70})
    if set(pool_sizes) - set(TASKS):
        raise ValueError(f"pool_sizes keys must be among {TASKS}, got {sorted(pool_sizes)}")
    rng = random.Random(seed)
    answers = {task: _slice_answers(task) for task in TASKS}
    for task in TASKS:
        rng.shuffle(answers[task])
    used: set[str] = set()  # prompts taken by validation and held-out pairs, then by the pool
    validation = {}
    for name in properties:
        prop = PROPERTIES[name]
        validation[name] = _pairs(
            prop, answers[prop.task], used, n_validation, min(max_chars, validation_max_chars), window_chars
        )
        if not validation[name]:
            raise ValueError(f"{name}: the slice holds no minimal pair within {max_chars} characters")
    heldout = {}
    slice_prompts = {a.prompt for task in TASKS for a in answers[task]}
    for name in properties:
        prop = PROPERTIES[name]
        if test_root is not None:
            source = _test_answers(Path(test_root), prop.task, slice_prompts)
            random.Random(f"{seed}-{name}").shuffle(source)
        else:
            source = answers[prop.task]
        want = heldout_dev + heldout_test
        pairs = _pairs(prop, source, used, want, max_chars, window_chars)
        if len(pairs) < want:
            where = "the test answers" if test_root is not None else "the slice (no test_root given)"
            raise ValueError(
                f"{name}: {want} held-out pairs wanted ({heldout_dev} dev + {heldout_test} test), "
                f"{where} hold {len(pairs)} more within {max_chars} characters"
            )
        for i, p in enumerate(pairs):
            p["half"] = "test" if i < heldout_test else "dev"
        heldout[name] = pairs
    pool = []
    for task, size in pool_sizes.items():
        # A row's labels must read the same on its first window_chars characters (what a model sees of it).
        free = [
            a
            for a in answers[task]
            if a.prompt not in used
            and _fits(a, max_chars)
            and all(PROPERTIES[p].detect(a.text) == PROPERTIES[p].detect(a.text[:window_chars]) for p in properties)
        ]
        taken: set[int] = set()  # indices into free, each also in pool and its prompt in used
        for name in (p for p in properties if PROPERTIES[p].task == task):
            detect = PROPERTIES[name].detect
            have = len([i for i in taken if detect(free[i].text)])
            for i, a in enumerate(free):
                if have >= pool_min or len(taken) >= size:
                    break
                if i not in taken and a.prompt not in used and detect(a.text):
                    taken.add(i)
                    used.add(a.prompt)
                    pool.append(a)
                    have += 1
            if have < min(pool_min, size):
                raise ValueError(
                    f"{name}: {pool_min} pool rows with the property wanted, the slice holds {have} "
                    f"more within {max_chars} characters"
                )
        for i, a in enumerate(free):
            if len(taken) >= size:
                break
            if i not in taken and a.prompt not in used:
                taken.add(i)
                used.add(a.prompt)
                pool.append(a)
        if len(taken) < size:
            raise ValueError(
                f"pool_sizes[{task!r}] = {size}: the slice holds {len(taken)} more answers within "
                f"{max_chars} characters"
            )
    rng.shuffle(pool)
    rows = [
        {
            "prompt": a.prompt,
            "completion": a.text,
            "task": a.task,
            "subtask": a.subtask,
            "source": f"{a.task}_{a.source}",
            **{f"has_{name}": PROPERTIES[name].detect(a.text) for name in properties},
        }
        for a in pool
    ]
    settings = dict(
        properties=list(properties),
        pool_sizes=pool_sizes,
        pool_min=pool_min,
        n_validation=n_validation,
        heldout_dev=heldout_dev,
        heldout_test=heldout_test,
        max_chars=max_chars,
        window_chars=window_chars,
        validation_max_chars=validation_max_chars,
        seed=seed,
        test_answers=test_root is not None,
    )
    return PropertySuite(properties, datasets.Dataset.from_list(rows), validation, heldout, settings)


def build_property_task(prop: str, direction: str = "prefer", k: int = 10, **suite_options) -> PropertyTask:
    """One target of `property_suite(**suite_options)` (the suite's properties default to DEFAULT_PROPERTIES,
    which must include `prop`): every target built with the same options shares one pool."""
    options = dict(suite_options)
    options.setdefault("properties", DEFAULT_PROPERTIES if prop in DEFAULT_PROPERTIES else (prop,))
    return property_suite(**options).task(prop, direction, k)


def property_counts(
    properties=None, max_chars: int = 1000, window_chars: int = 250, test_root: str | Path | None = None
) -> dict[str, dict]:
    """What the data holds per property, before any allocation: answers within max_chars that have it, and the
    prompts that give a minimal pair (differing within window_chars), in the slice and (with test_root) in the
    paper's test answers. What a suite can ask of each property."""
    out = {}
    slices = {task: _slice_answers(task) for task in TASKS}
    tests = {}
    for name in properties or PROPERTIES:
        prop = PROPERTIES[name]
        sources = {"slice": slices[prop.task]}
        if test_root is not None:
            if prop.task not in tests:
                tests[prop.task] = _test_answers(Path(test_root), prop.task, {a.prompt for a in slices[prop.task]})
            sources["test"] = tests[prop.task]
        out[name] = {}
        for source, answers in sources.items():
            fit = [a for a in answers if _fits(a, max_chars)]
            out[name][f"{source}_answers"] = len(fit)
            out[name][f"{source}_with"] = sum(prop.detect(a.text) for a in fit)
            out[name][f"{source}_pair_prompts"] = len(_pairs(prop, fit, set(), len(fit), max_chars, window_chars))
    return out
