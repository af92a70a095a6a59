"""One setting at a time: a term weight, a hyperparameter or a recipe field, checked against the rules its field
carries (:func:`kdbench.settings.setting`); the same check serves study files, ``--set KEY=VALUE`` and the bounds of a
search space alike."""

from __future__ import annotations

import dataclasses

from .methods import Method
from .settings import Recipe, rules, weights

__all__ = ["StudyError", "TUNABLE", "FIELDS", "allowed", "keys_help", "field_types", "check_value", "apply_overrides",
           "parse_sets", "gpus_allowed"]


class StudyError(ValueError):
    """Bad configuration: names the file, the key, the value and what is allowed."""


def gpus_allowed(value: float, workers: int = 1) -> str | None:
    """Why ``value`` GPUs per trial (per worker of ``workers``) cannot be placed (None: it can): 0..8, a fraction that
    divides one GPU (1/2, 1/3, ...: Ray would leave the rest of each GPU idle), or whole GPUs; whole GPUs for a
    multi-worker trial (Ray packs fractions on one GPU, and NCCL refuses two ranks of one communicator there)."""
    if not 0 <= value <= 8:
        return "0..8 (fractions share a GPU)"
    if workers > 1 and 0 < value < 1:
        return (f"whole GPUs with workers_per_trial = {workers}: each worker needs its own GPU (Ray would pack the "
                f"fractions on one GPU, where NCCL refuses two workers of a trial)")
    if 0 < value < 1 and abs(1 / value - round(1 / value)) > 1e-6:
        n = int(1 / value)
        return (f"a fraction that divides one GPU ({value:g} packs {n} trials and leaves {1 - n * value:.2g} of each GPU "
                f"idle): 1/{n} = {1 / n:.4g} or 1/{n + 1} = {1 / (n + 1):.4g}")
    if value > 1 and value != int(value):
        return "whole GPUs above one (1, 2, ...)"
    return None


def field_types(cls) -> dict[str, str]:
    return {name: f.type for name, f in rules(cls).items()}


FIELDS = {**rules(Method), **rules(Recipe)}  # every key --set and a search space may name, with its rules
TUNABLE = {name: f.type for name, f in FIELDS.items()}


def keys_help() -> str:
    """Every key ``--set`` and a search space take, grouped, each with what it allows: the help the commands show."""
    hyper = [k for k in rules(Method) if k not in weights(Method)]
    line = lambda keys: "; ".join(f"{k} ({allowed(k)})" for k in keys)
    return (f"Term weights ({allowed('kd')}): {', '.join(weights(Method))}. Their hyperparameters: {line(hyper)}. "
            f"Recipe fields: {line(rules(Recipe))}.")


def allowed(key: str) -> str:
    """What field ``key`` allows, in words: its choices or its range (e.g. ``> 0``, ``>= 0 and <= 0.999``)."""
    r = FIELDS[key].metadata
    if r["doc"] and r["choices"]:
        return f"{', '.join(r['choices'])} ({r['doc']})"
    if r["doc"]:
        return r["doc"]
    if r["choices"]:
        return ", ".join(r["choices"])
    if TUNABLE[key] == "bool":
        return "true or false"
    return f"{'>' if r['above'] else '>='} {r['lo']}" + (f" and <= {r['hi']}" if r["hi"] is not None else "")


def check_value(key: str, value, where: str):
    """Coerce ``value`` to the type of field ``key`` (of Method or Recipe) and range-check it."""
    kind = TUNABLE.get(key)
    if kind is None:
        raise StudyError(f"{where}: key {key!r} is unknown; allowed: {', '.join(TUNABLE)}")
    rule = FIELDS[key].metadata
    if key == "milestones":  # epochs: a list (TOML), or "150,180,210" / "150 180 210" (--set, trials.csv)
        items = value.replace(",", " ").split() if isinstance(value, str) else \
            [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        try:
            ms = tuple(int(x) for x in items) if isinstance(items, (list, tuple)) and \
                all(not isinstance(x, bool) and float(x).is_integer() for x in items) else None
        except (TypeError, ValueError):
            ms = None
        if ms is None or any(m < rule["lo"] for m in ms) or list(ms) != sorted(set(ms)):
            raise StudyError(f"{where}: milestones = {value!r}; allowed: {allowed(key)}")
        return ms
    if kind == "bool":  # TOML true/false; --set 1/0, true/false
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in ("1", "0", "true", "false"):
            return value if isinstance(value, bool) else text in ("1", "true")
        raise StudyError(f"{where}: {key} = {value!r}; allowed: {allowed(key)}")
    if kind == "str":
        if rule["choices"] and value not in rule["choices"]:
            raise StudyError(f"{where}: {key} = {value!r}; allowed: {allowed(key)}")
        return str(value)
    try:
        if isinstance(value, bool):
            raise ValueError
        if kind == "int" and isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value) if kind == "int" else float(value)
    except (TypeError, ValueError):
        raise StudyError(f"{where}: {key} = {value!r}; allowed: a number ({kind})") from None
    lo, hi, above = rule["lo"], rule["hi"], rule["above"]
    if number != number or (lo is not None and (number < lo or (above and number == lo))) \
            or (hi is not None and number > hi):
        raise StudyError(f"{where}: {key} = {value!r}; allowed: {allowed(key)}")
    return number


def apply_overrides(method: Method, recipe: Recipe, values: dict, where: str) -> tuple[Method, Recipe]:
    """Set any Method or Recipe field from ``values`` (validated)."""
    m, r = {}, {}
    for key, value in values.items():
        v = check_value(key, value, where)
        (m if key in field_types(Method) else r)[key] = v
    recipe = dataclasses.replace(recipe, **r)
    if recipe.schedule == "step" and recipe.milestones and recipe.milestones[-1] >= recipe.epochs:  # else unused
        raise StudyError(f"{where}: milestones = {list(recipe.milestones)}; allowed: epochs before the last "
                         f"(epochs = {recipe.epochs})")
    if recipe.compile_mode != "default" and recipe.compile_backend != "inductor":
        raise StudyError(f"{where}: compile_mode = {recipe.compile_mode!r}; allowed with compile_backend = 'inductor' only "
                         f"(here {recipe.compile_backend!r})")
    return dataclasses.replace(method, **m), recipe


def parse_sets(pairs: list[str]) -> dict:
    """``["geometry=10", "lr=0.1"]`` -> ``{"geometry": "10", "lr": "0.1"}`` (checked later)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"--set {p!r}: expected KEY=VALUE with KEY one of: {', '.join(TUNABLE)}")
        out[key.strip()] = value.strip()
    return out
