"""The data users have, read as it is: CSV/TSV files, Alpaca and TRL language-modeling (`text`) pool rows, column
maps from the recipe's options, errors that list the formats, and validation_k that never leaves pairs out in
silence (docs/guides/data.md)."""

import csv
import json
import logging

import pytest
from datasets import Dataset

from rose_trl import ROSEConfig
from rose_trl.data import load_pool, load_preferences
from rose_trl.data.io import DataKeyError
from rose_trl.data.preferences import subsample_report
from rose_trl.data.sft import BadRecordError, alpaca_prompt, collate, tokenize_sft_example
from rose_trl.models.tiny import _texts, build_tokenizer, make_planted_task
from rose_trl.run.pipeline import load_datasets
from rose_trl.utils.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def tokenizer():
    pool, validation = make_planted_task(n_pool=20, pairs_per_subtask=2, seed=0)
    return build_tokenizer([*_texts(pool, validation), "Add the numbers 2 and 3 5 Once upon a time"], chat=False)


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------- Alpaca and text rows


def test_the_prompt_an_alpaca_row_makes():
    """open-instruct's most frequent template for such rows, deterministic: instruction, input, each stripped."""
    assert alpaca_prompt("  Add the numbers. ", " 2 and 3\n") == "Add the numbers.\n\n2 and 3\n\n"
    assert alpaca_prompt("Add the numbers.", "") == alpaca_prompt("Add the numbers.", None) == "Add the numbers.\n\n"
    assert alpaca_prompt("Add the numbers.", "   ") == "Add the numbers.\n\n"


@pytest.mark.parametrize("given", [{"input": "2 and 3"}, {"input": ""}, {"input": None}, {}])
def test_an_alpaca_row_is_read_as_its_prompt_and_completion(tokenizer, given):
    row = {"instruction": "Add the numbers", "output": " 5 ", **given}
    expected = {"prompt": alpaca_prompt("Add the numbers", given.get("input")), "completion": "5"}
    assert tokenize_sft_example(row, tokenizer, 64) == tokenize_sft_example(expected, tokenizer, 64)
    tokens = tokenize_sft_example(row, tokenizer, 64)
    response = [t for t, m in zip(tokens["input_ids"], tokens["completion_mask"], strict=True) if m]
    assert tokenizer.decode(response) == "5" + tokenizer.eos_token  # the loss is on the output (and EOS) only


def test_a_text_row_is_all_completion(tokenizer):
    """TRL's language modeling rows: labels cover the whole text (every token after the first special ones)."""
    text = "Once upon a time"
    tokens = tokenize_sft_example({"text": text}, tokenizer, 64)
    batch = collate([tokens], tokenizer.pad_token_id)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    specials = tokenizer("")["input_ids"]  # what an empty prompt is: the tokenizer's leading special tokens
    assert ids[: len(specials)] == specials and labels[: len(specials)] == [-100] * len(specials)
    assert labels[len(specials) :] == ids[len(specials) :]
    assert tokenizer.decode(ids[len(specials) :]) == text + tokenizer.eos_token


def test_alpaca_and_text_pools_load_with_no_option(tmp_path):
    alpaca = [{"instruction": f"do {i}", "input": "" if i % 2 else f"on {i}", "output": f"done {i}"} for i in range(4)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(alpaca))
    pool = load_pool(path)
    assert pool.column_names == ["instruction", "input", "output", "source"]  # rows as they are
    assert pool["output"] == [r["output"] for r in alpaca]
    text = tmp_path / "lm.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
    assert load_pool(text)["text"] == ["line 0", "line 1", "line 2"]


def test_a_row_of_no_format_lists_the_formats_and_the_option(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "r"}) + "\n")
    with pytest.raises(BadRecordError) as error:
        load_pool(path)
    message = str(error.value)
    assert message.startswith(f"{path}: record 0, field 'columns': no pool format fits its columns ['answer', ")
    for needed in ("`messages`", "`prompt`, `completion`", "`instruction`, `output`, optional `input`", "`text`"):
        assert needed in message
    assert "pool_column_map" in message and isinstance(error.value, UserError)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a", "input": 3}]))
    with pytest.raises(BadRecordError, match=r"bad.json: record 1, field 'input': expected a string, got int"):
        load_pool(bad)


# ---------------------------------------------------------------------------------- CSV and TSV


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_pools_and_pairs(tmp_path, suffix, delimiter):
    rows = [
        {"instruction": 'Say "hi", then stop', "input": "", "output": "hi,\nthen stop", "source": "a"},
        {"instruction": "Count", "input": "1\t2", "output": "3", "source": "b"},
    ]
    pool = load_pool(write_csv(tmp_path / f"pool{suffix}", rows, delimiter))
    assert pool.to_list() == rows  # quotes, separators and line breaks inside fields; every value text
    pairs = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "subtask": "math"},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon, maybe", "subtask": "facts"},
    ]
    loaded = load_preferences(str(write_csv(tmp_path / f"pairs{suffix}", pairs, delimiter)))
    assert loaded.to_list() == pairs  # "4" stays the text "4"


