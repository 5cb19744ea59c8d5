"""rose_trl: ROSE reward-oriented instruction-data selection for Hugging Face TRL.

The public names below load lazily: `import rose_trl` stays cheap (no torch or TRL import) for the command line
and tooling. The stages live in subpackages, in the order data flows (docs/reference/architecture.md): `data`,
`gradients`, `stores`, `scoring`, `outputs`, with `run` on top.
"""

from rose_trl import _compat


__version__ = "0.2.0.dev0"

# name -> the module that defines it
_PUBLIC = {
    "ROSECallback": "rose_trl.run.callback",
    "ROSEConfig": "rose_trl.config",
    "ROSEDPOTrainer": "rose_trl.stores.validation",
    "ROSESelector": "rose_trl.run.selector",
    "SelectConfig": "rose_trl.config",
    "load_pool": "rose_trl.data.pool",
    "load_preferences": "rose_trl.data.preferences",
    "per_example_gradients": "rose_trl.gradients.capture",
    "select_from_checkpoints": "rose_trl.run.offline",
}

__all__ = sorted(_PUBLIC)

_compat.install()


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'rose_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
