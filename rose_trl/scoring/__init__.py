"""Scores from gradient stores: the formula once (`scores`), what each score column holds (`columns`) and how much
each subtask's validation pairs agree (`agreement`).

The formula's names are importable from here too, where `rose_trl.scoring` held them before 0.2.0."""

from rose_trl.scoring.scores import (
    CheckpointGradients,
    ValidationTargets,
    contribution_chunks,
    normalized_weights,
    score_checkpoints,
    select_rows,
    selection_size,
    unit_dots,
    validation_targets,
)


__all__ = [
    "CheckpointGradients",
    "ValidationTargets",
    "contribution_chunks",
    "normalized_weights",
    "score_checkpoints",
    "select_rows",
    "selection_size",
    "unit_dots",
    "validation_targets",
]
