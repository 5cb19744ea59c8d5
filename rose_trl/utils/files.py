"""On-disk conventions every part shares: atomic JSON and folder writes, and the Trainer's checkpoint names.

A reader (a re-run, another process) sees a file or folder whole or not at all: each is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path


# transformers.trainer_utils.PREFIX_CHECKPOINT_DIR (tests/test_trl_api.py checks it), without importing transformers
PREFIX_CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    """The file's JSON, or `default` when there is no file."""
    return json.loads(path.read_text()) if path.exists() else default


def remove_tree(path: Path) -> None:
    """Delete a folder so that no half-deleted copy stays at its name: rename first, then remove."""
    path = Path(path)
    if path.exists():
        trash = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash)


def atomic_dir(final: Path) -> Path:
    """A fresh temporary folder beside `final`, to fill and then `publish`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Swap the finished folder in; a reader sees the old complete folder or the new one, never half."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def publish_first(tmp: Path, final: Path) -> bool:
    """Rename the finished folder into place unless another writer of the same content got there first;
    then theirs stays (a reader may be using it) and ours is removed. True when ours was published."""
    try:
        os.replace(tmp, final)
        return True
    except OSError:  # `final` exists and is not empty
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoint_step(name: str) -> int | None:
    """The step of a Trainer checkpoint's name (`checkpoint-<step>`), None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def checkpoint_dirs(folder: str | Path) -> list[Path]:
    """The `checkpoint-<step>` entries of `folder`, in step order."""
    found = [p for p in Path(folder).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if checkpoint_step(p.name) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p.name))
