"""The one error type for bad input, and the one wrapper every entry point runs through.

Owns :class:`UserError` (the base of every error that means "your input is wrong", not "lvita has a
bug"), the path and config errors that lower layers share, and :func:`run_main`, which turns a
``UserError`` into one line on stderr and exit status 2. A leaf module: it imports nothing from lvita,
so any module may import it.

    from lvita.errors import PathError, run_main
    raise PathError(f"--data {path}: no such file")
    def main(argv=None) -> int:
        return run_main("lvita eval", _main, argv)    # "lvita eval: error: --data x.jsonl: no such file", 2

Any other exception is a bug: it propagates with its traceback and a non-zero exit.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """Bad input: stage file, data, paths, checkpoints, media, arguments. The message names the file,
    key or option and the fix; the entry points print it as one line and exit 2."""


class PathError(UserError):
    """A path the user gave (or a stage file names) is missing, of the wrong kind or unreadable."""


class ConfigError(UserError, ValueError):
    """A stage file or override is wrong; the message names the key and the fix. (Also a ValueError:
    the model presets' callers catch ValueError to add where the value came from.)"""


def one_line(error: BaseException) -> str:
    """The error's message on one line: newlines and the indentation after them become single spaces."""
    return " ".join(str(error).split()) or type(error).__name__


def run_main(prog: str, fn: Callable[..., int | None], *args, **kwargs) -> int:
    """``fn(*args, **kwargs)``'s exit status (None: 0). A :class:`UserError` prints
    ``{prog}: error: {message}`` (one line) on stderr, from rank 0 only when ``RANK`` is set, and
    gives 2 on every rank; any other exception propagates."""
    try:
        code = fn(*args, **kwargs)
    except UserError as e:
        if os.environ.get("RANK", "0").strip() in ("", "0"):
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0 if code is None else code
