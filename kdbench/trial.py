"""A trial of a study: its config (method name, seed, sampled or fixed values) -> what it trains, and
its ``config_id``; a trials.csv row -> the config that reproduces it."""

from __future__ import annotations

from . import results
from .study import TUNABLE, Study, apply_overrides
from .methods import Method
from .settings import Recipe, trial_values

__all__ = ["resolve_trial", "row_config", "trial_config_id"]


def resolve_trial(study: Study, config: dict) -> tuple[Method, Recipe, int]:
    """A trial's config (method name, seed, sampled or fixed values) -> the Method, Recipe and seed it runs."""
    base = study.methods[config.get("method", study.method)]
    values = {k: v for k, v in config.items() if k in TUNABLE}
    method, recipe = apply_overrides(base, study.recipe, values, f"{study.path}: trial")
    return method, recipe, int(config.get("seed", study.seed))


def row_config(row: dict) -> dict:
    """A trials.csv row -> the trial config that reproduces it (method, seed, every hyperparameter).

    The row's ``epochs`` is how far the trial got, not its recipe's length: it is left out.
    """
    values = {k: v for k, v in row.items() if k in TUNABLE and k != "epochs" and v == v}  # v == v: not NaN
    return {"method": row["method"], "seed": int(row["seed"]), **values}


def trial_config_id(study: Study, method: Method, recipe: Recipe) -> str:
    """The ``config_id`` of a run of ``study`` with this method and recipe."""
    return results.config_id(results.run_context(study.to_dict()), trial_values(method, recipe))
