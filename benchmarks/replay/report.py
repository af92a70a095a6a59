"""Every strategy replayed on a table: the figures, the table printed, the anytime curves drawn."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table as RichTable

from .score import bootstrap, reach, truth
from .strategies import curves, pool, run_many, strategies, sweep
from .tables import TABLES, load_table, replay_study

__all__ = ["evaluate", "show", "figures", "RESULTS"]

RESULTS = Path(__file__).parents[1] / "results"


def _finite(x: float):
    return x if math.isfinite(x) else None  # JSON: a budget never reached is null


def limit(strategy, budget: int, horizon: float) -> int:
    """Trial-epochs a strategy's replays run to: random search (the reference) 3 x the default budget, the Gaussian
    process 1 x (a proposal costs ~0.15 s of one core: ~4 s a replay on digits at 1 x), the others ``horizon`` x."""
    return int(budget * (3.0 if strategy.name == "random" else 1.0 if strategy.sampler == "gp" else horizon))


def evaluate(name: str, seeds: int = 50, workers: int = 4, horizon: float = 1.25, processes=None,
             path: Path | None = None, plot: bool = True) -> dict:
    """Every strategy on table ``name``, ``seeds`` replays each (see :func:`limit` for how far); then the ASHA rung
    sweep for the sampler whose two-objective ASHA reached the highest median at the default budget (``TABLES``'
    budget, in trial-epochs). Per strategy: ``speedup_vs_random``, ``budget_share``, ``final_hv``
    (median, 95% bootstrap interval of the median, quartiles), ``replay_seeds``. ``processes``: a
    :func:`~.strategies.pool` to replay on (default: a new one)."""
    study = replay_study(name)
    budget = TABLES[name]["budget"]
    grid = np.arange(0, 3 * budget + 1)
    table = load_table(name, path)
    runs, started = {}, time.time()

    def replay_all(chosen):
        jobs = [(name, str(path) if path else None, s, seed, workers, limit(s, budget, horizon))
                for s in chosen for seed in range(seeds)]
        results = run_many(jobs, processes)
        for i, s in enumerate(chosen):
            runs[s.name] = (s, results[i * seeds:(i + 1) * seeds])

    first = strategies(study)
    replay_all(first)
    scored = {s.name: curves(r, grid, limit(s, budget, horizon))[:, budget] for s, r in runs.values()
              if s.asha == "pareto" or s.name == "default"}
    best = max((s for s, _ in runs.values() if s.name in scored and (s.asha == "pareto" or s.name == "default")),
               key=lambda s: np.median(scored[s.name]))
    replay_all([s for s in sweep(study, best.sampler) if s.key(study) not in {x.key(study) for x, _ in runs.values()}])

    random = curves(runs["random"][1], grid, 3 * budget)
    target = float(np.median(random[:, budget]))
    out = {"table": name, "configurations": len(table.values), "seeds_recorded": len(table.seeds),
           "epochs": table.epochs, "budget_trial_epochs": budget,
           "workers": workers, "random_final_hv_median": target, "best_sampler_for_the_sweep": best.sampler,
           "ceilings": truth(table, study.objectives).ceilings(table, study.objectives),
           "strategies": {}}
    for s, results in runs.values():
        c = curves(results, grid, limit(s, budget, horizon))
        reached = reach(c, grid, target)
        lo, hi = bootstrap(lambda r, x: reach(x, grid, float(np.median(r[:, budget]))) / budget, random, c)
        final = c[:, budget]
        flo, fhi = bootstrap(np.median, final)
        out["strategies"][s.name] = {
            "sampler": s.sampler, "asha": s.asha, "grace_period": s.study(study, 0).asha.grace_period,
            "reduction_factor": s.study(study, 0).asha.reduction_factor,
            "budget_share": _finite(reached / budget), "budget_share_ci": [_finite(lo), _finite(hi)],
            "speedup_vs_random": _finite(budget / reached) if 0 < reached < math.inf else None,
            "final_hv": {"median": float(np.median(final)), "ci_low": flo, "ci_high": fhi,
                         "q25": float(np.percentile(final, 25)), "q75": float(np.percentile(final, 75))},
            "trials_at_budget": float(np.median([(r[3] <= budget).sum() for r in results])),
            "full_trials_at_budget": float(np.median([(r[0] <= budget).sum() for r in results])),
            "replayed_to_trial_epochs": limit(s, budget, horizon),
            "replay_seeds": len(results)}
    out["seconds"] = time.time() - started
    if plot:
        best_found = max(out["strategies"], key=lambda n: out["strategies"][n]["final_hv"]["median"])
        out["best_found"] = best_found
        out["plot"] = str(_plot(name, runs, grid, budget, target, table.epochs, best_found, horizon))
    return out


def _plot(name: str, runs: dict, grid: np.ndarray, budget: int, target: float, epochs: int, best: str,
          horizon: float) -> Path:
    """Median (and quartiles, for the default, random search and the ``best`` strategy) of the normalised
    hypervolume over trial-epochs and over simulated wall time, each line ending where its replays stopped (on the
    clock: where the first of them stopped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banded = list(dict.fromkeys(("default", "random", best)))
    shown = banded + [n for n in ("random+pareto", "tpe", "tpe-noliar+pareto", "nsga2", "qmc", "gp") if n in runs
                      and n not in banded]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    first = min(r[1][0] for _, rs in runs.values() for r in rs if len(r[1]))  # the first full trial's end
    end = max(r[1][-1] for _, rs in runs.values() for r in rs if len(r[1]))
    clock = np.geomspace(first / 2, end, 400)
    for ax, axis, xs, label in ((axes[0], 0, grid, "trial-epochs"), (axes[1], 1, clock / 60, "simulated minutes")):
        for n in shown:
            s, results = runs[n]
            stop = limit(s, budget, horizon) if axis == 0 else min(r[1][-1] for r in results if len(r[1]))
            c = curves(results, grid if axis == 0 else clock, stop, axis)
            line, = ax.plot(xs, np.median(c, 0), label=n, lw=2.2 if n in banded else 1.0)
            if n in banded:
                ax.fill_between(xs, np.percentile(c, 25, 0), np.percentile(c, 75, 0), color=line.get_color(), alpha=0.15)
            # (NaN past a line's end: numpy's median and percentiles of an all-NaN column are NaN, drawn as a gap)
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log"), ax.set_xlim(epochs / 2 if axis == 0 else xs[0], xs[-1])  # the first trials and the tail
        ax.set_xlabel(f"{label} (log scale)"), ax.set_ylabel("normalised hypervolume (seed means)")
        ax.set_ylim(max(0.0, 2 * target - 1.02), 1.005)  # the top: where strategies differ
        ax.grid(alpha=0.3, which="both")
    axes[0].axvline(budget, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Replayed searches on the {name} table: median over replays (quartiles shaded for the thick lines); "
                 f"dotted: random search's median at the default budget (dashed)", fontsize=9)
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"replay-{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def show(result: dict) -> None:
    once, means = result["ceilings"]["every_configuration_one_seed"], result["ceilings"]["every_configuration_seed_means"]
    t = RichTable(title=f"{result['table']}: {result['configurations']} configurations x {result['seeds_recorded']} "
                        f"seeds; budget {result['budget_trial_epochs']} trial-epochs, {result['workers']} workers",
                  caption=f"normalised hypervolume of the reported front on seed means; budget share: of random search's "
                          f"budget, to reach its median ({result['random_final_hv_median']:.3f}); '> x': not reached "
                          f"where that strategy's replays stopped. Ceilings, every "
                          f"configuration run: once {min(once):.3f}–{max(once):.3f}, on seed means {means:.3f}")
    for c in ("strategy", "final HV median [95% CI]", "quartiles", "budget share [95% CI]", "speed-up", "trials (full)"):
        t.add_column(c, justify="left" if c == "strategy" else "right")
    rows = sorted(result["strategies"].items(), key=lambda kv: -kv[1]["final_hv"]["median"])
    for name, s in rows:
        f, share, ci, speed = s["final_hv"], s["budget_share"], s["budget_share_ci"], s["speedup_vs_random"]
        past = s["replayed_to_trial_epochs"] / result["budget_trial_epochs"]  # not reached where the replays stopped
        fmt = lambda x: f"> {past:.2f}" if x is None else f"{x:.2f}"  # noqa: E731
        t.add_row(name, f"{f['median']:.3f} [{f['ci_low']:.3f}, {f['ci_high']:.3f}]", f"{f['q25']:.3f}–{f['q75']:.3f}",
                  f"{fmt(share)} [{fmt(ci[0])}, {fmt(ci[1])}]", "" if speed is None else f"{speed:.2f}×",
                  f"{s['trials_at_budget']:.0f} ({s['full_trials_at_budget']:.0f})")
    Console(width=max(Console().width, 120)).print(t)


def figures(tables=("digits", "synthetic"), seeds: int = 50, workers: int = 4) -> dict:
    """What ``python -m benchmarks --only replay`` records: {"replay": {table: result}}."""
    from .tables import HERE

    out = {}
    with pool() as processes:
        for name in tables:
            if not (HERE / f"{name}.csv.gz").exists():
                Console(stderr=True).print(f"replay: table {name} is not recorded yet (benchmarks/replay/README.md says how)")
                continue
            out[name] = evaluate(name, seeds=seeds, workers=workers, processes=processes)
            show(out[name])
    return {"replay": out}




def run_real(name: str, out: Path, searches: int = 5, first_seed: int = 10) -> list[Path]:
    """``searches`` real searches of table ``name``'s study (search stage only: no confirmation), seeds
    ``first_seed``, ``first_seed + 1``, ...: each a ``kdbench tune`` run into ``out/seed-K`` (one Ray instance)."""
    from kdbench.search import init_ray, run_study

    init_ray(None, verbose=False)
    folders = []
    for k in range(first_seed, first_seed + searches):
        study = dataclasses.replace(replay_study(name), seed=k, name=f"{name}-real-{k}")
        folders.append(out / f"seed-{k}")
        run_study(study, folders[-1], resume=(folders[-1] / "study.json").exists())
    return folders


def check_real(name: str, folders: list[Path], seeds: int = 50) -> dict:
    """Real ``kdbench tune`` searches (search stage) scored as the replay scores its own -- each reported
    configuration looked up at the nearest recorded one -- beside the 5-95 % band of the same strategy (the first
    folder's sampler and ASHA) replayed with the same workers (its concurrency) and the same number of trials."""
    from kdbench.pareto import pareto_mask
    from kdbench.results import read_folder
    from kdbench.study import study_from_dict

    from .strategies import Strategy

    study, table = replay_study(name), load_table(name)
    t = truth(table, study.objectives)
    real = []
    for folder in folders:
        f = read_folder(folder)
        rows = f.trials[f.trials["stage"] == "search"]
        full = rows[(rows["fidelity"] == "full") & (rows["status"] == "completed")]
        observed = full[[f"val_{o}" for o in study.objectives]].to_numpy(float) * t.signs
        configs = [table.nearest(study, r) for r in full[list(table.axes)].to_dict("records")]
        reported = {c for c, keep in zip(configs, pareto_mask(observed)) if keep}
        spent = int(f.epochs["trial_id"].isin(rows["trial_id"]).sum())
        real.append({"folder": str(folder), "final_hv": t.score(reported), "trials": len(rows), "trial_epochs": spent})
    ran = study_from_dict(read_folder(folders[0]).study["study"])
    s = Strategy("real", ran.search.sampler, ran.asha.rank if ran.asha.enabled else "none", ran.asha.grace_period,
                 ran.asha.reduction_factor)
    jobs = [(name, None, s, seed, ran.concurrency, None, ran.search.samples) for seed in range(seeds)]
    replays = run_many(jobs)
    final = np.array([r[2][-1] if len(r[2]) else 0.0 for r in replays])
    band = [float(np.percentile(final, 5)), float(np.percentile(final, 95))]
    for r in real:
        r["inside"] = band[0] <= r["final_hv"] <= band[1]
        # where it falls among the replays (mid-rank): uniform over real searches if the replay's spread is right
        r["replay_percentile"] = float(100 * ((final < r["final_hv"]).mean() + (final == r["final_hv"]).mean() / 2))
    return {"table": name, "strategy": dataclasses.asdict(s), "workers": ran.concurrency, "trials": ran.search.samples,
            "replay_band_5_95": band, "replay_median": float(np.median(final)),
            "replay_trial_epochs_median": float(np.median([r[3][-1] for r in replays])), "replay_seeds": seeds,
            "real": real}
