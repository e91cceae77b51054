"""Errors that say the data itself (not one sample) is wrong; the ``lvita`` commands report them
in one line and exit 2, ``lvita.train`` stops with them.

    from lvita.data.errors import DataError
    raise DataError("FILE: not a valid JSON array at byte N; re-download it")

Kept apart from :mod:`lvita.data.stream` (which re-exports ``DataError``) so that the file readers
can raise it without importing the stream.
"""
from __future__ import annotations

from lvita.errors import UserError


class DataError(UserError):
    """Too many bad samples, or a data file that cannot be read as a whole: the data is wrong."""
