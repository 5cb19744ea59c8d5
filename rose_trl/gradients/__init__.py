"""Per-row gradient features: the batched capture with its Adam state (`capture`), the SFT loss (`sft_loss`), the
random projections (`projection`) and the featurizer that turns a batch into projected rows (`featurizer`).

The capture's names are importable from here too, where `rose_trl.gradients` held them before 0.2.0."""

from rose_trl.gradients.capture import (
    AdamState,
    GradientLayers,
    MissingAdamStateError,
    PerExampleGradientCapture,
    UnsupportedParameterError,
    adam_hyperparameters,
    num_trainable_parameters,
    per_example_gradients,
    per_example_projected_gradients,
    trainable_parameters,
)


__all__ = [
    "AdamState",
    "GradientLayers",
    "MissingAdamStateError",
    "PerExampleGradientCapture",
    "UnsupportedParameterError",
    "adam_hyperparameters",
    "num_trainable_parameters",
    "per_example_gradients",
    "per_example_projected_gradients",
    "trainable_parameters",
]
