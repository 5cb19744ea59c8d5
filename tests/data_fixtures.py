"""Tiny in-code stand-ins for the Hub datasets the data side reads, in their exact schemas.

Schemas: allenai/tulu-v2-sft-mixture {dataset, id, messages}; stanfordnlp/SHP (dataset card);
HuggingFaceH4/stack-exchange-preferences {qid, question, answers[...], date, metadata};
Anthropic/hh-rlhf harmless-base {chosen, rejected} and red-team-attempts {transcript, rating, ...}.
The texts are made up.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets


def tulu_rows() -> list[dict]:
    rows = []
    for i, src in enumerate(
        ["flan_v2", "cot", "oasst1", "sharegpt", "science.scierc_ner", "flan_v2", "cot", "oasst1"]
    ):
        rows.append(
            {
                "dataset": src,
                "id": f"{src}_{i}",
                "messages": [
                    {"role": "user", "content": f"question {i} from {src}"},
                    {"role": "assistant", "content": f"answer {i}"},
                ],
            }
        )
    return rows


def shp_rows(subreddit: str, posts: int = 6) -> list[dict]:
    rows = []
    for p in range(posts):
        for c, (sa, sb, label) in enumerate([(30, 5, 1), (4, 12, 0), (9, 8, 1)]):  # ratios 6, 3, 1.125
            rows.append(
                {
                    "post_id": f"{subreddit}{p}",
                    "domain": f"{subreddit}_train",
                    "upvote_ratio": 0.95,
                    "history": f"{subreddit} post {p}: what should I do?",
                    "c_root_id_A": f"a{p}{c}",
                    "c_root_id_B": f"b{p}{c}",
                    "created_at_utc_A": 1_600_000_000 + c,
                    "created_at_utc_B": 1_600_000_100 + c,
                    "score_A": sa,
                    "score_B": sb,
                    "human_ref_A": f"comment A{c} on {subreddit} {p}",
                    "human_ref_B": f"comment B{c} on {subreddit} {p}",
                    "labels": label,
                    "seconds_difference": 100.0,
                    "score_ratio": max(sa, sb) / min(sa, sb),
                }
            )
    return rows


def se_rows(host: str, questions: int = 5) -> list[dict]:
    rows = []
    for q in range(questions):
        answers = [
            {
                "answer_id": 10 * q + j,
                "author": f"user{j}",
                "author_id": j,
                "author_profile": f"https://{host}/users/{j}",
                "pm_score": score,
                "selected": sel,
                "text": f"<p>answer {j} to {q} on {host}</p>",
            }
            for j, (score, sel) in enumerate([(2, False), (5, True), (1, False)])
        ]
        if q == 0:
            answers = answers[:1]  # a question with one answer cannot give a pair
        rows.append(
            {
                "qid": q,
                "question": f"<p>{host} question {q}?</p>\n",
                "answers": answers,
                "date": "2020/01/01",
                "metadata": [f"https://{host}/questions/{q}", f"https://{host}", f"https://{host}/users/7"],
            }
        )
    return rows


def hh_harmless_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        context = f"\n\nHuman: how do I do bad thing {i}?\n\nAssistant: why?\n\nHuman: just tell me {i}\n\nAssistant:"
        rows.append(
            {"chosen": context + f" I cannot help with that {i}.", "rejected": context + f" Sure, step one {i}."}
        )
    return rows


def hh_red_team_rows() -> list[dict]:
    # Transcripts 0 and 1 continue harmless-base conversations 0 and 1 (with their chosen responses).
    rows = []
    for i in range(2):
        rows.append(
            {
                "transcript": f"\n\nHuman: how do I do bad thing {i}?\n\nAssistant: why?\n\nHuman: just tell me {i}"
                f"\n\nAssistant: I cannot help with that {i}.\n\nHuman: ok",
                "min_harmlessness_score_transcript": 1.2,
                "num_params": "52B",
                "model_type": "rlhf",
                "rating": 0.0,
                "task_description": f"bad thing {i}",
                "task_descripton_harmlessness_score": 0.5,
                "red_team_member_id": 3,
                "is_upworker": False,
                "tags": None,
            }
        )
    rows.append({**rows[0], "transcript": "\n\nHuman: unrelated\n\nAssistant: fine"})
    return rows


def fake_hub(real_load_dataset):
    """A `datasets.load_dataset` that serves the fixtures by (path, data_dir) and records its calls."""
    calls = []

    def load_dataset(path, *args, data_dir=None, split=None, **kwargs):
        if path in ("json", "parquet", "csv", "arrow"):
            return real_load_dataset(path, *args, data_dir=data_dir, split=split, **kwargs)
        calls.append({"path": path, "data_dir": data_dir, "split": split, **kwargs})
        if path == "allenai/tulu-v2-sft-mixture":
            rows = tulu_rows()
        elif path == "stanfordnlp/SHP":
            rows = shp_rows(data_dir)
        elif path == "HuggingFaceH4/stack-exchange-preferences":
            rows = se_rows(data_dir.split("/", 1)[1])
        elif path == "Anthropic/hh-rlhf" and data_dir == "harmless-base":
            rows = hh_harmless_rows()
        elif path == "Anthropic/hh-rlhf" and data_dir == "red-team-attempts":
            rows = hh_red_team_rows()
        else:
            raise FileNotFoundError(f"fake hub: no dataset {path!r} data_dir={data_dir!r}")
        return datasets.Dataset.from_list(rows)

    load_dataset.calls = calls
    return load_dataset


def write_released_layout(root: Path, task: str, subtasks: list[str], k: int, records: dict | None = None) -> Path:
    """A miniature of the paper's release under root; returns the preference file's path."""
    (root / "test" / task).mkdir(parents=True)
    for s in subtasks:
        (root / "test" / task / f"{task}_{s}.json").write_text(
            json.dumps([{"prompt": f"\n\nHuman: test {s}\n\nAssistant:", "golden_answer": f" gold {s}"}])
        )
    shot = root / "validation" / task / f"{task}_{k}_shot"
    shot.mkdir(parents=True)
    if records is None:
        records = {}
        for s in sorted(subtasks):
            for j in range(k):
                records[f"\n\nHuman: {s} q{j}\n\nAssistant:"] = {
                    "responses": [f" good {s}{j}", f" bad {s}{j}"],
                    "pairs": [[0, 1]],
                    "sft_target": f" good {s}{j}",
                    "rejected_target": f" bad {s}{j}",
                }
    path = shot / f"{task}_{k}_shot_preference.json"
    path.write_text(json.dumps(records))
    (shot / f"{task}_{k}_shot_sft.json").write_text(
        json.dumps(
            [
                {
                    "dataset": task,
                    "id": f"{task}_{i}",
                    "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r["sft_target"]}],
                }
                for i, (p, r) in enumerate(records.items())
            ]
        )
    )
    return path
