"""Every bad input in one place: a clear error naming the record and field (or the file), nothing half-written.

docs/reference/errors.md lists the same catalogue.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from rose_trl.config import ROSEConfig
from rose_trl.data.preferences import validate_preferences
from rose_trl.data.sft import BadRecordError, tokenize_pool, tokenize_sft_example
from rose_trl.gradients.capture import (
    AdamState,
    MissingAdamStateError,
    UnsupportedParameterError,
    trainable_parameters,
)
from rose_trl.gradients.projection import build_projector
from rose_trl.run.offline import find_checkpoints, load_checkpoint_adam, select_from_checkpoints
from rose_trl.run.selector import ROSESelector, with_subtasks
from rose_trl.scoring.scores import top_fraction
from rose_trl.stores.extraction import extract_gradients
from rose_trl.stores.store import CorruptStoreError, GradientStore

from .helpers import tiny_lora_model


ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "tell me about pasta .", "completion": " garlic oven ."}
PAIR = {"prompt": "tell me about pasta .", "chosen": " garlic .", "rejected": " onion ."}

# (pool row, field named in the error, words of the problem)
BAD_POOL_ROWS = [
    ({"prompt": "x"}, "columns", "no pool format fits its columns ['prompt']: a pool row is chat (`messages`)"),
    ({"instruction": "x", "output": "  "}, "output", "empty"),
    ({"instruction": "x", "output": None}, "output", "missing"),
    ({"instruction": "x", "output": "y", "input": 3}, "input", "expected a string, got int"),
    ({"text": " "}, "text", "empty"),
    ({"prompt": "x", "completion": "   "}, "completion", "empty completion"),
    ({"prompt": "x", "completion": None}, "completion", "expected a string, got NoneType"),
    ({"prompt": 3, "completion": "y"}, "prompt", "expected a string, got int"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hello"}, "messages", "non-empty list"),
    ({"messages": [{"role": "user"}]}, "messages[0]", "'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "expected a string, got int"),
    ({"messages": [{"role": "boss", "content": "hi"}]}, "messages[0].role", "unknown role 'boss'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no non-empty assistant message"),
    (
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant"}]},
        "prompt+completion[1]",
        "'role' and 'content'",
    ),
]


@pytest.mark.parametrize("row,field,problem", BAD_POOL_ROWS, ids=[c[1] + ":" + c[2][:20] for c in BAD_POOL_ROWS])
def test_bad_pool_record_names_record_and_field(planted, row, field, problem):
    with pytest.raises(BadRecordError) as e:
        tokenize_sft_example(row, planted[2], 64, source="pool.jsonl", index=7)
    assert str(e.value).startswith(f"pool.jsonl: record 7, field '{field}'") and problem in str(e.value)


def test_bad_record_in_a_dataset_is_reported_with_its_index(planted):
    rows = [GOOD, GOOD, {"prompt": "x", "completion": " "}, GOOD]
    with pytest.raises(BadRecordError, match=r"pool: record 2, field 'completion'"):
        tokenize_pool(Dataset.from_list(rows), planted[2], 64)
    with pytest.raises(BadRecordError, match="the pool is empty"):
        tokenize_pool(Dataset.from_dict({"prompt": [], "completion": []}), planted[2], 64)


BAD_PAIRS = [
    ({**PAIR, "chosen": None}, "chosen", "missing"),
    ({**PAIR, "rejected": "  "}, "rejected", "empty"),
    ({**PAIR, "prompt": ""}, "prompt", "empty"),
    ({**PAIR, "rejected": PAIR["chosen"]}, "chosen,rejected", "chosen and rejected are identical"),
    ({**PAIR, "chosen": 12}, "chosen", "expected a string or a list of messages, got int"),
    ({**PAIR, "chosen": [{"role": "assistant"}]}, "chosen[0]", "each message needs 'role' and 'content'"),
]


@pytest.mark.parametrize("pair,field,problem", BAD_PAIRS, ids=[c[2][:20] for c in BAD_PAIRS])
def test_bad_preference_pair_names_record_and_field(pair, field, problem):
    with pytest.raises(BadRecordError) as e:
        validate_preferences(_rows([PAIR, pair]), "validation")
    assert str(e.value).startswith(f"validation: record 1, field '{field}'") and problem in str(e.value)


class _Rows(list):
    """Just enough of a Dataset for validate_preferences: arrow cannot hold a row whose field has the
    wrong type (an int `chosen` among strings), which is exactly what must be reported."""

    column_names = ["prompt", "chosen", "rejected", "subtask"]

    def select_columns(self, _):
        return self


def _rows(rows):
    return _Rows({**r, "subtask": "s"} for r in rows)


@pytest.mark.parametrize("subtask", ["", None])
def test_bad_subtask(subtask):
    validation = Dataset.from_list([{**PAIR, "subtask": "polite"}, {**PAIR, "subtask": subtask}])
    with pytest.raises(BadRecordError, match="validation: record 1, field 'subtask'"):
        validate_preferences(with_subtasks(validation), "validation")


def test_empty_validation_set():
    with pytest.raises(BadRecordError, match="the preference set is empty"):
        validate_preferences(
            Dataset.from_dict({"prompt": [], "chosen": [], "rejected": [], "subtask": []}), "validation"
        )


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.1"])
@pytest.mark.parametrize("name", ["selection_fraction", "warmup_fraction"])
def test_fraction_outside_unit_interval(name, fraction):
    with pytest.raises(ValueError, match=rf"{name} must be in \(0, 1\]"):
        ROSEConfig(**{name: fraction})
    if name == "selection_fraction":
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            top_fraction(np.zeros(10), fraction)


def test_pool_too_small_for_one_selection():
    # Policy: k = ceil(fraction * n) rows (at least 1); a strict fraction that would take the whole pool is refused.
    with pytest.raises(ValueError, match="a pool of 1 rows is too small for selection_fraction=0.05"):
        top_fraction(np.array([0.5]), 0.05)
    with pytest.raises(ValueError, match="selects the whole pool"):
        top_fraction(np.arange(3.0), 0.9)
    assert top_fraction(np.array([0.5]), 1.0).tolist() == [0]
    assert top_fraction(np.arange(21.0), 0.05).tolist() == [20, 19]
    with pytest.raises(ValueError, match="empty pool"):
        top_fraction(np.array([]), 0.5)


def test_long_prompts_are_truncated_by_the_documented_rule(planted):
    tok = planted[2]
    prompt = " ".join(["pasta garlic oven"] * 60)
    full = tokenize_sft_example({"prompt": prompt, "completion": " tomato soil seed ."}, tok, None)
    n_resp = sum(full["completion_mask"])
    cut = tokenize_sft_example({"prompt": prompt, "completion": " tomato soil seed ."}, tok, 32)
    # The prompt keeps its last max(32 - response, 16) tokens, the (short) response is whole.
    keep = max(32 - n_resp, 16)
    assert len(cut["input_ids"]) == keep + n_resp == 32
    assert cut["input_ids"] == full["input_ids"][len(full["input_ids"]) - n_resp - keep :]
    assert cut["completion_mask"] == [0] * keep + [1] * n_resp
    # A long response: the prompt keeps 32 // 2 = 16 tokens, the response its first 16.
    long = {"prompt": prompt, "completion": " " + " ".join(["tomato soil"] * 40)}
    full = tokenize_sft_example(long, tok, None)
    cut = tokenize_sft_example(long, tok, 32)
    first = full["completion_mask"].index(1)
    assert cut["input_ids"] == full["input_ids"][first - 16 : first] + full["input_ids"][first : first + 16]
    assert cut["completion_mask"] == [0] * 16 + [1] * 16


def test_tokenizer_without_pad_or_eos(planted):
    pool, validation, tok, _ = planted
    tok = copy.deepcopy(tok)
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        ROSESelector(pool, validation, tok, ROSEConfig(), "unused")


def test_model_without_lora_targets_or_trainable_parameters(tmp_path):
    with pytest.raises(ValueError, match="not_a_layer"):
        tiny_lora_model(targets=("not_a_layer",))
    model = tiny_lora_model()
    for p in model.parameters():
        p.requires_grad_(False)
    store_meta = dict(
        model="m",
        checkpoint="c",
        projection={"type": "sjlt", "dim": 8},
        gradient_type="sgd",
        pool_fingerprint="p",
        num_rows=2,
    )
    with pytest.raises(UnsupportedParameterError, match="no trainable parameters"):
        extract_gradients(
            model,
            [{"input_ids": [3, 4, 5], "completion_mask": [0, 1, 1]}] * 2,
            GradientStore.open_or_create(tmp_path / "s", **store_meta),
            build_projector("sjlt", 10, 8, 0),
            0,
            progress=False,
        )


def test_optimizer_without_adam_state():
    model = tiny_lora_model()
    params = trainable_parameters(model)
    with pytest.raises(MissingAdamStateError, match="needs at least one AdamW step"):
        AdamState.from_optimizer(torch.optim.AdamW([p for _, p in params]), params)
    with pytest.raises(MissingAdamStateError, match="no Adam state"):
        AdamState.from_optimizer(torch.optim.SGD([p for _, p in params], lr=0.1), params)


def test_nonfinite_gradients_are_refused_and_not_stored(tmp_path):
    model = tiny_lora_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    n = sum(p.numel() for _, p in trainable_parameters(model))
    store = GradientStore.open_or_create(
        tmp_path / "s",
        model="m",
        checkpoint="c",
        projection={"dim": 16},
        gradient_type="sgd",
        pool_fingerprint="p",
        num_rows=3,
    )
    pool = [{"input_ids": [3, 4, 5, 6], "completion_mask": [0, 0, 1, 1]}] * 3
    with pytest.raises(FloatingPointError, match=r"non-finite .* pool indices \[0, 1, 2\]"):
        extract_gradients(model, pool, store, build_projector("sjlt", n, 16, 0), 0, progress=False)
    assert len(GradientStore.open(tmp_path / "s").missing_rows()) == 3


STORE = dict(
    model="m",
    checkpoint="c",
    projection={"type": "sjlt", "dim": 4},
    gradient_type="sgd",
    pool_fingerprint="p",
    num_rows=5,
    shard_size=4,
)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "shard_00001.npy").unlink(), "shard_00001.npy is missing or unreadable"),
        (lambda d: (d / "done_00000.npy").write_bytes((d / "done_00000.npy").read_bytes()[:60]), "done_00000.npy"),
        (lambda d: (d / "meta.json").write_text('{"format_version": 1, "dtype": "float8"'), "not valid JSON"),
        (
            lambda d: (d / "meta.json").write_text(json.dumps({**STORE, "format_version": 1, "dtype": "float8"})),
            "unknown store dtype 'float8'",
        ),
        (
            lambda d: (d / "meta.json").write_text(json.dumps({**STORE, "format_version": 99, "dtype": "float16"})),
            "store format 99",
        ),
        (lambda d: (d / "meta.json").unlink(), "not a gradient store"),
    ],
)
def test_corrupt_or_truncated_store(tmp_path, damage, message):
    GradientStore.open_or_create(tmp_path / "s", **STORE)
    damage(tmp_path / "s")
    with pytest.raises(CorruptStoreError, match=message):
        GradientStore.open(tmp_path / "s")


def test_folder_in_the_way_of_a_store_is_not_taken_over(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(CorruptStoreError, match="exists but is not a gradient store"):
        GradientStore.open_or_create(tmp_path / "s", **STORE)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_missing_checkpoint_files(tmp_path, planted):
    with pytest.raises(FileNotFoundError, match="no checkpoint-<step> folders"):
        find_checkpoints(tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match="optimizer.pt is missing"):
        load_checkpoint_adam(tmp_path / "checkpoint-3", tiny_lora_model())
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        select_from_checkpoints(tmp_path, None, None)


def test_recipe_exits_nonzero_naming_file_record_and_field(tmp_path):
    """The recipe, as a user runs it, with one bad preference pair: non-zero exit, the message, no outputs."""
    subprocess.run(
        [sys.executable, "-m", "rose_trl.cli", "tiny-assets", str(tmp_path / "outputs/tiny")],
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
    )
    val = tmp_path / "outputs/tiny/validation.jsonl"
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "rose_sft.py"),
        "--config",
        str(ROOT / "recipes" / "tiny" / "rose" / "config_tiny.yaml"),
    ]
    result = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert (
        "outputs/tiny/validation.jsonl: record 3, field 'chosen,rejected': chosen and rejected are identical"
        in result.stderr
    ), result.stderr[-2000:]
    assert not (tmp_path / "outputs/tiny/run").exists()
