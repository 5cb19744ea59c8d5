"""Import paths from before 0.2.0, when every module sat in one folder: each old name is an alias of the module's
new home (the same module object, so patches and `isinstance` agree). `rose_trl.gradients` and
`rose_trl.scoring` are packages now and re-export what those modules held."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


MOVED = {
    f"rose_trl.{old}": f"rose_trl.{new}"
    for old, new in {
        "agreement": "scoring.agreement",
        "budget": "resources.budget",
        "callback": "run.callback",
        "columns": "scoring.columns",
        "disk": "resources.disk",
        "distributed": "utils.distributed",
        "explain": "outputs.explain",
        "extraction": "stores.extraction",
        "featurizer": "gradients.featurizer",
        "files": "utils.files",
        "final_model": "models.final_model",
        "fsdp_checkpoint": "checkpoints.fsdp",
        "gemma3": "models.gemma3",
        "hub": "outputs.hub",
        "ledger": "run.ledger",
        "memory": "resources.memory",
        "model_source": "models.source",
        "model_utils": "utils.modeling",
        "offline": "run.offline",
        "pipeline": "run.pipeline",
        "projection": "gradients.projection",
        "report": "outputs.report",
        "report_figures": "outputs.report_figures",
        "schedules": "checkpoints.schedules",
        "selection": "outputs.selection",
        "selector": "run.selector",
        "sft_data": "data.sft",
        "sft_loss": "gradients.sft_loss",
        "smollm2": "models.smollm2",
        "store": "stores.store",
        "tiny": "models.tiny",
        "validation": "stores.validation",
        "zero_checkpoint": "checkpoints.zero",
    }.items()
}


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        # The import system returns whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _AliasLoader())
        return None


def install() -> None:
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
