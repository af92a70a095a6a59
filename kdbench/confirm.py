"""Which runs a confirmation makes: the search's best configurations and the presets, on fresh seeds.

Pure planning over a results table; :func:`kdbench.search.run_confirm` runs the plan through Ray Tune.
"""

from __future__ import annotations

from . import stats
from .study import Confirm, Study, StudyError
from .trial import resolve_trial, row_config, trial_config_id

__all__ = ["plan_confirm"]


def plan_confirm(study: Study, trials, confirm: Confirm, where: str = "") -> tuple[list[dict], list[dict]]:
    """The (configuration, seed) runs a confirmation makes, and its candidates (search trials first, then presets).

    Seeds: the ``confirm.seeds`` smallest seeds no search trial used. Presets whose configuration a
    candidate already has are not run twice. Raises StudyError when ``trials`` holds no finished
    full-fidelity search trial or a trial that this study cannot have produced.
    """
    cands = stats.confirm_candidates(trials, study.objectives, confirm.top) if len(trials) else trials
    if len(cands) == 0:
        raise StudyError(f"{where}: no finished full-fidelity search trial to confirm; allowed: a folder of "
                         f"`kdbench tune` with at least one completed trial")
    used = set(int(s) for s in trials.loc[trials["stage"] != "confirm", "seed"])
    seeds = [s for s in range(len(used) + confirm.seeds) if s not in used][:confirm.seeds]
    picked, ids = [], set()
    for r in cands.to_dict("records"):
        values = {k: v for k, v in row_config(r).items() if k not in ("method", "seed")}
        method, recipe, _ = resolve_trial(study, {"method": r["method"], **values})
        cid = trial_config_id(study, method, recipe)
        if cid != r["config_id"]:  # the row was not made by this study.json: another study's table?
            raise StudyError(f"{where}: trial {r['trial_id']} (config {r['config_id']}) does not match the study "
                             f"in study.json (it gives {cid}); allowed: a folder written by one study")
        picked.append({"config_id": cid, "method": r["method"], "from": f"trial {r['trial_id']}", "values": values})
        ids.add(cid)
    for name in confirm.with_:
        method, recipe, _ = resolve_trial(study, {"method": name})
        cid = trial_config_id(study, method, recipe)
        if cid not in ids:
            picked.append({"config_id": cid, "method": name, "from": "preset", "values": {}})
            ids.add(cid)
    plan = [{"config_id": p["config_id"], "method": p["method"], "seed": s, "stage": "confirm", **p["values"]}
            for p in picked for s in seeds]
    return plan, picked
