"""Import paths from before the stage folders (0.1.x) still work: each is the same module object as its new home."""

import importlib
from pathlib import Path

import pytest

import rose_trl
from rose_trl._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_its_new_module(old):
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_from_imports_work():
    from rose_trl.gradients import per_example_gradients
    from rose_trl.offline import select_from_checkpoints
    from rose_trl.scoring import score_checkpoints
    from rose_trl.selector import ROSESelector

    assert per_example_gradients is rose_trl.per_example_gradients
    assert select_from_checkpoints is rose_trl.select_from_checkpoints
    assert ROSESelector is rose_trl.ROSESelector
    assert score_checkpoints.__module__ == "rose_trl.scoring.scores"


def test_no_alias_hides_a_real_module():
    package = Path(rose_trl.__file__).parent
    for old in MOVED:
        name = old.split(".", 1)[1]
        assert not (package / f"{name}.py").exists() and not (package / name).is_dir(), old


def test_an_unknown_name_is_still_an_error():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("rose_trl.no_such_module")
    with pytest.raises(AttributeError, match="no_such_name"):
        rose_trl.no_such_name  # noqa: B018
