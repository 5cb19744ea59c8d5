import numpy as np
import pytest
from datasets import Dataset

from rose_trl.config import ROSEConfig
from rose_trl.outputs.selection import write_selection
from rose_trl.scoring.scores import normalized_weights, top_fraction


def test_top_fraction_orders_by_score_then_index():
    scores = np.array([0.1, 0.5, 0.5, -1.0, 0.5, 0.2])
    assert top_fraction(scores, 0.5).tolist() == [1, 2, 4]
    assert top_fraction(scores, 0.01).tolist() == [1]  # at least one row
    assert top_fraction(scores, 1.0).tolist() == [1, 2, 4, 5, 0, 3]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"selection_fraction must be in \(0, 1\]"):
        top_fraction(np.zeros(3), bad)
    with pytest.raises(ValueError, match="must be in"):
        ROSEConfig(selection_fraction=bad)


def test_nonfinite_scores_and_empty_pool_are_refused():
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        top_fraction(np.array([0.0, np.nan]), 0.5)
    with pytest.raises(ValueError, match="empty pool"):
        top_fraction(np.array([]), 0.5)


def test_learning_rate_weights_renormalize():
    np.testing.assert_allclose(normalized_weights([2e-5, 1e-5, 1e-5]), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError):
        normalized_weights([0.0, 0.0])


def test_write_selection_replaces_a_previous_one_whole(tmp_path):
    pool = Dataset.from_list([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)])
    table = {"score": np.arange(10.0), "score_a": np.arange(10.0)}
    first = write_selection(tmp_path, pool, table, 0.2, {"x": 1}, "rose", ["a"])
    second = write_selection(
        tmp_path, pool, {"score": -np.arange(10.0), "score_a": -np.arange(10.0)}, 0.2, {"x": 2}, "rose", ["a"]
    )
    assert first == second and sorted(p.name for p in tmp_path.iterdir()) == ["selection"]
    from datasets import load_from_disk

    assert load_from_disk(str(second / "selected"))["pool_index"] == [0, 1]
