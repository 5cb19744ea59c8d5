import json

import datasets
import pytest

from rose_trl.data import load_pool
from rose_trl.data.sft import BadRecordError
from tests.data_fixtures import fake_hub, tulu_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hub_pool_by_name_selects_sources_and_keeps_columns(monkeypatch):
    fake = fake_hub(datasets.load_dataset)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_pool("allenai/tulu-v2-sft-mixture", sources=["flan_v2", "cot", "oasst1"])
    assert fake.calls == [{"path": "allenai/tulu-v2-sft-mixture", "data_dir": None, "split": "train"}]
    assert ds["source"] == ["flan_v2", "cot", "oasst1", "flan_v2", "cot", "oasst1"]
    assert set(ds.column_names) == {"dataset", "id", "messages", "source"}
    assert ds["id"][0] == "flan_v2_0"
    # A family prefix selects its members; an unknown source names what the pool has.
    assert load_pool("allenai/tulu-v2-sft-mixture", sources=["science"])["source"] == ["science.scierc_ner"]
    with pytest.raises(ValueError, match=r"unknown sources \['dolly'\].*flan_v2"):
        load_pool("allenai/tulu-v2-sft-mixture", sources=["dolly"])


def test_local_files_column_map_and_source(tmp_path):
    rows = [{"instruction": f"do {i}", "output": f"done {i}", "id": i} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "dolly_data.jsonl", rows)
    ds = load_pool(jsonl, column_map={"instruction": "prompt", "output": "completion"})
    assert ds.column_names == ["prompt", "completion", "id", "source"]
    assert ds["source"] == ["dolly_data"] * 5 and ds["prompt"][3] == "do 3"
    parquet = tmp_path / "pool.parquet"
    datasets.Dataset.from_list(tulu_rows()).to_parquet(str(parquet))
    assert load_pool(parquet)["source"][:2] == ["flan_v2", "cot"]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(tulu_rows()).save_to_disk(str(folder))
    assert load_pool(folder)["id"] == [r["id"] for r in tulu_rows()]
    json_list = tmp_path / "pool.json"
    json_list.write_text(json.dumps(tulu_rows()))
    assert load_pool([json_list, parquet])["id"] == [r["id"] for r in tulu_rows()] * 2


def test_max_examples_is_a_seeded_sample(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    a = load_pool(path, max_examples=10, seed=1)["prompt"]
    assert a == load_pool(path, max_examples=10, seed=1)["prompt"]
    assert a != load_pool(path, max_examples=10, seed=2)["prompt"]
    assert len(set(a)) == 10 and a == sorted(a, key=lambda p: int(p[1:]))  # pool order kept


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"prompt": "q", "completion": ""}, "completion", "empty"),
        ({"prompt": "  ", "completion": "a"}, "prompt", "empty"),
        ({"prompt": "q", "completion": 3}, "completion", "expected a string"),
        ({"prompt": "q"}, "columns", "no pool format fits its columns"),
        ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no non-empty assistant"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]},
            "messages[1].content",
            "string",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "messages[0]",
            "'role' and 'content'",
        ),
        (
            {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "messages[0].role",
            "unknown role",
        ),
    ],
)
def test_bad_rows_name_file_record_and_field(tmp_path, row, field, problem):
    good = (
        {"prompt": "q", "completion": "a"}
        if "prompt" in row
        else {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([good, good, row]))
    with pytest.raises(BadRecordError, match=problem) as err:
        load_pool(path)
    assert (err.value.source, err.value.index, err.value.field) == (str(path), 2, field)
    assert str(path) in str(err.value)


def test_empty_pool_and_wrong_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a", "source": "x"}])
    with pytest.raises(BadRecordError, match="the pool is empty"):
        load_pool(path, max_examples=0)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(BadRecordError, match="the pool is empty"):
        load_pool(empty)
    other = write_jsonl(tmp_path / "o.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="different columns"):
        load_pool([path, write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "completion": "a", "id": 1}])])
    with pytest.raises(BadRecordError, match="pool_column_map"):
        load_pool(other)
    with pytest.raises(KeyError, match="not in"):
        load_pool(other, column_map={"query": "prompt"})


def test_errors_in_a_concatenated_part_name_that_part(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    second = tmp_path / "b.parquet"
    datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": " "}]).to_parquet(
        str(second)
    )
    with pytest.raises(BadRecordError) as err:
        load_pool([first, second])
    assert (err.value.source, err.value.index, err.value.field) == (str(second), 1, "completion")


def test_dataset_dict_folder_and_json_lines_in_a_json_file(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "validation": datasets.Dataset.from_list(rows)}
    ).save_to_disk(str(folder))
    assert load_pool(folder, split="validation")["prompt"] == ["p0", "p1", "p2"]
    with pytest.raises(KeyError, match=r"no split 'test'; it has \['train', 'validation'\]"):
        load_pool(folder, split="test")
    lines = write_jsonl(tmp_path / "lines.json", rows)  # JSON Lines under a .json name
    assert load_pool(lines)["completion"] == ["c0", "c1", "c2"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(BadRecordError, match="line 2 is not valid JSON") as err:
        load_pool(broken)
    assert err.value.index == 1


def test_folder_of_jsonl_files_like_less_release(tmp_path):
    root = tmp_path / "train" / "processed"
    for name in ("oasst1", "cot", "dolly", "flan_v2"):
        (root / name).mkdir(parents=True)
        write_jsonl(
            root / name / f"{name}_data.jsonl",
            [
                {
                    "dataset": name,
                    "id": f"{name}_{i}",
                    "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                }
                for i in range(2)
            ],
        )
    ds = load_pool(root)
    assert ds["source"] == ["cot"] * 2 + ["dolly"] * 2 + ["flan_v2"] * 2 + ["oasst1"] * 2
    assert load_pool(root, sources=["dolly"])["id"] == ["dolly_0", "dolly_1"]
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a save_to_disk folder"):
        load_pool(tmp_path / "none")
