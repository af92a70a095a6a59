"""Study files (TOML) -> a frozen, validated :class:`Study`; ``--set key=value`` overrides.

Validation happens once, here at the edge. Every error is a :class:`StudyError` whose message names
the file, the key, the value and what is allowed; the CLI prints it as one line and exits 2.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .data import DataError, canonical, check_data
from .metrics import DEFAULT_OBJECTIVES, METRICS
from .tables import TableReader
from .trackers import check_trackers
from .results import KEEP_STUDENTS, migrate_study
from .models import check_model
from .methods import METHODS, Method
from .settings import (EVAL_WHEN, SAMPLERS, Asha, Checkpointing, Confirm, Evaluation, Grid, Param, Recipe, Resources, Search,
                       dataset_defaults, fields_dict)
from .values import TUNABLE, StudyError, field_types, apply_overrides, check_value, gpus_allowed, parse_sets

__all__ = ["Study", "Search", "Grid", "Asha", "Resources", "Checkpointing", "Evaluation", "Param", "Confirm",
           "StudyError", "load_study", "parse_study", "read_toml", "study_from_dict", "find_study", "bundled_studies",
           "apply_overrides", "check_value", "parse_sets", "TUNABLE", "check_confirm", "SAMPLERS", "OBJECTIVES"]
# (the tables' dataclasses live in kdbench.settings, StudyError and the single-value checks in kdbench.values)

# Searchable, measured on val at every epoch (the last five, computed only at the end otherwise, then are too).
OBJECTIVES = tuple(METRICS)
PARAM_TYPES = ("uniform", "loguniform", "int", "categorical")
STUDIES_DIR = Path(__file__).resolve().parent / "studies"


# ---------------------------------------------------------------------------------------------
# Study files


def check_confirm(seeds: int, top: int, with_: tuple[str, ...], methods: dict, where: str,
                  until_settled: bool = False, max_seeds: int = 8, names=("seeds", "top", "max_seeds", "with")) -> Confirm:
    """Validate a confirmation's options (from ``[confirm]`` or the command line; ``names``: what the seed
    count, top and max seeds are called there)."""
    for key, v in zip(names, (seeds, top, max_seeds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise StudyError(f"{where}{key} {v!r}: allowed: an integer >= 1")
    if until_settled and max_seeds < seeds:
        raise StudyError(f"{where}{names[2]} {max_seeds}: allowed: an integer >= {where}{names[0]} ({seeds})")
    for m in with_:
        if m not in methods:
            raise StudyError(f"{where}{names[3]} {m!r}: unknown preset; allowed: none or a comma-separated list of "
                             f"{', '.join(methods)}")
    return Confirm(seeds, top, tuple(with_), bool(until_settled), max_seeds)


@dataclass(frozen=True)
class Study:
    """A validated study, shaped as its TOML is: what to train and how (the top-level keys, ``[recipe]``,
    ``[methods]``), and what to search (``[search]``) or enumerate (``[grid]``), with its ``[asha]``,
    ``[resources]``, ``[checkpoint]``, ``[evaluation]``, ``[confirm]`` and ``[results]`` tables."""

    name: str
    path: str
    description: str
    dataset: str
    data_root: str
    split_seed: int
    teacher: str
    teacher_recipe: Recipe
    teacher_seed: int
    student: str
    recipe: Recipe
    methods: dict  # name -> Method: the presets with this study's overrides (and new combinations)
    method: str  # the method a search starts from
    seed: int
    search: Search | None = None  # exactly one of search and grid
    grid: Grid | None = None
    asha: Asha = field(default_factory=Asha)
    resources: Resources = field(default_factory=Resources)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    evaluation: Evaluation = field(default_factory=Evaluation)
    reference: tuple[tuple[str, float], ...] = ()  # reported test top-1 per method (e.g. the paper)
    confirm: Confirm | None = None  # run a confirmation right after the search
    data_options: dict = field(default_factory=dict)  # [data]: val_fraction, pad, flip, image_size, ...
    teacher_checkpoint: str = ""  # read the teacher from this file (absolute) instead of training it
    teacher_looked_for: str = ""  # [pairs]: the teacher_checkpoint file its template names, not found (trained instead)
    keep_students: str = "full"  # [results]: the trained students kept under students/ (results.KEEP_STUDENTS)
    trackers: tuple[str, ...] = ()  # [logging]: where curves go besides the folder (kdbench.trackers)
    source: dict = field(default_factory=dict)  # the TOML table it was read from, flags applied

    @property
    def is_grid(self) -> bool:
        return self.grid is not None

    @property
    def max_epochs(self) -> int:
        return self.recipe.epochs

    @property
    def concurrency(self) -> int:
        return (self.grid or self.search).concurrency

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.search.objectives if self.search is not None else DEFAULT_OBJECTIVES

    @property
    def space(self) -> tuple[Param, ...]:
        return self.search.space if self.search is not None else ()

    def trial_count(self) -> int:
        return len(self.grid.points) if self.is_grid else self.search.samples

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "recipe": fields_dict(self.recipe), "teacher_recipe": fields_dict(self.teacher_recipe),
                "methods": {k: fields_dict(m) for k, m in self.methods.items()}}


_TOP_KEYS = {"name", "description", "dataset", "data", "data_root", "split_seed", "teacher", "teacher_seed", "teacher_checkpoint",
             "student", "method", "seed", "recipe", "teacher_recipe", "methods", "search", "grid", "asha",
             "resources", "reference", "confirm", "checkpoint", "evaluation", "results", "logging"}


def _model(r: TableReader, key: str, default: str) -> str:
    try:
        return check_model(r.get(key, default, str))
    except ValueError as e:
        raise StudyError(f"{r.where(key)} = {e}") from None


def _data(r: TableReader) -> tuple[str, dict]:
    """``dataset`` (an image folder's path made absolute) and the ``[data]`` options."""
    dataset = r.get("dataset", "digits", str)
    try:
        check_data(dataset, None, r.where("dataset") + " =")
        options = check_data(dataset, r.sub("data").table, f"{r.file}: data")
    except DataError as e:
        raise StudyError(str(e)) from None
    return canonical(dataset), options


def _path(p: str) -> str:
    return str(Path(p).expanduser().resolve()) if p else ""


def _recipe(r: TableReader, base: Recipe) -> Recipe:
    r.only(field_types(Recipe))
    return apply_overrides(Method(), base, r.table, r.file + ": " + r.prefix.rstrip("."))[1]


def _methods(r: TableReader) -> dict[str, Method]:
    """Presets, with ``[methods.NAME]`` overrides; a new NAME needs ``base = PRESET``."""
    methods = dict(METHODS)
    for name, table in r.table.items():
        sub = r.sub(name)
        base = sub.get("base", name if name in METHODS else None, str)
        if base is None:
            raise StudyError(f"{sub.where('base')}: missing for new method {name!r}; allowed: {', '.join(METHODS)}")
        if base not in methods:
            sub.fail("base", base, ", ".join(methods))
        values = {k: v for k, v in table.items() if k != "base"}
        m, _ = apply_overrides(dataclasses.replace(methods[base], name=name), Recipe(), values,
                               f"{r.file}: methods.{name}")
        if any(k in field_types(Recipe) for k in values):
            raise StudyError(f"{r.file}: methods.{name}: recipe keys belong in [recipe]")
        methods[name] = m
    return methods


def _space(r: TableReader, methods: dict) -> tuple[Param, ...]:
    params = []
    for name in r.table:
        p = r.sub(name)
        p.only({"type", "low", "high", "choices", "when"})
        kind = p.get("type", "uniform", str, PARAM_TYPES)
        when = tuple(p.get("when", [], list, item=str))
        for m in (m for m in when if m not in methods):
            p.fail("when", m, ", ".join(methods))
        if name == "method":
            if kind != "categorical":
                p.fail("type", kind, "categorical (for method)")
            choices = tuple(p.get("choices", [], list, item=str))
            for c in (c for c in choices if c not in methods):
                p.fail("choices", c, ", ".join(methods))
            params.append(Param(name, kind, choices=choices, when=when))
            continue
        if name not in TUNABLE:
            raise StudyError(f"{r.where(name)}: unknown parameter; allowed: method, {', '.join(TUNABLE)}")
        if kind == "categorical":
            choices = tuple(check_value(name, c, p.where("choices")) for c in p.get("choices", [], list))
            if not choices:
                p.fail("choices", [], "a non-empty list")
            params.append(Param(name, kind, choices=choices, when=when))
            continue
        low = check_value(name, p.get("low", None, (int, float)), p.where("low"))
        high = check_value(name, p.get("high", None, (int, float)), p.where("high"))
        if not low < high:
            p.fail("high", high, f"> low ({low})")
        if kind == "loguniform" and low <= 0:
            p.fail("low", low, "> 0 for loguniform")
        if kind == "int" and TUNABLE[name] != "int":
            p.fail("type", kind, "uniform or loguniform (the parameter is a float)")
        params.append(Param(name, kind, low, high, when=when))
    return tuple(params)


def read_toml(path: str | Path) -> dict:
    """A study file's TOML, or one line saying why it cannot be read."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid TOML ({e})") from None


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (one with ``[pairs]`` is many studies: :func:`kdbench.pairs.load_studies`)."""
    raw = read_toml(path)
    if "pairs" in raw:
        raise StudyError(f"{path}: holds [pairs], one study per teacher-student pair; allowed here: a single study "
                         f"(kdbench tune reads [pairs])")
    return parse_study(raw, path)


def parse_study(raw: dict, path: str | Path | None, where: str | None = None, origins: dict | None = None) -> Study:
    """Validate a study's TOML table (``where``: how errors name it, default the file; ``path`` None: a study made
    of command-line flags alone; ``origins``: the keys that flags set, named in errors by their flag)."""
    file = where or (str(path) if path is not None else "the command line")
    r = TableReader(file, raw, origins=origins)
    r.only(_TOP_KEYS)
    dataset, data_options = _data(r)
    d = dataset_defaults(dataset)
    teacher, student = (_model(r, key, d[key]) for key in ("teacher", "student"))
    recipe = _recipe(r.sub("recipe"), d["recipe"])
    teacher_recipe = _recipe(r.sub("teacher_recipe"), d["recipe"])
    methods = _methods(r.sub("methods"))
    method = r.get("method", "geometry", str, tuple(methods))
    seed = r.get("seed", 0, int, lo=0)

    has_search, has_grid = "search" in raw, "grid" in raw
    if has_search == has_grid:
        raise StudyError(f"{file}: needs exactly one of [search] (a sampler) or [grid] (an enumeration)")
    search = _search(r.sub("search"), methods) if has_search else None
    grid = _grid(r.sub("grid"), methods, method, seed) if has_grid else None
    asha = _asha(r.sub("asha"), has_search, recipe)
    if data_options.get("val_fraction") == 0 and (has_search or asha.enabled):  # nothing to choose or stop on
        raise StudyError(f"{r.file}: data.val_fraction = 0.0 (no validation split); allowed only in a grid without "
                         f"ASHA: a search and ASHA choose and stop on validation metrics")
    ref = r.sub("reference")
    res_table = r.sub("results")
    res_table.only({"keep_students"})
    log = r.sub("logging")
    log.only({"trackers"})
    confirm = None
    if "confirm" in raw:
        c = r.sub("confirm")
        c.only({"seeds", "top", "with", "until_settled", "max_seeds"})
        if not has_search:
            c.fail("seeds", c.table.get("seeds", 3), "no [confirm] in a grid study: its seeds are already there")
        confirm = check_confirm(c.get("seeds", 3, int), c.get("top", 3, int), tuple(c.get("with", ["baseline", "kd"], list, item=str)),
                                methods, f"{file}: confirm.", c.get("until_settled", False, bool), c.get("max_seeds", 8, int))
    return Study(
        name=r.get("name", Path(path).stem if path is not None else "search", str),
        path=str(Path(path).resolve()) if path is not None else "", source=copy.deepcopy(raw), description=r.get("description", "", str),
        dataset=dataset, data_root=r.get("data_root", "data", str), split_seed=r.get("split_seed", 0, int, lo=0),
        data_options=data_options, teacher=teacher, teacher_recipe=teacher_recipe,
        teacher_seed=r.get("teacher_seed", 0, int, lo=0), teacher_checkpoint=_path(r.get("teacher_checkpoint", "", str)),
        student=student, recipe=recipe, methods=methods, method=method, seed=seed, search=search, grid=grid, asha=asha,
        resources=_resources(r.sub("resources"), recipe), checkpoint=_checkpointing(r.sub("checkpoint")),
        evaluation=_evaluation(r.sub("evaluation"), asha), reference=tuple((k, ref.get(k, 0.0, float)) for k in ref.table),
        confirm=confirm, keep_students=res_table.get("keep_students", "full", str, choices=KEEP_STUDENTS),
        trackers=check_trackers(log.get("trackers", [], list, item=str), f"{file}: logging.trackers"))


def _search(s: TableReader, methods: dict) -> Search:
    s.only({"sampler", "samples", "concurrency", "objectives", "space"})
    objectives = tuple(s.get("objectives", list(DEFAULT_OBJECTIVES), list, item=str))
    for o in objectives:
        if o not in OBJECTIVES:
            s.fail("objectives", o, ", ".join(OBJECTIVES))
    if len(objectives) != 2 or len(set(objectives)) != 2:
        s.fail("objectives", list(objectives), "two different metrics (e.g. an accuracy and a geometry one)")
    space = _space(s.sub("space"), methods)
    if not space:
        s.fail("space", {}, "at least one parameter table, e.g. [search.space.geometry]")
    return Search(sampler=s.get("sampler", "tpe", str, SAMPLERS), samples=s.get("samples", 16, int, lo=1),
                  concurrency=s.get("concurrency", 2, int, lo=1), objectives=objectives, space=space)


def _grid(g: TableReader, methods: dict, method: str, seed: int) -> Grid:
    """methods x seeds x (the cross product of ``values``' axes, or the listed ``points``)."""
    g.only({"methods", "seeds", "values", "points", "concurrency"})
    names = g.get("methods", [method], list, item=str) or g.fail("methods", [], "a non-empty list of methods")
    for m in names:
        if m not in methods:
            g.fail("methods", m, ", ".join(methods))
    seeds = g.get("seeds", [seed], list, item=int) or g.fail("seeds", [], "a non-empty list of seeds >= 0")
    for sd in seeds:
        if sd < 0:
            g.fail("seeds", sd, "integers >= 0")
    if "points" in g.table:
        if "values" in g.table:
            g.fail("points", "...", "either [grid.values] (a cross product) or points (a list), not both")
        points = g.get("points", [], list, item=dict) or g.fail("points", [], "a non-empty list of tables")
        fixed = []
        for i, point in enumerate(points):
            p = TableReader(g.file, point, f"{g.prefix}points[{i}].", g.origins)
            fixed.append(tuple((key, check_value(key, x, p.where(key))) for key, x in point.items()))
    else:
        v = g.sub("values")
        axes = []
        for key, values in v.table.items():
            if not isinstance(values, list) or not values:
                v.fail(key, values, "a non-empty list")
            axes.append([(key, check_value(key, x, v.where(key))) for x in values])
        fixed = list(itertools.product(*axes)) if axes else [()]
    return Grid(tuple((m, sd, f) for m in names for sd in seeds for f in fixed), g.get("concurrency", 2, int, lo=1))


def _asha(a: TableReader, has_search: bool, recipe: Recipe) -> Asha:
    a.only({"enabled", "grace_period", "reduction_factor", "rank"})
    grace = a.get("grace_period", max(1, recipe.epochs // 4), int, lo=1)
    if grace > recipe.epochs:
        a.fail("grace_period", grace, f"<= recipe.epochs ({recipe.epochs})")
    return Asha(enabled=a.get("enabled", has_search, bool), grace_period=grace,
                reduction_factor=a.get("reduction_factor", 3, int, lo=2),
                rank=a.get("rank", "pareto" if has_search else "top1", str, ("top1", "pareto")))  # searches: 2 objectives


def _resources(res: TableReader, recipe: Recipe) -> Resources:
    res.only({"cpus_per_trial", "gpus_per_trial", "workers_per_trial"})
    n = res.get("workers_per_trial", 1, int, lo=1)
    if n > 1 and recipe.batch_size % n:  # the global batch, split evenly (checked here: a trial would fail on it)
        res.fail("workers_per_trial", n, f"a divisor of the recipe's batch_size {recipe.batch_size} (the global batch)")
    cpus = res.get("cpus_per_trial", 1.0, float)
    if cpus <= 0:
        res.fail("cpus_per_trial", cpus, "> 0")
    gpus = res.get("gpus_per_trial", None, float)
    if gpus is not None and gpus_allowed(gpus, n):
        res.fail("gpus_per_trial", gpus, gpus_allowed(gpus, n))
    return Resources(cpus, gpus, n)


def _evaluation(ev: TableReader, asha: Asha) -> Evaluation:
    ev.only({"val", "test", "reference_per_class"})
    val = ev.get("val", "every_epoch" if asha.enabled else "end", str, EVAL_WHEN)
    if asha.enabled and val != "every_epoch":
        ev.fail("val", val, "every_epoch while [asha] is enabled (its rungs compare validation top-1)")
    return Evaluation(val, ev.get("test", "end", str, EVAL_WHEN), ev.get("reference_per_class", 0, int, lo=0))


def _checkpointing(ck: TableReader) -> Checkpointing:
    ck.only({"every", "minutes", "max_failures"})
    return Checkpointing(ck.get("every", 1, int, lo=0), ck.get("minutes", 0.0, float, lo=0.0), ck.get("max_failures", 1, int, lo=0))


def study_from_dict(d: dict) -> Study:
    """The :class:`Study` a results folder was run with, from its ``study.json`` (``Study.to_dict()``; an earlier
    schema's flat record is brought to this one by :func:`kdbench.results.migrate_study`)."""
    d = migrate_study(d)
    recipe = lambda r: Recipe(**{**r, "milestones": tuple(r.get("milestones") or ())})
    d["recipe"], d["teacher_recipe"] = recipe(d["recipe"]), recipe(d["teacher_recipe"])
    d["methods"] = {k: Method(**v) for k, v in d["methods"].items()}
    if d.get("search"):
        sp = d["search"]
        d["search"] = Search(**{**sp, "objectives": tuple(sp["objectives"]), "space": tuple(
            Param(**{**p, "choices": tuple(p["choices"]), "when": tuple(p["when"])}) for p in sp["space"])})
    if d.get("grid"):
        d["grid"] = Grid(tuple((m, s, tuple(tuple(kv) for kv in values)) for m, s, values in d["grid"]["points"]),
                         d["grid"]["concurrency"])
    for key, cls in (("asha", Asha), ("resources", Resources), ("checkpoint", Checkpointing), ("evaluation", Evaluation)):
        d[key] = cls(**(d.get(key) or {}))  # a table an earlier version did not record: its defaults
    d["reference"] = tuple(tuple(kv) for kv in d.get("reference", ()))
    d["trackers"] = tuple(d.get("trackers", ()))
    c = d.get("confirm")
    d["confirm"] = Confirm(**{**c, "with_": tuple(c["with_"])}) if c else None
    return Study(**d)


def bundled_studies() -> dict[str, Path]:
    """The study files shipped with kdbench, by name."""
    return {p.stem: p for p in sorted(STUDIES_DIR.glob("*.toml"))}


def find_study(name_or_path: str | Path) -> Path:
    """A study by path, or by the name of a bundled study (``digits`` -> studies/digits.toml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    bundled = bundled_studies()
    key = p.name[:-5] if p.name.endswith(".toml") else p.name
    if key in bundled and (p.parent == Path(".") or not p.parent.exists() or p.parent.name == "studies"):
        return bundled[key]
    raise StudyError(f"{name_or_path}: no such study file or bundled study; bundled: {', '.join(bundled)}")
