"""Data side of ROSE: the instruction pool, the few-shot preference sets and the paper's released files."""

from rose_trl.data.builders import PREFERENCE_TASKS, build_hh, build_preference_set, build_se, build_shp
from rose_trl.data.pool import load_pool
from rose_trl.data.preferences import load_preferences, validate_preferences
from rose_trl.data.released import (
    load_released_preferences,
    load_released_sft,
    load_released_test,
    released_subtask_names,
)
from rose_trl.data.synthetic import RejectedSamplingConfig, generate_response, sft_to_preferences


__all__ = [
    "PREFERENCE_TASKS",
    "RejectedSamplingConfig",
    "build_hh",
    "build_preference_set",
    "build_se",
    "build_shp",
    "generate_response",
    "load_pool",
    "load_preferences",
    "load_released_preferences",
    "load_released_sft",
    "load_released_test",
    "released_subtask_names",
    "sft_to_preferences",
    "validate_preferences",
]