def test_csv_errors_name_the_row(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("\ufeffprompt,chosen,rejected\nq,a,b\nq,a,b,extra\n", encoding="utf-8")  # a spreadsheet's BOM
    with pytest.raises(BadRecordError, match=r"pairs.csv: record 1, field '\*': 4 fields, the header has 3 \(line 3"):
        load_preferences(str(path))
    path.write_text("prompt,chosen,rejected\nq,a,a\n")
    with pytest.raises(BadRecordError, match=r"pairs.csv: record 0, field 'chosen,rejected'"):
        load_preferences(str(path))
    path.write_text("prompt,chosen,rejected,subtask\nq,a,b,\n")  # an empty cell is an empty string
    with pytest.raises(BadRecordError, match=r"record 0, field 'subtask': expected a non-empty string"):
        load_preferences(str(path))


# ---------------------------------------------------------------------------------- column maps from the recipe


def test_column_maps_from_the_recipe_yaml_and_command_line(tmp_path):
    from trl import ModelConfig, SFTConfig, TrlParser

    write_csv(tmp_path / "pool.csv", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    write_csv(tmp_path / "pairs.csv", [{"q": "x", "good": "y", "bad": "z", "kind": "k"}])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"pool_dataset: {tmp_path / 'pool.csv'}\nvalidation_dataset: {tmp_path / 'pairs.csv'}\n"
        f"pool_column_map:\n  question: instruction\n  answer: output\noutput_dir: {tmp_path / 'out'}\n"
        "use_cpu: true\nbf16: false\n"
    )
    parser = TrlParser((ROSEConfig, SFTConfig, ModelConfig))
    mapping = '{"q": "prompt", "good": "chosen", "bad": "rejected", "kind": "subtask"}'
    rose, _, _ = parser.parse_args_and_config(["--config", str(config), "--validation_column_map", mapping])
    assert rose.pool_column_map == {"question": "instruction", "answer": "output"}
    assert rose.validation_column_map == json.loads(mapping)
    pool, validation = load_datasets(rose)
    assert pool.column_names == ["instruction", "output", "source"] and pool["instruction"] == ["q0", "q1", "q2"]
    assert validation.to_list() == [{"prompt": "x", "chosen": "y", "rejected": "z", "subtask": "k"}]
    # load_pool's own column_map argument works as before.
    assert (
        load_pool(tmp_path / "pool.csv", column_map={"question": "prompt", "answer": "completion"})["prompt"][0]
        == "q0"
    )


def test_bad_column_maps_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"pool_column_map: expected a JSON object"):
        ROSEConfig(pool_column_map="question=prompt")
    with pytest.raises(ConfigError, match=r"validation_column_map: expected a mapping of column names"):
        ROSEConfig(validation_column_map={"q": 3})
    path = write_csv(tmp_path / "pool.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataKeyError, match=r"the column map names columns \['query'\] that are not in"):
        load_pool(path, column_map={"query": "instruction"})
    with pytest.raises(ConfigError, match="a column map applies to sets in TRL's preference format"):
        load_preferences("rose:se", column_map={"q": "prompt"})


# ---------------------------------------------------------------------------------- validation_k


def pairs_file(tmp_path, counts: dict[str, int], name: str = "pairs.csv"):
    rows = [
        {"prompt": f"{s} {i}?", "chosen": f"yes {i}", "rejected": f"no {i}", "subtask": s}
        for s, n in counts.items()
        for i in range(n)
    ]
    return str(write_csv(tmp_path / name, rows))


def test_validation_k_says_what_it_leaves_out(tmp_path, caplog):
    path = pairs_file(tmp_path, {"a": 5, "b": 2})
    with caplog.at_level(logging.WARNING, logger="rose_trl.data.preferences"):
        sample = load_preferences(path, k=2, seed=0)
    assert len(sample) == 4
    assert subsample_report(sample) == {
        "validation_k": 2,
        "seed": 0,
        "kept": 4,
        "of": 7,
        "subtasks": {"a": {"kept": 2, "of": 5}, "b": {"kept": 2, "of": 2}},
    }
    (record,) = caplog.records
    assert f"validation_k=2 keeps 4 of the 7 preference pairs of {path}" in record.message
    assert "per subtask: 'a' 2 of 5, 'b' 2 of 2" in record.message and "Leave validation_k unset" in record.message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rose_trl.data.preferences"):
        every = load_preferences(path, k=None)
        exact = load_preferences(pairs_file(tmp_path, {"a": 2, "b": 2}, "exact.csv"), k=2)
    assert (len(every), len(exact), caplog.records) == (7, 4, [])  # nothing left out: nothing said
    assert subsample_report(every) is None and subsample_report(exact) is None
    with pytest.raises(ValueError, match=r"subtask 'b' has 2 pairs, fewer than k=3 \(validation_k\): lower it"):
        load_preferences(path, k=3)


def test_summary_says_what_validation_k_left_out(tmp_path):
    """selection/summary.json's validation_subsample, through the selector (a tiny in-memory model)."""
    from tests.reference_selector import select

    pool, pairs = make_planted_task(n_pool=30, pairs_per_subtask=3, seed=0)
    tokenizer = build_tokenizer(_texts(pool, pairs))
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    folders = {}
    for k in (2, None):
        validation = load_preferences(str(path), k=k, seed=0)
        folders[k] = select(Dataset.from_list(pool), validation, tokenizer, tmp_path / f"k{k}", "selection")
    summary = json.loads((folders[2] / "summary.json").read_text())
    assert summary["validation_subsample"] == {
        "validation_k": 2,
        "seed": 0,
        "kept": 4,
        "of": 6,
        "subtasks": {"polite": {"kept": 2, "of": 3}, "safe": {"kept": 2, "of": 3}},
    }
    assert {s: a["pairs"] for s, a in summary["validation_agreement"].items()} == {"polite": 2, "safe": 2}
    assert json.loads((folders[None] / "summary.json").read_text())["validation_subsample"] is None
