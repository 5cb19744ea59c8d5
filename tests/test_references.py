"""Outputs stay exactly what the code wrote when the references were recorded (tests/references/, made by
tests/references/make_references.py): scores.parquet and contributions.parquet, byte for byte under the
pyarrow/pandas that wrote them (parquet embeds its writer's version), and as decoded tables (every column,
type and value) always. The inline case runs in the default suite; the recipe cases are slow."""

import pytest

from tests.references.compare import differences
from tests.references.make_references import HERE, run_case


def test_selector_outputs_match_the_references(tmp_path):
    assert differences(HERE / "inline", run_case("inline", tmp_path)) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tiny", "matrix", "rerun"])
def test_recipe_outputs_match_the_references(tmp_path, case):
    assert differences(HERE / case, run_case(case, tmp_path)) == []


def test_comparison_sees_a_changed_value(tmp_path):
    """The check itself can fail: one score changed in a copy of a reference folder is reported."""
    import shutil

    import pandas as pd

    folder = tmp_path / "selection"
    shutil.copytree(HERE / "inline" / "selection", folder)
    frame = pd.read_parquet(folder / "scores.parquet")
    frame.loc[0, "score"] = frame.loc[0, "score"] + 1e-12
    frame.to_parquet(folder / "scores.parquet", index=False)
    found = differences(HERE / "inline", {"selection": folder, "selection_less": HERE / "inline" / "selection_less",
                                          "whole_row": HERE / "inline" / "whole_row"})
    assert found == ["selection/scores.parquet: bytes differ", "selection/scores.parquet: column 'score' differs"]
