"""Which runs a confirmation makes: the search's best configurations and the presets, on fresh seeds,
and — until settled — which of them get one more seed after each round.

Racing (as SMAC's intensification and Hoeffding races do): after each round, the configurations on the
front on validation means, and those a front member dominates on means but whose 95% intervals overlap
the member's on both objectives, get one more seed; it stops when a round changes no front membership
and no such overlap is left, or when every configuration that would need a seed has ``max_seeds``.
Pure planning over a results table; :func:`kdbench.search.run_confirm` runs the plan through Ray Tune.
"""

from __future__ import annotations

from . import stats
from .study import Confirm, Study, StudyError
from .trial import resolve_trial, row_config, trial_config_id

__all__ = ["plan_confirm", "settle", "pending", "confirmed_pairs", "fresh_seeds", "STOP_REASONS"]

STOP_REASONS = ("separated", "dominated", "max seeds")


def fresh_seeds(trials, n: int) -> list[int]:
    """The ``n`` smallest seeds no search trial used: the k-th seed of every confirmed configuration."""
    used = set(int(s) for s in trials.loc[trials["stage"] != "confirm", "seed"]) if len(trials) else set()
    return [s for s in range(len(used) + n) if s not in used][:n]


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
    seeds = fresh_seeds(trials, confirm.seeds)
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


def settle(study: Study, trials, ids: list[str], confirm: Confirm, previous_front: list[str] | None) -> dict:
    """One racing decision on the confirmation rows of configurations ``ids``.

    Returns ``front`` (ids on the front on validation means), ``unsettled`` (:func:`kdbench.stats.unsettled`
    pairs), ``seeds`` (id -> confirmation seeds it has), ``next`` (the (id, seed) runs of the next round:
    empty when settled or at ``max_seeds``), ``settled`` (the front did not change since ``previous_front``
    and nothing overlaps) and ``reasons`` (id -> why it stops or would stop now: separated, dominated,
    max seeds).
    """
    rows = trials[(trials["stage"] == "confirm") & trials["config_id"].isin(ids)] if len(trials) else trials
    rows = rows if "study" in rows.columns else rows.assign(study="")
    table = stats.summarise(rows, [f"val_{o}" for o in study.objectives]) if len(rows) else rows
    table = table[table["n"] > 0].reset_index(drop=True) if len(table) else table
    mask = stats.front_on_means(table, study.objectives)[0] if len(table) else []
    front = sorted(table.loc[mask, "config_id"]) if len(table) else []
    pairs = stats.unsettled(table, study.objectives) if len(table) else []
    seeds = dict(zip(table["config_id"], table["n_seeds"].astype(int))) if len(table) else {}
    overlapping = {u["member"] for u in pairs} | {u["rival"] for u in pairs}
    settled = previous_front is not None and sorted(previous_front) == front and not pairs
    want = [] if settled else [c for c in table["config_id"] if c in set(front) | overlapping]
    fresh = fresh_seeds(trials, confirm.max_seeds)
    nxt = [(c, fresh[seeds[c]]) for c in want if seeds[c] < confirm.max_seeds]
    reasons = {c: "max seeds" if c in overlapping or (c in want and seeds[c] >= confirm.max_seeds)
               else "separated" if c in front else "dominated" for c in seeds}
    return {"front": front, "unsettled": pairs, "seeds": seeds, "next": nxt, "settled": settled, "reasons": reasons}


def confirmed_pairs(trials) -> set:
    if len(trials) == 0 or "stage" not in trials.columns:
        return set()
    c = trials[trials["stage"] == "confirm"]
    return set(zip(c["config_id"].astype(str), c["seed"].astype(int)))


def pending(study: Study, trials, confirm: Confirm, recorded: dict, where: str) -> tuple[list[dict], list[dict], dict | None]:
    """The confirmation runs still to make, the candidates, and the racing decision that chose them (None when
    the runs finish a recorded round, or without ``until_settled``).

    Round 1 is the plan of :func:`plan_confirm`; each later round is recorded in study.json
    before it runs, so a round interrupted by a kill is finished as planned (only its missing runs), never
    re-decided on partial results.
    """
    plan, picked = plan_confirm(study, trials, confirm, where)
    done = confirmed_pairs(trials)
    values = {p["config_id"]: p for p in picked}
    # A pair of a configuration this confirmation does not pick (another --with, --top) is not run.
    runs = lambda pairs: [{"config_id": c, "method": values[c]["method"], "seed": int(s), "stage": "confirm",
                           **values[c]["values"]} for c, s in pairs if c in values]
    rounds = recorded.get("rounds") or [{"pairs": [(p["config_id"], p["seed"]) for p in plan]}]
    missing = [r for r in runs(rounds[-1]["pairs"]) if (r["config_id"], r["seed"]) not in done]
    if missing or not confirm.until_settled:
        return missing, picked, None
    decision = settle(study, trials, list(values), confirm, rounds[-2].get("front") if len(rounds) > 1 else None)
    return runs(decision["next"]), picked, decision
