"""The bad-input error of the data layer, in a module of its own: data.py and folder.py both raise it, and
neither needs to import the other for it."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data-set input: unknown name, missing or malformed archive."""
