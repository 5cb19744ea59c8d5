"""Errors the user fixes, told apart from bugs.

A `UserError` is a bad option, record, file or folder: its message names it and says what to do. The command
lines (`rose-trl`, recipes/rose_sft.py, recipes/rose_select.py) print it as one line, `<prog>: error: <message>`,
and exit with 2, like argparse does for a bad option; any other exception is a bug and keeps its traceback.
The package's own error classes derive from it and from the built-in class they always were (ValueError,
FileNotFoundError, ...), so that code catching the built-in one keeps working.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user fixes: the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """An option's value cannot be used (out of range, unknown name, options that contradict each other)."""


class BadInputError(UserError, ValueError):
    """A file or folder the command reads holds something it cannot use: the message names the file and the row."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the command reads is not there, or is not what it should be (e.g. not a finished run)."""


class MissingPackageError(UserError, ImportError):
    """An optional package the command needs is not installed: the message gives the pip command."""


def exit_code(prog: str, func: Callable[[], int | None]) -> int:
    """Runs `func`; a UserError becomes one line on stderr (from the first process of a launch only, which every
    process meets the same error in) and exit code 2."""
    try:
        return func() or 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(line.strip() for line in str(e).splitlines())
            print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
