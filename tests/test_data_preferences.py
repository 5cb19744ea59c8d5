import json
import os
from pathlib import Path

import datasets
import pytest

from rose_trl.data import load_preferences, load_released_preferences, load_released_sft, load_released_test
from rose_trl.data.sft import BadRecordError
from tests.data_fixtures import write_released_layout


ROSE_DATA = Path(
    os.environ.get("ROSE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rose")
)
needs_rose_data = pytest.mark.skipif(
    not (ROSE_DATA / "validation").is_dir(), reason=f"ROSE released data not found at {ROSE_DATA} (set ROSE_DATA_DIR)"
)


def pref(i, subtask=None, **over):
    row = {"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}"}
    if subtask is not None:
        row["subtask"] = subtask
    return {**row, **over}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- generic preference files and Hub ids ---------------------------------------------------------


def test_default_subtask_and_column_map(tmp_path):
    rows = [{"question": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "id": i} for i in range(3)]
    ds = load_preferences(
        write_jsonl(tmp_path / "p.jsonl", rows), column_map={"question": "prompt", "good": "chosen", "bad": "rejected"}
    )
    assert ds.column_names == ["prompt", "chosen", "rejected", "subtask"]
    assert ds["subtask"] == ["default"] * 3 and ds["chosen"] == ["g0", "g1", "g2"]


def test_hub_id_subtask_selection_and_k_sample(monkeypatch):
    rows = [pref(i, subtask=s) for s in ("a", "b", "c") for i in range(6)]
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_preferences("someone/prefs", split="validation", subtask_names=["a", "c"], k=2, seed=3, revision="r1")
    assert calls == [("someone/prefs", "validation", {"revision": "r1"})]
    assert sorted(ds["subtask"]) == ["a", "a", "c", "c"]
    assert ds["prompt"] == load_preferences("someone/prefs", subtask_names=["a", "c"], k=2, seed=3)["prompt"]
    assert ds["prompt"] != load_preferences("someone/prefs", subtask_names=["a", "c"], k=2, seed=4)["prompt"]
    with pytest.raises(ValueError, match=r"unknown subtask\(s\) \['d'\]; it has \['a', 'b', 'c'\]"):
        load_preferences("someone/prefs", subtask_names=["d"])
    with pytest.raises(ValueError, match="fewer than k=7"):
        load_preferences("someone/prefs", k=7)


def test_conversational_rows_and_exclusion(tmp_path):
    conv = [
        {
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": f"g{i}"}],
            "rejected": [{"role": "assistant", "content": f"b{i}"}],
            "subtask": "chat",
        }
        for i in range(2)
    ]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    assert load_preferences(path)["chosen"][1] == [{"role": "assistant", "content": "g1"}]
    strings = write_jsonl(tmp_path / "s.jsonl", [pref(i) for i in range(4)])
    kept = load_preferences(strings, exclude_prompts=["\n\nHuman: q1\n\nAssistant:  ", "Human: q2"])
    assert kept["prompt"] == [pref(0)["prompt"], pref(2)["prompt"], pref(3)["prompt"]]


@pytest.mark.parametrize(
    "row, field, problem",
    [
        (pref(9, chosen=""), "chosen", "empty"),
        (pref(9, prompt="   "), "prompt", "empty"),
        (pref(9, rejected=" good 9"), "chosen,rejected", "identical"),
        (pref(9, rejected=7), "rejected", "expected a string or a list of messages, got int"),
        ({"prompt": "q", "chosen": "c"}, "rejected", "missing"),
        (pref(9, chosen=[{"role": "assistant"}]), "chosen[0]", "'role' and 'content'"),
        (pref(9, subtask=""), "subtask", "non-empty string"),
    ],
)
def test_bad_rows_name_file_record_and_field(tmp_path, row, field, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [pref(0), pref(1), row])
    with pytest.raises(BadRecordError, match=problem) as err:
        load_preferences(path)
    assert (err.value.source, err.value.index, err.value.field) == (str(path), 2, field)


def test_empty_set_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pref(0)])
    with pytest.raises(BadRecordError, match="empty"):
        load_preferences(path, exclude_prompts=[pref(0)["prompt"]])


# ---- the paper's released format, on a miniature layout ------------------------------------------


def test_released_file_with_no_options_gets_k_and_subtasks_from_layout(tmp_path):
    path = write_released_layout(tmp_path, "se", ["workplace", "academia", "gaming"], k=2)
    ds = load_preferences(path)
    assert ds["subtask"] == ["academia", "academia", "gaming", "gaming", "workplace", "workplace"]
    assert ds[0] == {
        "prompt": "\n\nHuman: academia q0\n\nAssistant:",
        "chosen": " good academia0",
        "rejected": " bad academia0",
        "subtask": "academia",
    }
    assert load_preferences(path, subtask_names=["gaming"])["prompt"] == [
        "\n\nHuman: gaming q0\n\nAssistant:",
        "\n\nHuman: gaming q1\n\nAssistant:",
    ]
    with pytest.raises(ValueError, match=r"unknown subtask\(s\) \['math'\]"):
        load_preferences(path, subtask_names=["math"])
    sft = load_released_sft(path.with_name("se_2_shot_sft.json"))
    assert sft["subtask"] == ds["subtask"] and sft[0]["messages"][1]["content"] == " good academia0"
    test = load_released_test(tmp_path / "test" / "se")
    assert test["subtask"] == ["academia", "gaming", "workplace"]


