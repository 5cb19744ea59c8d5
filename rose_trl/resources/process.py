"""What this process holds (its resident memory, and the model's weights mapped from their file and not read
yet), and a pass that runs out of memory run again at half its rows. The memory budget (budget.py) is checked
against `resident_bytes`; the passes it sizes run through `halving_on_oom`."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import re

import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import find_executable_batch_size
from accelerate.utils.memory import should_reduce_batch_size


logger = get_logger(__name__)

_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)")


def _trim_heap() -> None:
    """Ask glibc to return freed heap pages to the system (malloc_trim): the RSS then counts what is in use."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def unread_weight_bytes(model) -> int:
    """Bytes of `model`'s weights mapped from their file but not yet read into this process's memory (Linux's
    /proc/self/smaps: the mappings that hold a parameter, their size less their resident part; 0 elsewhere).
    transformers loads safetensors weights of the file's dtype as a mapping of the file, and a page of it joins the
    RSS only when a pass first reads it: the first pass reads them all, so they are held from then on."""
    local = (t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers()))
    # a sharded (FSDP2 DTensor) parameter has no storage of its own: its local shard's is the one that is mapped
    pointers = sorted({t.untyped_storage().data_ptr() for t in local if t.device.type == "cpu"})
    try:
        with open("/proc/self/smaps") as f:
            smaps = f.read()
    except OSError:
        return 0
    unread = 0
    inside = False
    size = 0
    for line in smaps.splitlines():
        head = _MAPPING.match(line)
        if head:  # a mapping: "start-end perms offset dev inode path"
            start, end = int(head.group(1), 16), int(head.group(2), 16)
            i = bisect.bisect_left(pointers, start)
            inside = head.group(3) != "0" and i < len(pointers) and pointers[i] < end
        elif inside and line.startswith("Size:"):
            size = int(line.split()[1])
        elif inside and line.startswith("Rss:"):
            unread += max(0, size - int(line.split()[1])) * 1024
    return unread


def resident_bytes(device: torch.device | str | None = None, model=None) -> int:
    """What this process holds now: its resident memory on the CPU, the memory allocated on a CUDA device. With
    `model` (on the CPU), its weights mapped from their file and not read yet count too (`unread_weight_bytes`):
    the next pass reads them."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    import psutil

    _trim_heap()
    return int(psutil.Process().memory_info().rss) + (unread_weight_bytes(model) if model is not None else 0)


def halving_on_oom(function, start: int, what: str):
    """`function(rows)` run with `start` rows a pass; when it runs out of memory, run again with half as many
    (accelerate's `find_executable_batch_size`, halving), each retry logged. `function` must resume, not
    redo, what it finished before the error.

    The first try is a plain call: accelerate's wrapper runs a full garbage collection before its first call
    (about 0.15 s with torch and transformers loaded), which would be paid by every extraction and validation
    call of a run, and is several times the whole gradient pass of a small model (tests/test_benchmarks.py).
    Only a pass that runs out of memory goes through accelerate's loop."""
    current = {"rows": max(1, int(start))}

    def halve() -> int:  # called once the error is caught (by this function, then by accelerate's handler)
        PartialState()  # accelerate's logger needs its state
        if current["rows"] == 1:
            raise torch.OutOfMemoryError(
                f"{what} ran out of memory at 1 row a pass: lower max_length, or give the process more memory"
            )
        before, current["rows"] = current["rows"], current["rows"] // 2
        logger.warning(
            "%s ran out of memory at %d rows a pass: retrying at %d (accelerate's "
            "find_executable_batch_size; lower memory_budget_gb to avoid the retry)",
            what,
            before,
            current["rows"],
        )
        return current["rows"]

    try:
        return function(current["rows"])
    except Exception as error:  # noqa: BLE001 - accelerate's test says which errors are out-of-memory ones
        if not should_reduce_batch_size(error):
            raise
    # Outside the handler: the failed pass's frames (and their tensors) are released by now; accelerate's wrapper
    # collects garbage and empties the device cache before its first call.
    return find_executable_batch_size(function, starting_batch_size=halve(), reduce_batch_size_fn=halve)()
