"""rose_trl: ROSE reward-oriented instruction-data selection for Hugging Face TRL."""

__version__ = "0.1.0"

__all__ = ["ROSECallback", "ROSEConfig", "ROSEDPOTrainer", "ROSESelector", "per_example_gradients"]


def __getattr__(name):
    # Lazy: `import rose_trl` stays cheap (no torch/trl import) for the CLI and tooling.
    if name == "ROSECallback":
        from .callback import ROSECallback
        return ROSECallback
    if name == "ROSEConfig":
        from .config import ROSEConfig
        return ROSEConfig
    if name == "ROSEDPOTrainer":
        from .validation import ROSEDPOTrainer
        return ROSEDPOTrainer
    if name == "ROSESelector":
        from .selector import ROSESelector
        return ROSESelector
    if name == "per_example_gradients":
        from .gradients import per_example_gradients
        return per_example_gradients
    raise AttributeError(f"module 'rose_trl' has no attribute {name!r}")
