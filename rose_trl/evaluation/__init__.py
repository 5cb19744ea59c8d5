"""Evaluation of a tuned model: sampled responses, judge win rates against references, offline metrics."""

from rose_trl.evaluation.generation import GenerationOptions, format_prompt, generate_responses
from rose_trl.evaluation.judge import (
    JUDGE_PROMPT,
    EndpointJudge,
    EndpointJudgeConfig,
    HFJudge,
    Judge,
    JudgeEndpointError,
    WinRateResult,
    build_judge_prompt,
    parse_verdict,
    tabulate_verdicts,
    win_rate,
)
from rose_trl.evaluation.metrics import PreferenceMetricsOptions, preference_metrics, reference_nll, sequence_logps


__all__ = [
    "JUDGE_PROMPT",
    "EndpointJudge",
    "EndpointJudgeConfig",
    "GenerationOptions",
    "HFJudge",
    "Judge",
    "JudgeEndpointError",
    "PreferenceMetricsOptions",
    "WinRateResult",
    "build_judge_prompt",
    "format_prompt",
    "generate_responses",
    "parse_verdict",
    "preference_metrics",
    "reference_nll",
    "sequence_logps",
    "tabulate_verdicts",
    "win_rate",
]
