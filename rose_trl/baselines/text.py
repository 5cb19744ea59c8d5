"""Pool rows and validation pairs as plain text, the input of every text-similarity baseline."""

from __future__ import annotations

import numpy as np

from rose_trl.data.sft import BadRecordError


def _content(value) -> str:
    # TRL's conversational prompt/completion stores lists of messages instead of strings.
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return value


def pool_text(row: dict, index: int = 0) -> str:
    """The row's messages' contents joined by newlines, or prompt + completion."""
    if row.get("messages") is not None:
        return "\n".join(m["content"] for m in row["messages"])
    if row.get("prompt") is not None and row.get("completion") is not None:
        return _content(row["prompt"]) + "\n" + _content(row["completion"])
    raise BadRecordError("pool", index, "messages|prompt,completion", f"no text fields in {sorted(row)}")


def pool_texts(pool) -> list[str]:
    return [pool_text(row, i) for i, row in enumerate(pool)]


def validation_texts(validation) -> list[str]:
    """prompt + chosen: what the task wants the model to read and write."""
    return [_content(p) + "\n" + _content(c) for p, c in zip(validation["prompt"], validation["chosen"], strict=True)]


def subtask_groups(validation) -> dict[str, np.ndarray]:
    """subtask name -> row indices, in first-seen order. A set without `subtask` is one task, "all"."""
    names = validation["subtask"] if "subtask" in validation.column_names else ["all"] * len(validation)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(str(name), []).append(i)
    return {name: np.asarray(rows) for name, rows in groups.items()}


def max_over_subtasks(per_subtask: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The score-table form: `score` is the best subtask's score, plus one `score_<subtask>` column each."""
    table = {f"score_{name}": np.asarray(s, dtype=np.float64) for name, s in per_subtask.items()}
    table["score"] = np.max(np.stack(list(table.values())), axis=0)
    return table
