"""The study ``kdbench tune`` runs: where it comes from (a file, the resumed folder's study.json, a data set's
defaults), the flags as edits of its TOML table, and what a resume may change (:func:`differences`). The study's
own reader validates the edited table, so a flag and the study-file line that says the same pass one set of
checks; an error names the flag.

    --space KEY=DIST:LOW:HIGH[:when=M1,M2]    DIST: uniform | loguniform | int   (replaces or adds one axis)
    --space KEY=categorical:A,B,C[:when=...]  KEY = method: its choices are presets
    --space KEY=off                           drops an axis
    --set [METHOD.]KEY=VALUE                  a recipe field, or a term weight or hyperparameter of METHOD
                                              (default: the method the study runs)

Without a study file, ``--dataset`` makes one: the data set's defaults (models, recipe) and the search of the
default study (``digits``: its sampler, samples and objectives; its space unless ``--space`` names one).
"""

from __future__ import annotations

import contextlib
import copy
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import canonical
from .study import PARAM_TYPES, TUNABLE, Study, StudyError, bundled_studies, check_value, find_study, read_toml, study_from_dict
from .methods import METHODS, Method
from .settings import StudyKey
from .values import field_types

__all__ = ["Flags", "apply_flags", "base_table", "study_source", "differences", "RESUMABLE", "DEFAULT_STUDY"]

DEFAULT_STUDY = "digits"


@dataclass(frozen=True)
class Flags:
    """What ``tune`` was told on top of (or instead of) a study file.

    ``keys``: dotted study key -> (the flag as typed, e.g. ``--samples 64``, and the key's value); ``space``,
    ``sets``: the ``--space`` and ``--set`` arguments."""

    space: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    keys: dict = field(default_factory=dict)

    @classmethod
    def of(cls, command: Callable, given: dict) -> Flags:
        """The flags of ``command`` (a Typer command whose options carry :class:`StudyKey` marks) that ``given``
        (its arguments by name) sets; ``space`` and ``set_`` are the axes and the sets."""
        keys = {}
        for name, hint in typing.get_type_hints(command, include_extras=True).items():
            meta = getattr(hint, "__metadata__", ())
            mark = next((m for m in meta if isinstance(m, StudyKey)), None)
            value = given.get(name)
            if mark is None or value is None or value is False:
                continue
            decls = next((getattr(m, "param_decls", None) for m in meta if getattr(m, "param_decls", None)), None)
            flag = decls[0] if decls else f"--{name.replace('_', '-')}"
            keys[mark.key] = (flag if value is True else f"{flag} {value}", mark.parse(value))
        return cls(tuple(given.get("space") or ()), tuple(given.get("set_") or ()), keys)

    @property
    def dataset(self) -> str | None:
        return self.keys.get("dataset", (None, None))[1]


def base_table(dataset: str, space: bool = True) -> dict:
    """The study a study-less ``tune --dataset X`` runs: X's defaults and the default study's ``[search]`` (without
    its space when ``space`` is False: the ``--space`` flags make it)."""
    search = copy.deepcopy(read_toml(bundled_studies()[DEFAULT_STUDY])["search"])
    if not space:
        search["space"] = {}
    label = Path(dataset[len("folder:"):]).name if dataset.startswith("folder:") else dataset
    return {"name": f"{label}-search", "dataset": dataset, "search": search}


def _axis(arg: str) -> tuple[str, dict | None]:
    """``geometry=loguniform:1:1000:when=geometry`` -> ("geometry", its [search.space] table); ``off`` -> None."""
    key, sep, spec = arg.partition("=")
    key = key.strip()
    if not sep or not key or not spec:
        raise StudyError(f"--space {arg!r}: expected KEY=DIST:LOW:HIGH (DIST: uniform, loguniform, int), "
                         f"KEY=categorical:A,B,C or KEY=off; KEY: method, {', '.join(TUNABLE)}")
    if spec == "off":
        return key, None
    parts = spec.split(":")
    when = [p for p in parts if p.startswith("when=")]
    parts = [p for p in parts if not p.startswith("when=")]
    table: dict = {"type": parts[0]}
    if when:
        table["when"] = [m for m in when[-1][len("when="):].split(",") if m]
    if parts[0] == "categorical" and len(parts) == 2:
        table["choices"] = [_number(c) for c in parts[1].split(",") if c]
    elif parts[0] in PARAM_TYPES and parts[0] != "categorical" and len(parts) == 3:
        table["low"], table["high"] = _number(parts[1]), _number(parts[2])
    elif parts[0] not in PARAM_TYPES:
        raise StudyError(f"--space {arg}: distribution {parts[0]!r} is unknown; allowed: {', '.join(PARAM_TYPES)}, off")
    else:
        shape = "categorical:A,B,C" if parts[0] == "categorical" else f"{parts[0]}:LOW:HIGH"
        raise StudyError(f"--space {arg}: expected KEY={shape}[:when=METHOD,...]")
    return key, table


