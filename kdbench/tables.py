"""Typed access to a TOML table (a study file's) with errors that name the file and the dotted key, or the command-line
flag that set it: one line each, never a traceback, whatever the table holds."""

from __future__ import annotations

import math
import re

from .values import StudyError

__all__ = ["TableReader"]


def _is(value, kind) -> bool:
    """``isinstance`` as a study means it: a bool is no number, a number is finite."""
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind) and not (isinstance(value, float) and not math.isfinite(value))


def _shown(key) -> str:
    """A key as an error names it: quoted where it holds odd characters (a newline would break the one line)."""
    return key if re.fullmatch(r"[\w.+-]+", str(key)) else repr(key)


class TableReader:
    """Typed access to a TOML table with errors that name the file and the dotted key, or the command-line flag
    that set it (``origins``: dotted key -> flag, see :mod:`kdbench.flags`)."""

    def __init__(self, file: str, table: dict, prefix: str = "", origins: dict | None = None):
        self.file, self.table, self.prefix, self.origins = file, table, prefix, origins or {}

    def where(self, key: str) -> str:
        key = _shown(key)
        parts = f"{self.prefix}{key}".split(".")
        for n in range(len(parts), 0, -1):  # the flag that set this key or a table above it
            flag = self.origins.get(".".join(parts[:n]))
            if flag:
                return f"{flag}: {key}"
        return f"{self.file}: {self.prefix}{key}"

    def fail(self, key: str, value, allowed: str):
        raise StudyError(f"{self.where(key)} = {value!r}; allowed: {allowed}")

    def get(self, key: str, default, kind=None, choices=None, lo=None, item=None):
        """The value at ``key`` (``default`` where absent) as a ``kind`` (numbers finite; a list's elements each an
        ``item``), from ``choices``, ``>= lo``; else one StudyError line."""
        value = self.table.get(key, default)
        kind = kind or type(default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is None and default is None:
            return None
        if not _is(value, kind):
            name = "number" if isinstance(kind, tuple) else kind.__name__
            article = "an" if name[0] in "aeiou" else "a"
            self.fail(key, value, f"{article} {name}" + (f" from {', '.join(choices)}" if choices else ""))
        if kind is list and item is not None:
            for x in value:
                if not _is(x, item):
                    self.fail(key, value, f"a list of {'numbers' if isinstance(item, tuple) else item.__name__ + 's'}")
        if choices is not None and value not in choices:
            self.fail(key, value, ", ".join(map(str, choices)))
        if lo is not None and value < lo:
            self.fail(key, value, f">= {lo}")
        return value

    def sub(self, key: str) -> "TableReader":
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, value, "a table")
        return TableReader(self.file, value, f"{self.prefix}{_shown(key)}.", self.origins)

    def only(self, allowed) -> None:
        for key in self.table:
            if key not in allowed:
                raise StudyError(f"{self.where(key)}: unknown key; allowed: {', '.join(sorted(allowed))}")
