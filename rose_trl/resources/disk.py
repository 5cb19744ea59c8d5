"""Disk space: a run's stores are sized before they are written, the free space is checked when they are
created, and every store file has its blocks allocated when it is created.

Gradient stores are memory-mapped. A write through a map into a file whose blocks were never allocated
(a sparse file, which is what creating a map of a given size makes) needs the filesystem to find a block
at that moment; on a full disk it cannot, and the kernel kills the process with SIGBUS: no Python error,
no message. With the blocks allocated up front (`allocate`, `os.posix_fallocate`), a full disk raises
`DiskSpaceError` naming the file when the store is created, and later writes through the map cannot fail
for lack of space (on filesystems that honour fallocate; copy-on-write ones such as btrfs or ZFS may still
need blocks when a page is rewritten).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from accelerate.logging import get_logger

from rose_trl.utils.errors import UserError


logger = get_logger(__name__)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}


class DiskSpaceError(UserError, OSError):
    """Not enough free disk space for what a run is about to write."""


def nearest_existing(path: str | Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent: where its filesystem is known."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user on the filesystem that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(Path(path))).free


def human(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def require_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse, naming the path, the bytes needed and the bytes free, when `needed` bytes do not fit under `path`."""
    free = free_bytes(path)
    if needed > free:
        raise DiskSpaceError(
            errno.ENOSPC,
            f"not enough disk space under {Path(path).absolute()} for {what}: needs {needed:,} bytes "
            f"({human(needed)}), {free:,} bytes free ({human(free)}). Free some space, or set "
            "output_dir on a larger disk (store_dtype: int8 halves the gradient stores)",
        )


def allocate(file: str | Path, new: bool) -> None:
    """Allocate every block of `file` (its current size), so that writes through a memory map of it cannot
    meet a full disk. A full disk raises DiskSpaceError naming the file; a `new` file is then removed."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with open(file, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in _UNSUPPORTED:  # a filesystem without fallocate (glibc emulates it on most others)
            logger.warning(
                "cannot allocate %s's blocks up front (%s): a disk that fills during the run may stop it with SIGBUS",
                file,
                e.strerror,
            )
            return
        if e.errno not in _NO_SPACE:
            raise
        if new:
            file.unlink(missing_ok=True)
        free = shutil.disk_usage(nearest_existing(file.parent)).free  # what is really free now, whatever was checked
        raise DiskSpaceError(
            e.errno,
            f"disk full: cannot allocate {size:,} bytes ({human(size)}) for {file} "
            f"({free:,} bytes free). Free some space and run the same command again: "
            "finished checkpoints and rows are kept",
        ) from None
