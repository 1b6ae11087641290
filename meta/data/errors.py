"""Exceptions raised by the data layer."""

from __future__ import annotations


class DataError(RuntimeError):
    """Missing, incomplete or corrupt data set files (the message says what and where)."""
