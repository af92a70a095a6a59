"""Hyperparameter importances of a search (Optuna's fANOVA), from its optuna.db or, where early stopping left
too few complete trials, from the deepest epoch enough trials reached."""

from __future__ import annotations

import pandas as pd

from .metrics import DEFAULT_OBJECTIVES, direction
from .results import Folder, search_of

__all__ = ["importances", "MIN_IMPORTANCE_TRIALS"]


MIN_IMPORTANCE_TRIALS = 5


def importances(folder: Folder) -> tuple[pd.DataFrame | None, str]:
    """fANOVA importances (``optuna.importance.FanovaImportanceEvaluator``, seed 0) of the searched
    hyperparameters for each objective, over the study's completed (full-fidelity) trials in
    ``optuna.db``. Returns the table (objective, param, importance, and the epoch whose values it ranks: the last for
    completed trials, an earlier one where ASHA stopped most) or None, and a one-line note."""
    db = folder.path / "optuna.db" if folder.path is not None else None
    if db is None or not db.is_file():
        return None, "importances: no optuna.db (not a search)"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    names = optuna.get_all_study_names(storage)
    if not names:
        return None, "importances: optuna.db holds no study"
    study = optuna.load_study(study_name=folder.study.get("name", names[0]) if folder.study.get("name") in names
                              else names[0], storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    objectives = search_of(folder.study).get("objectives") or DEFAULT_OBJECTIVES
    where = f"{len(done)} completed trials"
    epoch = (folder.study.get("study") or {}).get("recipe", {}).get("epochs")  # completed trials: every epoch
    if len(done) < MIN_IMPORTANCE_TRIALS:  # ASHA stopped most: use the deepest epoch enough trials reached
        study, epoch = _study_at_epoch(folder, objectives)
        if study is None:
            return None, (f"importances: {len(done)} completed trials and no epoch that {MIN_IMPORTANCE_TRIALS} trials "
                          f"reached; run more --samples")
        done = study.trials
        where = f"{len(done)} trials at epoch {epoch} of {(folder.study.get('study') or {}).get('recipe', {}).get('epochs')}"
    rows = []
    for i, o in enumerate(objectives):
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=lambda t, i=i: t.values[i])
        rows += [{"objective": f"val_{o}", "param": p, "importance": float(v), "epoch": epoch} for p, v in imp.items()]
    note = (f"importances (fANOVA over {where}"
            + ("; few trials: a hint, not a ranking" if len(done) < 20 else "") + "): "
            + "; ".join(f"val_{o}: " + ", ".join(f"{r['param']} {r['importance']:.2f}" for r in rows
                                                 if r["objective"] == f"val_{o}") for o in objectives))
    return pd.DataFrame(rows), note


def _study_at_epoch(folder: Folder, objectives) -> tuple[object, int | None]:
    """An in-memory Optuna study of the search's trials at the deepest epoch that at least MIN_IMPORTANCE_TRIALS of
    them reached, their values the validation objectives at that epoch (from epochs.csv; every trial a rung kept
    reached it); the space from study.json. (None, None) when no epoch has enough."""
    import optuna

    space = list(search_of(folder.study).get("space") or ())
    trials, epochs = folder.trials, folder.epochs
    if not space or epochs is None or trials.empty or "stage" not in trials.columns:
        return None, None
    cols = [f"val_{o}" for o in objectives]
    search = trials[trials["stage"] == "search"].set_index("trial_id")
    e = epochs[epochs["trial_id"].isin(search.index)].dropna(subset=[c for c in cols if c in epochs.columns])
    if any(c not in e.columns for c in cols) or e.empty:
        return None, None
    reached = e.groupby("epoch")["trial_id"].nunique()
    deep = reached[reached >= MIN_IMPORTANCE_TRIALS]
    if deep.empty:
        return None, None
    epoch = int(deep.index.max())
    dist = {}
    for p in space:
        if p["type"] == "categorical":
            dist[p["name"]] = optuna.distributions.CategoricalDistribution(list(p["choices"]))
        elif p["type"] == "int":
            dist[p["name"]] = optuna.distributions.IntDistribution(int(p["low"]), int(p["high"]))
        else:
            dist[p["name"]] = optuna.distributions.FloatDistribution(p["low"], p["high"], log=p["type"] == "loguniform")
    study = optuna.create_study(directions=[direction(o) for o in objectives])
    for r in e[e["epoch"] == epoch].to_dict("records"):
        row = search.loc[r["trial_id"]]
        params = {k: (row[k] if d.__class__.__name__ == "CategoricalDistribution" else float(row[k]))
                  for k, d in dist.items() if k in row and row[k] == row[k]}
        params = {k: int(v) if isinstance(dist[k], optuna.distributions.IntDistribution) else v for k, v in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dist[k] for k in params},
                                                  values=[float(r[c]) for c in cols]))
    return study, epoch