def _number(text: str):
    """A bound or choice as TOML would hold it: int, float, or the text itself (method names)."""
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def apply_flags(raw: dict, flags: Flags, file: str) -> tuple[dict, dict]:
    """``raw`` (a study's TOML table) with ``flags`` applied, and the keys they set (dotted key -> the flag, for
    :func:`kdbench.study.parse_study`'s errors). Values are checked where a flag alone can be wrong; what
    depends on the rest of the study is checked by ``parse_study``."""
    raw, origins = copy.deepcopy(raw), {}
    grid, pairs = "grid" in raw, "pairs" in raw

    def put(table_path: str, key: str, value, flag: str):
        table = raw
        for name in table_path.split(".") if table_path else ():
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise StudyError(f"{file}: {table_path} is not a table; allowed: a table")
        table[key] = value
        origins[f"{table_path}.{key}" if table_path else key] = flag

    def searches_only(flag: str):
        if grid:
            raise StudyError(f"{flag}: {file} is a grid study ([grid]); allowed only for a search ([search])")

    for dotted, (shown, value) in flags.keys.items():
        table, _, key = dotted.rpartition(".")
        if key in ("teacher", "student", "teacher_checkpoint") and not table and pairs:
            raise StudyError(f"{shown}: {file} runs [pairs], each with its own teacher and student; allowed: a "
                             f"study without [pairs] ([pairs] teacher_checkpoint names a file per teacher)")
        if dotted == "dataset":
            value = canonical(value)
        if dotted == "search.concurrency" and grid:  # a grid's trials run at once as a search's do
            table = "grid"
        if table == "search":
            searches_only(shown)
        put(table, key, check_value(key, value, shown.split()[0]) if table == "recipe" else value, shown)
    for arg in flags.space:
        searches_only(f"--space {arg}")
        key, table = _axis(arg)
        space = raw.setdefault("search", {}).setdefault("space", {})
        if table is None:
            if key not in space:
                raise StudyError(f"--space {arg}: {key} is not searched; allowed: off for one of {', '.join(space) or '(none)'}")
            del space[key]
            continue
        put("search.space", key, table, f"--space {arg}")
    for arg in flags.sets:
        _set(raw, arg, put, file)
    return raw, origins


def _set(raw: dict, arg: str, put, file: str):
    """``--set [METHOD.]KEY=VALUE``: a recipe field into [recipe], a method's field into [methods.METHOD]."""
    target, sep, value = arg.partition("=")
    method, _, key = target.strip().rpartition(".")
    if not sep or not key:
        raise StudyError(f"--set {arg!r}: expected [METHOD.]KEY=VALUE with KEY one of: {', '.join(TUNABLE)}")
    v = check_value(key, value.strip(), f"--set {arg}")
    v = list(v) if isinstance(v, tuple) else v  # milestones, as TOML holds them
    space = raw.get("search", {}).get("space", {}) if "search" in raw else {}
    study_method = raw.get("method", "geometry")
    if key not in field_types(Method):
        if method:
            raise StudyError(f"--set {arg}: {key} is a recipe field, the same for every method; allowed: --set {key}=VALUE")
        if key in space:
            raise StudyError(f"--set {arg}: {key} is searched ({file}: search.space.{key}); allowed: --space {key}=off "
                             f"to fix it, or another key")
        put("recipe", key, v, f"--set {arg}")
        return
    methods = {**METHODS, **raw.get("methods", {})}
    grid = raw.get("grid", {}).get("methods", [study_method]) if "grid" in raw else None
    if not method and grid is not None and len(grid) > 1:
        raise StudyError(f"--set {arg}: the grid runs {', '.join(grid)}; allowed: --set METHOD.{key}=VALUE naming one")
    method = method or study_method
    if method not in methods:
        raise StudyError(f"--set {arg}: method {method!r} is unknown; allowed: {', '.join(methods)}")
    axis, searched = space.get(key), space.get("method", {}).get("choices") or [study_method]
    if isinstance(axis, dict) and method in searched and method in (axis.get("when") or searched):
        raise StudyError(f"--set {arg}: {key} is searched for {method} ({file}: search.space.{key}); allowed: --space "
                         f"{key}=off to fix it, or another key")
    put(f"methods.{method}", key, v, f"--set {arg}")