def test_released_file_without_test_folder_numbers_subtasks(tmp_path):
    path = write_released_layout(tmp_path, "hh", ["harmless-base", "red-team-attempts"], k=1)
    moved = tmp_path / "elsewhere" / path.name
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    assert load_preferences(moved)["subtask"] == ["subtask_0", "subtask_1"]
    assert load_released_preferences(moved, group_names=["x", "y"])["subtask"] == ["x", "y"]


def test_released_pair_fallback_and_errors(tmp_path):
    records = {
        "\n\nHuman: a\n\nAssistant:": {
            "responses": [" r0", " r1"],
            "pairs": [[1, 0]],
            "sft_target": " r0",
            "rejected_target": " r0",
        },  # repeated target: use pairs[0]
        "\n\nHuman: b\n\nAssistant:": {
            "responses": [" s", " s"],
            "pairs": [[0, 1]],
            "sft_target": " s",
            "rejected_target": " s",
        },  # no distinct pair at all
        "\n\nHuman: c\n\nAssistant:": {
            "responses": [" t", " u"],
            "pairs": [[0, 1]],
            "sft_target": " t",
            "rejected_target": " u",
        },
    }
    path = write_released_layout(tmp_path, "shp", ["x", "y", "z"], k=1, records=records)
    with pytest.raises(BadRecordError, match="drop_unusable") as err:
        load_preferences(path)
    assert (err.value.index, err.value.field) == (1, "sft_target,rejected_target")
    ds = load_preferences(path, drop_unusable=True)
    assert ds["subtask"] == ["x", "z"]  # groups assigned before dropping
    assert (ds[0]["chosen"], ds[0]["rejected"]) == (" r1", " r0")
    with pytest.raises(BadRecordError, match="not a multiple of k=2"):
        load_preferences(path, k=2)
    with pytest.raises(BadRecordError, match=r"2 groups of records but 3 subtask names"):
        load_preferences(path, subtask_sizes=[1, 2])
    assert load_released_preferences(path, subtask_sizes=[2, 1], group_names=["p", "q"], drop_unusable=True)[
        "subtask"
    ] == ["p", "q"]


def test_released_record_with_bad_types(tmp_path):
    records = {"\n\nHuman: a\n\nAssistant:": {"responses": [], "pairs": [], "sft_target": 3, "rejected_target": " x"}}
    path = write_released_layout(tmp_path, "hh", ["one"], k=1, records=records)
    with pytest.raises(BadRecordError, match="expected a string, got int") as err:
        load_preferences(path)
    assert (err.value.source, err.value.index, err.value.field) == (str(path), 0, "sft_target")


# ---- the real released files (skipped when absent) -----------------------------------------------


@needs_rose_data
@pytest.mark.parametrize(
    "task, k, n_subtasks, first, last",
    [
        ("shp", 5, 18, "askacademia", "legaladvice"),
        ("se", 2, 10, "academia", "workplace"),
        ("hh", 1, 2, "harmless-base", "red-team-attempts"),
    ],
)
def test_real_paper_default_files_load_with_no_options(task, k, n_subtasks, first, last):
    path = ROSE_DATA / "validation" / task / f"{task}_{k}_shot" / f"{task}_{k}_shot_preference.json"
    ds = load_preferences(path)
    assert len(ds) == k * n_subtasks and len(set(ds["subtask"])) == n_subtasks
    assert ds["subtask"][0] == first and ds["subtask"][-1] == last
    assert all(p.startswith("\n\nHuman:") and p.endswith("Assistant:") for p in ds["prompt"])
    sft = load_released_sft(path.with_name(f"{task}_{k}_shot_sft.json"))
    assert [m[0]["content"] for m in sft["messages"]] == ds["prompt"]
    # The few shots are not test prompts.
    test_prompts = {p.strip() for p in load_released_test(ROSE_DATA / "test" / task)["prompt"]}
    assert not test_prompts & {p.strip() for p in ds["prompt"]}


@needs_rose_data
def test_real_files_that_need_options():
    se40 = ROSE_DATA / "validation" / "se" / "se_40_shot" / "se_40_shot_preference.json"
    with pytest.raises(BadRecordError, match="395 records is not a multiple of k=40"):
        load_preferences(se40)
    ds = load_preferences(se40, subtask_sizes=[35] + [40] * 9)
    assert ds["subtask"].count("academia") == 35 and ds["subtask"].count("workplace") == 40
    hh10 = ROSE_DATA / "validation" / "hh" / "hh_10_shot" / "hh_10_shot_preference.json"
    assert len(load_preferences(hh10, drop_unusable=True)) == 19
