"""Pairwise win rate of a model's responses against the test set's best (reference) response.

As in the paper's evaluation, the judge always sees the model's response as "Response A" and the
reference as "Response B", gives a one-sentence comparison and then names the better response. A
judge is anything with `complete(prompts) -> list[str | None]` (None: the request itself failed):
an OpenAI-compatible chat endpoint or a local Hugging Face causal LM. Verdicts that cannot be parsed
are counted and reported in their own column, never dropped.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import requests

from rose_trl.evaluation.generation import GenerationOptions, generate_responses


if TYPE_CHECKING:  # names for the signatures only: importing this module stays light
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# The paper's Appendix D prompt could not be retrieved verbatim here; this follows its protocol
# (query, Response A = target model, Response B = reference, a "Comparison:" sentence, then
# "The better response:" naming A or B).
JUDGE_PROMPT = """For the following query to a chatbot, which response is better? \
Judge which one answers the query more helpfully, correctly and completely.

Query: {query}

Response A:
{response_a}

Response B:
{response_b}

FIRST provide a one-sentence comparison of the two responses and explain which you feel is better. \
SECOND, on a new line, state only "Response A" or "Response B" to indicate which response is better. \
Your answer should use the format:
Comparison: <one-sentence comparison and explanation>
The better response: <"Response A" or "Response B">"""


def build_judge_prompt(query: str, response_a: str, response_b: str, template: str = JUDGE_PROMPT) -> str:
    return template.format(query=query, response_a=response_a, response_b=response_b)


_VERDICT_LINE = re.compile(r"better\s+response", re.IGNORECASE)
_NAMED = re.compile(r"response\s*([ab])\b", re.IGNORECASE)
_BARE = re.compile(r"""[\s:\-*"'`<>\[\]()]*(?:response\s*)?([ab])[\s.!*"'`<>\[\]()]*""", re.IGNORECASE)


def _letter(fragment: str) -> str | None:
    """ "A"/"B" when the fragment names exactly one response; a template echo naming both is None."""
    named = {m.upper() for m in _NAMED.findall(fragment)}
    if len(named) == 1:
        return named.pop()
    if named:
        return None
    bare = _BARE.fullmatch(fragment)  # "A", "**B**." ... but never the article in "a good one"
    return bare.group(1).upper() if bare else None


def parse_verdict(text: str | None) -> str | None:
    """The judge's choice, "A" or "B", from its last "The better response: ..." line (the answer may
    be on the next line); a reply that is only "Response A"/"B" also counts. Anything else -> None."""
    if not text:
        return None
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        match = _VERDICT_LINE.search(lines[i])
        if match is None:
            continue
        rest = re.sub(r"^[\s*:\-]*(?:is\b)?[\s*:\-]*", "", lines[i][match.end() :])
        if not rest.strip(" *:-\"'") and i + 1 < len(lines):
            rest = lines[i + 1]
        return _letter(rest)
    return _letter(lines[-1]) if lines else None


class Judge(Protocol):
    """Anything that answers judge prompts: `complete(prompts)` returns one reply per prompt, or None for a request
    that failed (counted as an unparsed verdict)."""

    def complete(self, prompts: Sequence[str]) -> list[str | None]: ...


class JudgeEndpointError(RuntimeError):
    """The endpoint refused the request in a way retrying cannot fix (bad key, model, URL)."""


@dataclass
class EndpointJudgeConfig:
    """An OpenAI-compatible `/chat/completions` endpoint for `EndpointJudge`. The key is kept out of repr and logs.

    Args:
        model (`str`):
            The judge model's name at the endpoint (e.g. "gpt-4o").
        base_url (`str`, defaults to `"https://api.openai.com/v1"`):
            The endpoint's base URL; requests go to `<base_url>/chat/completions`.
        api_key (`str`, *optional*):
            Sent as a Bearer token; local servers may need none.
        temperature (`float`, defaults to `0.0`):
            The judge's sampling temperature.
        max_tokens (`int`, defaults to `256`):
            Tokens a reply, at most.
        timeout (`float`, defaults to `60.0`):
            Seconds a request may take.
        max_retries (`int`, defaults to `4`):
            Retries of a request that failed with HTTP 408/409/429/5xx or a connection error.
        retry_wait (`float`, defaults to `1.0`):
            Seconds before the first retry, doubled after each.
        num_workers (`int`, defaults to `4`):
            Requests in parallel.
    """

    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = field(default=None, repr=False)
    temperature: float = 0.0
    max_tokens: int = 256
    timeout: float = 60.0
    max_retries: int = 4
    retry_wait: float = 1.0  # doubled after each failed try
    num_workers: int = 4

    @classmethod
    def from_env(cls, model: str | None = None, **kwargs) -> EndpointJudgeConfig:
        """Model from the argument or ROSE_JUDGE_MODEL.

        OPENAI_BASE_URL and OPENAI_API_KEY are read as the openai client reads them.
        """
        model = model or os.environ.get("ROSE_JUDGE_MODEL")
        if not model:
            raise ValueError("name the judge model (argument `model` or env ROSE_JUDGE_MODEL)")
        kwargs.setdefault("base_url", os.environ.get("OPENAI_BASE_URL", cls.base_url))
        kwargs.setdefault("api_key", os.environ.get("OPENAI_API_KEY"))
        return cls(model=model, **kwargs)


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat completions endpoint, queried with `requests`.

    Rate limits and server errors are retried with doubling waits; a request that still fails becomes an unparsed
    verdict. Other HTTP errors (a bad key, model or URL) raise `JudgeEndpointError`. The key is redacted from every
    message, even when the server echoes it.

    Args:
        config (`EndpointJudgeConfig`):
            The endpoint, model, key and retry settings (`EndpointJudgeConfig.from_env()` reads them from
            `OPENAI_BASE_URL`, `OPENAI_API_KEY` and `ROSE_JUDGE_MODEL`).

    Example:

    ```python
    from rose_trl.evaluation import EndpointJudge, EndpointJudgeConfig, win_rate

    judge = EndpointJudge(EndpointJudgeConfig.from_env(model="gpt-4o"))
    result = win_rate(test["prompt"], responses, test["chosen"], judge)
    ```
    """

    # Rate limits and server hiccups pass with time; other errors are configuration mistakes.
    RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

    def __init__(self, config: EndpointJudgeConfig):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def _redact(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key else text

    def _one(self, prompt: str) -> str | None:
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        body = {
            "model": cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        }
        wait = cfg.retry_wait
        for attempt in range(cfg.max_retries + 1):
            try:
                response = requests.post(self.url, json=body, headers=headers, timeout=cfg.timeout)
            except requests.RequestException as e:
                problem = f"{type(e).__name__}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        logger.warning(
                            "judge endpoint returned a malformed body: %s", self._redact(response.text[:200])
                        )
                        return None
                if response.status_code not in self.RETRY_STATUS:
                    raise JudgeEndpointError(
                        f"judge endpoint {self.url} answered HTTP {response.status_code}: "
                        f"{self._redact(response.text[:300])}"
                    )
                problem = f"HTTP {response.status_code}"
            if attempt < cfg.max_retries:
                logger.info(
                    "judge request failed (%s); retry %d/%d in %.1fs", problem, attempt + 1, cfg.max_retries, wait
                )
                time.sleep(wait)
                wait *= 2
        logger.warning("judge request failed after %d tries (%s); counted as unparsed", cfg.max_retries + 1, problem)
        return None

    def complete(self, prompts: Sequence[str]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=max(1, self.config.num_workers)) as pool:
            return list(pool.map(self._one, prompts))


class HFJudge:
    """A local causal LM as judge: greedy generation by default, then the same verdict parser.

    Args:
        model (`transformers.PreTrainedModel`):
            The judge model.
        tokenizer (`transformers.PreTrainedTokenizerBase`):
            Its tokenizer, with a pad token.
        options (`GenerationOptions`, *optional*):
            How it generates; defaults to greedy decoding of at most 128 new tokens.

    Example:

    ```python
    from rose_trl.evaluation import HFJudge, win_rate

    result = win_rate(test["prompt"], responses, test["chosen"], HFJudge(judge_model, judge_tokenizer))
    ```
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        options: GenerationOptions | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.options = options or GenerationOptions(max_new_tokens=128, do_sample=False)

    def complete(self, prompts: Sequence[str]) -> list[str | None]:
        return generate_responses(self.model, self.tokenizer, list(prompts), self.options)


@dataclass
class WinRateResult:
    """`table`: one row per subtask (first-seen order) then "overall", with counts win / lose / unparsed,
    `win_rate` = win / (win + lose) over parsed verdicts and `win_rate_all` = win / n (unparsed count as
    not won). `records`: per example subtask, verdict ("A" = model wins, "B", None) and the judge's text."""

    table: list[dict]
    records: list[dict]

    def to_markdown(self) -> str:
        lines = [
            "| subtask | n | win | lose | unparsed | win rate | win rate (all) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.table:
            lines.append(
                f"| {r['subtask']} | {r['n']} | {r['win']} | {r['lose']} | {r['unparsed']} | "
                f"{r['win_rate']:.3f} | {r['win_rate_all']:.3f} |"
            )
        return "\n".join(lines)


def tabulate_verdicts(verdicts: Sequence[str | None], subtasks: Sequence[str] | None = None) -> list[dict]:
    subtasks = list(subtasks) if subtasks is not None else ["all"] * len(verdicts)
    if len(subtasks) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts but {len(subtasks)} subtask labels")

    def row(name, vs):
        win = vs.count("A")
        lose = vs.count("B")
        n = len(vs)
        return {
            "subtask": name,
            "n": n,
            "win": win,
            "lose": lose,
            "unparsed": n - win - lose,
            "win_rate": win / (win + lose) if win + lose else float("nan"),
            "win_rate_all": win / n if n else float("nan"),
        }

    names = list(dict.fromkeys(subtasks))
    table = [row(name, [v for v, s in zip(verdicts, subtasks, strict=True) if s == name]) for name in names]
    table.append(row("overall", list(verdicts)))
    return table


def win_rate(
    prompts: Sequence[str],
    responses: Sequence[str],
    references: Sequence[str],
    judge: Judge,
    subtasks: Sequence[str] | None = None,
    template: str = JUDGE_PROMPT,
) -> WinRateResult:
    """The win rate of a model's responses against reference answers, as a judge sees them.

    The judge compares each model response (always **Response A**) with the reference (always **Response B**,
    e.g. the test set's best answer) for its prompt, as the paper's Appendix D protocol does, and the verdicts are
    counted per subtask. Unparsed verdicts are never dropped: they have their own column and a warning.

    Args:
        prompts (`Sequence[str]`):
            The test prompts.
        responses (`Sequence[str]`):
            The model's response to each prompt (`generate_responses`).
        references (`Sequence[str]`):
            The reference answer to each prompt.
        judge (`Judge`):
            `EndpointJudge`, `HFJudge`, or anything with `complete(prompts) -> list[str | None]`.
        subtasks (`Sequence[str]`, *optional*):
            Each prompt's subtask, for the per-subtask rows; without them one row, "all".
        template (`str`, *optional*, defaults to `JUDGE_PROMPT`):
            The judge prompt, with the placeholders `{query}`, `{response_a}` and `{response_b}`.

    Returns:
        `WinRateResult`: `table` (one row per subtask, then "overall": n, win, lose, unparsed, win_rate over
        parsed verdicts, win_rate_all over all) and `records` (each example's subtask, verdict and judge text).

    Example:

    ```python
    from rose_trl.evaluation import EndpointJudge, EndpointJudgeConfig, generate_responses, win_rate

    responses = generate_responses(model, tokenizer, test["prompt"])
    result = win_rate(test["prompt"], responses, test["chosen"], EndpointJudge(EndpointJudgeConfig.from_env()))
    print(result.to_markdown())
    ```
    """
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(
            f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, {len(references)} references"
        )
    judge_prompts = [
        build_judge_prompt(q, a, b, template) for q, a, b in zip(prompts, responses, references, strict=True)
    ]
    raw = judge.complete(judge_prompts)
    verdicts = [parse_verdict(text) for text in raw]
    unparsed = verdicts.count(None)
    if unparsed:
        logger.warning(
            "%d of %d judge verdicts could not be parsed; they are reported in the `unparsed` column",
            unparsed,
            len(verdicts),
        )
    labels = list(subtasks) if subtasks is not None else ["all"] * len(verdicts)
    records = [{"subtask": s, "verdict": v, "judge_output": t} for s, v, t in zip(labels, verdicts, raw, strict=True)]
    return WinRateResult(table=tabulate_verdicts(verdicts, labels), records=records)