def study_source(study: str | None, flags, resume_from: Path | None) -> tuple:
    """(path, TOML table) of what ``tune`` starts from: the study named, the resumed folder's, the data set's
    defaults, or the default study."""
    if study is not None:
        path = find_study(study)
        return path, read_toml(path)
    if resume_from is not None:
        from .results import ResultsError, read_study

        try:
            recorded = read_study(resume_from).get("study") or {}
        except ResultsError:
            recorded = {}
        if not recorded.get("source"):
            raise StudyError(f"--resume {resume_from}: no study recorded there (study.json with its source); allowed: "
                             f"the study file as the first argument, or the folder of a run")
        return recorded.get("path") or None, recorded["source"]
    if flags.dataset is not None:
        return None, base_table(flags.dataset, space=not flags.space)
    path = find_study(DEFAULT_STUDY)
    return path, read_toml(path)


# What a resume may change: where and how much runs, not what a trial is (anything else would mix two studies'
# trials in one table). Dotted keys of the study record; a table's name covers its keys.
RESUMABLE = ("path", "description", "source", "data_root", "search.samples", "search.concurrency", "grid.concurrency",
             "resources", "checkpoint", "confirm", "keep_students", "trackers")


def differences(recorded: dict, study: Study) -> list[str]:
    """How ``study`` differs from the one a results folder ran (its study.json's ``study``, of any schema), one
    dotted key each, leaving out what a resume may change (``RESUMABLE``) and the presets the study does not train
    (a later version's new presets change nothing the folder holds). A grid may grow: runs added to it (a new
    method, more seeds) are what the resume then runs; every run the folder holds must still be in it."""
    import json

    from .results import migrate_study

    plain = lambda d: json.loads(json.dumps(d, default=str))  # tuples and lists alike
    recorded = plain(migrate_study(recorded))
    now = plain(study.to_dict())
    grown, was = (now.get("grid") or {}).get("points") or [], (recorded.get("grid") or {}).get("points") or []
    grid_grew = bool(was) and all(g in grown for g in was)
    used = {study.method} | {c for p in study.space if p.name == "method" for c in p.choices}
    used |= {g[0] for g in was} if grid_grew else {m for m, _, _ in (study.grid.points if study.grid else ())}

    def flat(d: dict, prefix: str = "") -> dict:
        items = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if key == "methods":
                v = {m: x for m, x in v.items() if m in used}
            if isinstance(v, list) and v and all(isinstance(x, dict) and "name" in x for x in v):
                v = {x["name"]: x for x in v}  # the space's axes, by name
            if any(key == r or key.startswith(r + ".") for r in RESUMABLE) or (key == "grid.points" and grid_grew):
                continue
            items |= flat(v, f"{key}.") if isinstance(v, dict) and v else {key: v}
        return items

    try:
        before = flat(plain(study_from_dict(recorded).to_dict()))
    except (TypeError, KeyError, ValueError):  # a study.json of another version: compare what it holds
        before = flat(recorded)
    now = flat(now)
    recorded_keys = set(recorded)  # a field an earlier version did not record: unknown, not different
    return [_difference(k, now.get(k, "(none)"), before.get(k, "(none)"))
            for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k.split(".")[0] in recorded_keys]


def _difference(key: str, now, before) -> str:
    """One short line: lists by what was added and what is gone (a grid of 60 runs is not printed whole)."""
    if isinstance(now, list) and isinstance(before, list):
        added, gone = [x for x in now if x not in before], [x for x in before if x not in now]
        show = lambda xs: ", ".join(map(str, xs[:3])) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
        parts = [f"{len(added)} added ({show(added)})"] * bool(added) + [f"{len(gone)} gone ({show(gone)})"] * bool(gone)
        return f"{key}: " + ("; ".join(parts) if parts else "the same entries in another order") + " since the folder ran"
    short = lambda v: (lambda t: t if len(t) <= 80 else t[:77] + "...")(repr(v))
    return f"{key} = {short(now)} now, {short(before)} in the folder"
