import datasets
import pytest

from rose_trl.data import PREFERENCE_TASKS, build_preference_set, load_preferences
from rose_trl.data.builders import SE_SITES, SHP_SUBREDDITS, split_dialogue
from tests.data_fixtures import fake_hub, shp_rows


@pytest.fixture
def hub(monkeypatch):
    fake = fake_hub(datasets.load_dataset)
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_shp_by_name_one_best_pair_per_post(hub):
    ds = load_preferences("rose:shp", k=5, seed=0)
    assert len(ds) == 18 * 5 and ds["subtask"][:5] == ["askacademia"] * 5 and ds["subtask"][-1] == "legaladvice"
    assert [c["data_dir"] for c in hub.calls] == list(SHP_SUBREDDITS)
    assert all(c["path"] == "stanfordnlp/SHP" and c["split"] == "train" for c in hub.calls)
    row = ds[0]
    post = row["prompt"].split("askacademia post ")[1][0]
    # The post's pair with the highest score ratio (6, A preferred), HH-style prompt, leading-space responses.
    assert row == {
        "prompt": f"\n\nHuman: askacademia post {post}: what should I do?\n\nAssistant:",
        "chosen": f" comment A0 on askacademia {post}",
        "rejected": f" comment B0 on askacademia {post}",
        "subtask": "askacademia",
    }
    assert len(set(ds["prompt"])) == 90


def test_shp_score_ratio_threshold_and_label_direction(monkeypatch):
    # Only each post's ratio-3 pair (B preferred, labels=0) and its ratio-1.125 pair.
    rows = [r for r in shp_rows("askhr") if r["score_ratio"] < 5]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: datasets.Dataset.from_list(rows))
    ds = build_preference_set("shp", k=6, subtasks=["askhr"])
    assert all(r["chosen"].startswith(" comment B1") and r["rejected"].startswith(" comment A1") for r in ds)
    with pytest.raises(ValueError, match="askhr.*0 usable pairs, fewer than k=1"):
        build_preference_set("shp", k=1, subtasks=["askhr"], min_score_ratio=3.5)


def test_seeds_and_subtask_independence(hub):
    a = build_preference_set("shp", k=3, seed=0, subtasks=["askvet", "askhr"])
    b = build_preference_set("shp", k=3, seed=0, subtasks=["askhr"])
    c = build_preference_set("shp", k=3, seed=1, subtasks=["askvet", "askhr"])
    assert a["prompt"] == build_preference_set("shp", k=3, seed=0, subtasks=["askvet", "askhr"])["prompt"]
    assert a.filter(lambda s: s == "askhr", input_columns="subtask")["prompt"] == b["prompt"]
    assert a["prompt"] != c["prompt"]


def test_exclude_prompts_are_never_drawn(hub):
    full = build_preference_set("shp", k=6, subtasks=["askdocs"])  # all 6 posts
    banned = full["prompt"][:2]
    ds = build_preference_set("shp", k=4, subtasks=["askdocs"], exclude_prompts=[p + "  " for p in banned])
    assert not set(banned) & set(ds["prompt"])
    with pytest.raises(ValueError, match="only 4 usable pairs"):
        build_preference_set("shp", k=5, subtasks=["askdocs"], exclude_prompts=banned)


def test_se_best_answer_against_a_lower_scored_one(hub):
    ds = load_preferences("rose:se", seed=0)  # paper default k=2
    assert len(ds) == 20 and sorted(set(ds["subtask"])) == sorted(SE_SITES)
    assert [c["data_dir"] for c in hub.calls] == [f"data/{h}" for h in SE_SITES.values()]
    for row in ds:
        host = SE_SITES[row["subtask"]]
        q = int(row["prompt"].split("question ")[1].split("?")[0])
        assert q != 0  # the single-answer question has no pair
        assert row["prompt"] == f"\n\nHuman: <p>{host} question {q}?</p>\n\n\nAssistant:"
        assert row["chosen"] == f" <p>answer 1 to {q} on {host}</p>"  # pm_score 5, accepted
        assert row["rejected"] in (f" <p>answer 0 to {q} on {host}</p>", f" <p>answer 2 to {q} on {host}</p>")


def test_hh_pairs_split_by_red_team_join(hub):
    ds = load_preferences("rose:hh", k=2, seed=0)
    assert [c["data_dir"] for c in hub.calls] == ["harmless-base", "red-team-attempts"]
    red = ds.filter(lambda s: s == "red-team-attempts", input_columns="subtask")
    # Conversations 0 and 1 continue into red-team transcripts; the others stay harmless-base.
    assert sorted(p.split("just tell me ")[1][0] for p in red["prompt"]) == ["0", "1"]
    harmless = ds.filter(lambda s: s == "harmless-base", input_columns="subtask")
    assert all(p.split("just tell me ")[1][0] not in "01" for p in harmless["prompt"])
    for row in ds:
        i = row["prompt"].split("just tell me ")[1][0]
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"].startswith("\n\nHuman:")
        assert (row["chosen"], row["rejected"]) == (f" I cannot help with that {i}.", f" Sure, step one {i}.")
    with pytest.raises(ValueError, match="red-team-attempts.*only 2 usable pairs"):
        build_preference_set("hh", k=3)


def test_registry_errors_and_defaults(hub):
    assert {t: PREFERENCE_TASKS[t].default_k for t in PREFERENCE_TASKS} == {"shp": 5, "se": 2, "hh": 1}
    with pytest.raises(ValueError, match="unknown preference task 'mmlu'"):
        load_preferences("rose:mmlu")
    with pytest.raises(ValueError, match=r"unknown subtask\(s\) \['cooking'\]"):
        load_preferences("rose:shp", subtask_names=["cooking"])
    assert hub.calls == []  # nothing downloaded for a bad request


def test_split_dialogue():
    assert split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d") == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:",
        " d",
    )
    assert split_dialogue("no turns") is None
