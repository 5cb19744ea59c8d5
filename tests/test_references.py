"""Outputs stay exactly what the code wrote when the references were recorded (tests/references/, made by
tests/references/make_references.py): scores.parquet and contributions.parquet as decoded tables (every
column and type; floats to compare.FLOAT_TOLERANCE, since another CPU's float32 kernels move them by ~1e-6),
and byte for byte where the floats are bit-identical under the pyarrow/pandas that wrote them. The inline case
runs in the default suite; the recipe cases are slow."""

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
    """The check itself can fail: a score moved beyond the float tolerance, or a flipped pick, in a copy of a
    reference folder is reported; a move within the tolerance (another CPU's float32 kernels) is not."""
    import shutil

    import pandas as pd

    from .references.compare import FLOAT_TOLERANCE

    folder = tmp_path / "selection"
    others = {"selection_less": HERE / "inline" / "selection_less", "whole_row": HERE / "inline" / "whole_row"}
    shutil.copytree(HERE / "inline" / "selection", folder)
    frame = pd.read_parquet(folder / "scores.parquet")
    edited = frame.copy()
    edited.loc[0, "score"] = frame.loc[0, "score"] + FLOAT_TOLERANCE["atol"] / 10
    edited.to_parquet(folder / "scores.parquet", index=False)
    assert differences(HERE / "inline", {"selection": folder, **others}) == []
    edited.loc[0, "score"] = frame.loc[0, "score"] + 1e-3
    edited.loc[0, "selected"] = not frame.loc[0, "selected"]
    edited.to_parquet(folder / "scores.parquet", index=False)
    found = differences(HERE / "inline", {"selection": folder, **others})
    assert found == [
        "selection/scores.parquet: column 'score' differs by up to 0.001",
        "selection/scores.parquet: column 'selected' differs",
    ]
