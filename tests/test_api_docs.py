"""The public API is documented where `help()` finds it, in TRL's style (`Args:`, `Returns:`, `Example:`), with type
hints, and the documentation cannot drift from the signatures: every parameter is named in its `Args:` section, and
ROSEConfig's and SelectConfig's field lists are built from the fields themselves."""

import dataclasses
import doctest
import importlib
import inspect
import re

import pytest

from rose_trl.config import ROSEConfig, SelectConfig, option_type


# name -> whether its docstring must carry an `Example:` (the entry points a user starts from)
PUBLIC = {
    "rose_trl.run.callback.ROSECallback": True,
    "rose_trl.run.selector.ROSESelector": True,
    "rose_trl.stores.validation.ROSEDPOTrainer": True,
    "rose_trl.config.ROSEConfig": True,
    "rose_trl.config.SelectConfig": True,
    "rose_trl.gradients.capture.per_example_gradients": True,
    "rose_trl.run.offline.select_from_checkpoints": True,
    "rose_trl.data.pool.load_pool": True,
    "rose_trl.data.preferences.load_preferences": True,
    "rose_trl.evaluation.generation.generate_responses": True,
    "rose_trl.evaluation.generation.GenerationOptions": False,
    "rose_trl.evaluation.judge.win_rate": True,
    "rose_trl.evaluation.judge.EndpointJudge": True,
    "rose_trl.evaluation.judge.EndpointJudgeConfig": False,
    "rose_trl.evaluation.judge.HFJudge": True,
    "rose_trl.evaluation.metrics.preference_metrics": True,
    "rose_trl.evaluation.metrics.PreferenceMetricsOptions": False,
    "rose_trl.evaluation.metrics.reference_nll": True,
    "rose_trl.evaluation.metrics.sequence_logps": False,
    "rose_trl.run.ledger.RunLedger": True,
    "rose_trl.scoring.columns.ScoreColumns": True,
}

SECTION = re.compile(r"^(Args|Attributes|Returns|Raises|Example):\s*$", re.M)


def resolve(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def parameters(obj) -> list[inspect.Parameter]:
    function = obj.__init__ if inspect.isclass(obj) else obj
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


def section(doc: str, name: str) -> str | None:
    """The text of `name:` up to the next section header, or None."""
    found = list(SECTION.finditer(doc))
    for i, m in enumerate(found):
        if m.group(1) == name:
            end = found[i + 1].start() if i + 1 < len(found) else len(doc)
            return doc[m.end() : end]
    return None


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_documented_with_every_parameter(path):
    obj = resolve(path)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()[0]) > 10, f"{path}: no docstring"
    params = parameters(obj)
    args = section(doc, "Args")
    if params:
        assert args is not None, f"{path}: no Args: section"
    for p in params:
        name = re.escape(p.name)
        assert re.search(rf"^    (\*\*)?{name}( \(|:)", args, re.M), f"{path}: parameter {p.name!r} not in Args:"
        if p.kind is not inspect.Parameter.VAR_KEYWORD:
            assert p.annotation is not inspect.Parameter.empty, f"{path}: parameter {p.name!r} has no type hint"
    if not inspect.isclass(obj):
        returns = inspect.signature(obj).return_annotation
        assert returns is not inspect.Signature.empty, f"{path}: no return type"
        if returns not in (None, "None"):
            assert section(doc, "Returns") is not None, f"{path}: no Returns: section"
    if PUBLIC[path]:
        assert section(doc, "Example") is not None, f"{path}: no Example: section"


def test_an_undocumented_parameter_is_caught():
    def f(documented: int, forgotten: int) -> None:
        """Something.

        Args:
            documented (`int`):
                Documented.
        """

    args = section(inspect.getdoc(f), "Args")
    assert re.search(r"^    documented \(", args, re.M) and not re.search(r"^    forgotten( \(|:)", args, re.M)


@pytest.mark.parametrize("cls", [ROSEConfig, SelectConfig])
def test_config_docstrings_list_every_field_with_its_type_default_and_help(cls):
    doc = " ".join(inspect.getdoc(cls).split())  # wrapped text, compared word by word
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert f"{f.name} (`{option_type(cls, f)}`, defaults to `{default!r}`):" in doc, f.name
        assert " ".join(f.metadata["help"].replace("%%", "%").split()) in doc, f.name  # argparse's escape
        for choice in f.metadata.get("choices", []):
            assert str(choice) in doc
    # The generated list comes before the example.
    assert doc.index("Args:") < doc.index("Example:")


@pytest.mark.parametrize("module", ["rose_trl.config", "rose_trl.run.ledger", "rose_trl.scoring.columns"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
