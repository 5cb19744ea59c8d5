"""What the columns of a score table (scores.parquet) hold, for the writer and every reader alike.

    score                  the selection score (gradient methods: the best subtask's)
    score_<subtask>        each subtask's checkpoint-weighted score, in validation-set order
    score_ckpt<i>          each checkpoint's own best-subtask score (gradient methods), in step order

A subtask may have any name: when one would take a checkpoint column's name (a subtask called `ckpt0`),
the checkpoint columns move to a prefix no subtask column starts with (`score__ckpt<i>`, ...). Readers
therefore ask `ScoreColumns.read` with the subtasks the folder's summary.json lists, never parse names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


SCORE = "score"
SUBTASK_PREFIX = "score_"


def checkpoint_prefix(subtasks: Iterable[str]) -> str:
    """`score_ckpt`, with more underscores until no subtask column starts with it."""
    columns = [SUBTASK_PREFIX + s for s in subtasks]
    prefix = "score_ckpt"
    while any(c.startswith(prefix) for c in columns):
        prefix = prefix.replace("_ckpt", "__ckpt")
    return prefix


@dataclass(frozen=True)
class ScoreColumns:
    """What the columns of a score table hold: `score`, one `score_<subtask>` per subtask and one checkpoint column
    per checkpoint (`score_ckpt<i>`, or a longer prefix when a subtask's name would collide). Writers get theirs
    from `for_table`, readers from `read` with the subtasks summary.json lists; no one parses column names.

    Args:
        subtasks (`tuple[str, ...]`, defaults to `()`):
            The subtasks with a column, in validation-set order.
        checkpoints (`tuple[str, ...]`, defaults to `()`):
            The checkpoint columns' names, in step order.

    Example:

    ```python
    >>> from rose_trl.scoring.columns import ScoreColumns
    >>> columns = ScoreColumns.for_table(["math", "ckpt0"], num_checkpoints=2)
    >>> columns.subtask_columns, columns.checkpoints
    (['score_math', 'score_ckpt0'], ('score__ckpt0', 'score__ckpt1'))
    >>> ScoreColumns.read(["score", "score_math", "score_ckpt0", "score__ckpt0", "score__ckpt1"], ["math", "ckpt0"])
    ScoreColumns(subtasks=('math', 'ckpt0'), checkpoints=('score__ckpt0', 'score__ckpt1'))

    ```
    """

    subtasks: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()  # the checkpoint columns' names, in step order

    @classmethod
    def for_table(cls, subtasks: Iterable[str], num_checkpoints: int = 0) -> ScoreColumns:
        """The columns a writer gives these subtasks and checkpoints."""
        subtasks = tuple(subtasks)
        prefix = checkpoint_prefix(subtasks)
        return cls(subtasks, tuple(f"{prefix}{i}" for i in range(num_checkpoints)))

    def subtask(self, name: str) -> str:
        return SUBTASK_PREFIX + name

    @property
    def subtask_columns(self) -> list[str]:
        return [self.subtask(s) for s in self.subtasks]

    def subtask_of(self, column: str) -> str:
        return self.subtasks[self.subtask_columns.index(column)]

    @classmethod
    def read(cls, columns: Iterable[str], subtasks: Iterable[str] | None = None) -> ScoreColumns:
        """The description of a table with `columns`. `subtasks` (summary.json's list) names the subtasks;
        a subtask without its column (a baseline that scores the pool as a whole) is left out. Without
        `subtasks` (a folder without summary.json) every `score_<name>` column but the checkpoints' is one."""
        columns = list(columns)
        if subtasks is None:
            pattern = re.compile(re.escape(checkpoint_prefix([])) + r"\d+")
            subtasks = [
                c[len(SUBTASK_PREFIX) :] for c in columns if c.startswith(SUBTASK_PREFIX) and not pattern.fullmatch(c)
            ]
        subtasks = list(subtasks)
        prefix = checkpoint_prefix(subtasks)
        n = 0
        while f"{prefix}{n}" in columns:
            n += 1
        return cls(
            tuple(s for s in subtasks if SUBTASK_PREFIX + s in columns), tuple(f"{prefix}{i}" for i in range(n))
        )
