import json
import logging
import re

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from huggingface_hub import DatasetCard, HfApi

from rose_trl import cli, hub


CONFIG = {
    "selection_method": "rose",
    "selection_fraction": 0.4,
    "model_name_or_path": "tiny/llama",
    "pool_dataset": "allenai/tulu-v2-sft-mixture",
    "validation_dataset": "rose:se",
    "projection_dim": 8192,
    "projection_type": "rademacher",
    "seed": 3,
}


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's selection/ folder, in the layout the selection step writes."""
    sel = tmp_path / "selection"
    sel.mkdir()
    scores = np.array([0.5, -0.2, 0.9, 0.1, 0.7])
    selected = scores >= 0.7
    pq.write_table(
        pa.table(
            {
                "pool_index": np.arange(5),
                "score": scores,
                "score_academia": scores * 2,
                "score_physics": scores - 1,
                "selected": selected,
            }
        ),
        sel / "scores.parquet",
    )
    order = np.argsort(-scores)[: selected.sum()]
    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "source": "cot",
            "pool_index": int(i),
            "score": float(scores[i]),
        }
        for i in order
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(sel / "selected"))
    (sel / "config.json").write_text(json.dumps(CONFIG))
    (sel / "summary.json").write_text(
        json.dumps(
            {
                "num_pool": 5,
                "num_selected": 2,
                "selection_method": "rose",
                "subtasks": ["academia", "physics"],
                "threshold": 0.7,
            }
        )
    )
    return tmp_path


def test_card_renders_with_parseable_metadata(run_dir):
    text = hub.build_dataset_card(run_dir)
    header = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    meta = yaml.safe_load(header.group(1))
    rose = meta["rose_selection"]
    assert rose["selection_method"] == "rose" and rose["model"] == "tiny/llama"
    assert rose["validation_dataset"] == "rose:se" and rose["pool_dataset"] == "allenai/tulu-v2-sft-mixture"
    assert rose["selection_fraction"] == 0.4 and (rose["num_selected"], rose["num_pool"]) == (2, 5)
    assert (rose["selected_min"], rose["selected_max"], rose["threshold"]) == (0.7, 0.9, 0.7)
    assert rose["selected_mean"] == pytest.approx(0.8)
    assert meta["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*"}
    assert DatasetCard(text).data.to_dict()["rose_selection"] == rose
    block = re.search(r"```json\n(.*?)\n```", text, re.S).group(1)
    assert json.loads(block) == CONFIG  # the exact config
    assert "8192" in text and "rademacher" in text and "academia, physics" in text and "(40% of the pool)" in text


def test_push_uploads_rows_card_and_files(run_dir, monkeypatch, caplog):
    pushed, uploads = [], []

    def fake_push(self, repo_id, **kwargs):
        pushed.append((self.to_list(), repo_id, kwargs))

    def fake_upload(self, **kwargs):
        uploads.append(kwargs)

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push)
    monkeypatch.setattr(HfApi, "upload_file", fake_upload)
    caplog.set_level(logging.DEBUG)
    url = hub.push_selection(run_dir, "me/rose-subset", private=True, token="hf_secret_token")
    assert url == "https://huggingface.co/datasets/me/rose-subset"
    rows, repo_id, kwargs = pushed[0]
    # What goes up is exactly the save_to_disk folder, highest score first.
    assert rows == datasets.load_from_disk(str(run_dir / "selection" / "selected")).to_list()
    assert [r["pool_index"] for r in rows] == [2, 4]
    assert repo_id == "me/rose-subset" and kwargs["private"] is True and kwargs["token"] == "hf_secret_token"
    assert kwargs["split"] == "train"
    card = next(u for u in uploads if u["path_in_repo"] == "README.md")
    assert card["path_or_fileobj"].decode() == hub.build_dataset_card(run_dir, "me/rose-subset")
    assert 'load_dataset("me/rose-subset", split="train")' in card["path_or_fileobj"].decode()
    assert {u["path_in_repo"] for u in uploads} == {
        "README.md",
        "rose_selection/scores.parquet",
        "rose_selection/config.json",
        "rose_selection/summary.json",
    }
    assert all(u["repo_id"] == "me/rose-subset" and u["repo_type"] == "dataset" for u in uploads)
    assert "hf_secret_token" not in caplog.text


def test_cli_push_subcommand(run_dir, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(hub, "push_selection", lambda *a, **kw: calls.append((a, kw)) or "url")
    assert cli.main(["push", str(run_dir), "me/subset", "--private"]) == 0
    assert calls == [((str(run_dir), "me/subset"), {"private": True, "token": None, "folder": "selection"})]
    assert capsys.readouterr().out.strip() == "url"
    with pytest.raises(SystemExit):
        cli.main(["push", str(run_dir)])  # repo_id missing


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "selection").mkdir()
    with pytest.raises(FileNotFoundError, match="missing"):
        hub.build_dataset_card(tmp_path)
