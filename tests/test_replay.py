"""The search replay (benchmarks/replay): its clock and event order by hand, the nearest-configuration map, its
ASHA decisions against the scheduler class fed the same reports, the normalised hypervolume against a count,
and the committed tables."""

import dataclasses

import numpy as np
import optuna
import pytest
from ray.tune.experiment import Trial

from benchmarks.replay.score import Truth, anytime, at, reach
from benchmarks.replay.simulate import Ran, replay
from benchmarks.replay.strategies import Strategy, one, pool, run_many, strategies, sweep
from benchmarks.replay.tables import TABLES, HERE, Table, load_table, replay_study
from kdbench.search.schedulers import ParetoASHA


class InOrder(optuna.samplers.BaseSampler):
    """A real Optuna sampler that proposes the given configurations in turn, and remembers its study."""

    def __init__(self, configs):
        self.configs, self.study = configs, None

    def before_trial(self, study, trial):
        self.study = study

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        return self.configs[trial.number % len(self.configs)][name]


def _study(epochs: int, asha: str = "none", grace: int = 1, eta: int = 2):
    s = replay_study("digits")
    s = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=epochs))
    return Strategy("t", "random", asha, grace, eta).study(s, 0)


def _table(seconds, val) -> Table:
    seconds, val = np.asarray(seconds, float), np.asarray(val, float)
    n = len(seconds)
    values = np.array([[10.0 ** (i % 3), 1.0 + 7.0 * i / (n - 1), 0.9 * i / (n - 1)] for i in range(n)])
    return Table("hand", ("geometry", "temperature", "momentum"), values, tuple(range(seconds.shape[1])),
                 ("top1", "geom_corr"), val, seconds, val[:, :, -1, :])


def _in_order(table, order):
    return InOrder([dict(zip(table.axes, table.values[i])) for i in order])


def test_two_workers_run_three_configurations_on_the_clock_worked_out_by_hand():
    # Epochs take 1 s for configuration 0, 2 s for 1, 0.5 s for 2; 3 epochs; a budget of 9 trial-epochs.
    val = np.array([[[[10 * c + e, e / 10] for e in (1, 2, 3)]] for c in range(3)])
    table = _table([[[1, 1, 1]], [[2, 2, 2]], [[0.5, 0.5, 0.5]]], val)
    sampler = _in_order(table, [0, 1, 2, 0])
    ran = replay(table, _study(3), sampler, seed=0, workers=2, budget=9)
    # t=0: A (0) and B (1) start. A's epochs end at 1, 2, 3; B's first at 2, after A's second (A started first).
    # A ends at 3 (4 trial-epochs spent): C (2) starts; its epochs end at 3.5, 4, 4.5, B's second at 4 too (B
    # first). C ends at 4.5 (8 spent): D (0) starts; its first epoch ends at 5.5, the 9th trial-epoch: the budget
    # is spent, and B's last epoch (at 6) never comes.
    assert ran == [Ran(0, 0, 0.0, 3.0, 3, 4, (3.0, 0.3)), Ran(2, 0, 3.0, 4.5, 3, 8, (23.0, 0.3))]
    trials = sampler.study.trials  # told as Tune tells kdbench's searcher
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "COMPLETE", "RUNNING"]
    assert trials[0].values == [3.0, 0.3] and trials[2].values == [23.0, 0.3]


def test_a_proposal_runs_as_the_nearest_recorded_configuration_in_normalised_coordinates():
    study = replay_study("digits")  # geometry log-uniform [1, 1000], temperature [1, 8], momentum [0, 0.99]
    values = np.array([[1.0, 1.0, 0.0], [1000.0, 8.0, 0.99], [31.6227766, 4.5, 0.495], [100.0, 1.0, 0.0]])
    table = Table("t", ("geometry", "temperature", "momentum"), values, (0,), ("top1",), np.zeros((4, 1, 1, 1)),
                  np.zeros((4, 1, 1)), np.zeros((4, 1, 1)))
    assert np.allclose(table.unit(study, values), [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [2 / 3, 0, 0]])
    near = lambda g, t, m: table.nearest(study, {"geometry": g, "temperature": t, "momentum": m})  # noqa: E731
    assert near(1.0, 1.0, 0.0) == 0 and near(900.0, 7.9, 0.9) == 1 and near(30.0, 4.0, 0.5) == 2
    # Log axes in log: geometry 40 lies nearer 10 than 100 on a linear axis, nearer 100 in log (1.60 vs 1, 2).
    two = Table("t", table.axes, np.array([[10.0, 4.0, 0.5], [100.0, 4.0, 0.5]]), (0,), ("top1",),
                np.zeros((2, 1, 1, 1)), np.zeros((2, 1, 1)), np.zeros((2, 1, 1)))
    assert two.nearest(study, {"geometry": 40.0, "temperature": 4.0, "momentum": 0.5}) == 1
    assert two.nearest(study, {"geometry": 30.0, "temperature": 4.0, "momentum": 0.5}) == 0


def test_the_replays_asha_stops_exactly_what_the_scheduler_class_stops_on_the_same_reports():
    rng = np.random.default_rng(3)
    c, epochs = 12, 8
    val = np.cumsum(rng.random((c, 2, epochs, 2)), axis=2) / np.arange(1, epochs + 1)[:, None]
    seconds = 0.5 + rng.random((c, 2, epochs))
    table = _table(seconds, val)
    study = _study(epochs, "pareto", grace=1, eta=2)
    trace = []
    ran = replay(table, study, _in_order(table, list(range(c))), seed=1, workers=3, budget=60, trace=trace)
    stopped = [r for r in ran if not r.full]
    assert stopped and any(r.full for r in ran)
    asha = ParetoASHA(time_attr="epoch", metrics=["val_top1", "val_geom_corr"], modes=["max", "max"], max_t=epochs,
                      grace_period=1, reduction_factor=2)
    trials = {}
    for trial_id, result, decision in trace:
        if trial_id not in trials:
            trials[trial_id] = Trial("replay", stub=True, trial_id=trial_id)
            asha.on_trial_add(None, trials[trial_id])
        expected = asha.on_trial_result(None, trials[trial_id], result)
        assert decision == expected or result["epoch"] == epochs, (trial_id, result, decision, expected)
        if decision == "STOP":
            asha.on_trial_complete(None, trials[trial_id], result)
    assert sum(d == "STOP" and r["epoch"] < epochs for _, r, d in trace) == len(stopped)


def test_the_normalised_hypervolume_against_a_count_of_dominated_cells():
    rng = np.random.default_rng(0)
    test = rng.random((30, 3, 2))
    table = Table("t", ("geometry",), np.ones((30, 1)), (0, 1, 2), ("top1", "geom_corr"), np.zeros((30, 3, 1, 2)),
                  np.zeros((30, 3, 1)), test)
    t = Truth(table, ("top1", "geom_corr"))
    means = test.mean(1)
    lo, hi = np.array(t.reference), means.max(0)
    assert np.allclose(lo, means.min(0) - 0.1 * (hi - means.min(0)))
    n = 800
    xs = lo[0] + (np.arange(n) + 0.5) / n * (hi[0] - lo[0])
    ys = lo[1] + (np.arange(n) + 0.5) / n * (hi[1] - lo[1])
    X, Y = np.meshgrid(xs, ys)

    def cells(idx):
        m = means[idx]
        return ((m[:, 0][:, None, None] >= X) & (m[:, 1][:, None, None] >= Y)).any(0).sum()

    for chosen in ([0, 1, 2], list(range(10, 30)), [5]):
        assert abs(t.score(chosen) - cells(chosen) / cells(list(range(30)))) < 0.01
    assert t.score(list(range(30))) == pytest.approx(1.0)


def test_anytime_scores_the_front_of_observed_values_and_reach_reads_the_median():
    table = Table("t", ("geometry",), np.ones((3, 1)), (0, 1), ("top1", "geom_corr"), np.zeros((3, 2, 1, 2)),
                  np.zeros((3, 2, 1)), np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]], [[0.5, 0.5], [0.5, 0.5]]], float))
    t = Truth(table, ("top1", "geom_corr"))
    # Means (1, 0), (0, 1), (0.5, 0.5): reference (-0.1, -0.1); the whole front's area 0.11 + 0.30 + 0.05 = 0.46.
    assert np.allclose(t.reference, (-0.1, -0.1)) and t.perfect == pytest.approx(0.46)
    # Configuration 2, observed on a lucky seed, dominates configuration 0's observation: 2 alone is reported.
    ran = [Ran(0, 0, 0, 1, 1, 5, (0.8, 0.1)), Ran(2, 1, 0, 2, 1, 9, (0.9, 0.6)), Ran(1, 0, 0, 3, 1, 12, (0.1, 0.9))]
    spent, clock, hv = anytime(ran, t)
    assert spent.tolist() == [5, 9, 12] and clock.tolist() == [1, 2, 3]
    assert np.allclose(hv, [0.11 / 0.46, 0.36 / 0.46, 0.41 / 0.46])
    grid = np.arange(0, 15)
    assert at(spent, hv, grid)[[0, 4, 5, 8, 9, 14]] == pytest.approx([0, 0, 0.11 / 0.46, 0.11 / 0.46, 0.36 / 0.46,
                                                                       0.41 / 0.46])
    curves = np.array([at(spent, hv, grid), at(spent + 2, hv, grid), at(spent + 4, hv, grid)])
    # The median reaches 0.5 when two of the three have (at 9, 11, 13), 0.85 at 14 (12, 14, 16); never 0.9.
    assert reach(curves, grid, 0.5) == 11 and reach(curves, grid, 0.85) == 14 and reach(curves, grid, 0.9) == np.inf


def test_strategies_name_the_default_once_and_cover_the_samplers():
    names = [s.name for s in strategies(replay_study("digits"))]
    assert names[0] == "default" and "tpe+pareto" not in names  # the bundled default is TPE + two-objective ASHA
    assert {"random", "random+pareto", "tpe", "tpe+top1", "tpe-noliar+pareto", "nsga2", "qmc", "gp"} <= set(names)


def test_the_sweep_leaves_out_a_grace_period_with_no_rung():
    assert [(s.grace, s.eta) for s in sweep(replay_study("digits"), "qmc")][::3] == [(3, 2), (6, 2), (10, 2)]
    assert {s.grace for s in sweep(replay_study("synthetic"), "tpe")} == {3, 6}  # 10 epochs: grace 10 stops nothing


def test_many_replays_on_a_pool_come_back_in_the_order_asked_and_equal_one_at_a_time(ray_session):
    """The pool runs the Gaussian process's jobs first; the answers still line up with the jobs. With Ray running in
    this process (as in the xdist worker that holds the tests' Ray): a forked pool worker hung there for good."""
    random, gp = (Strategy(n, n, "none") for n in ("random", "gp"))
    jobs = [("synthetic", None, random, 0, 4, 30), ("synthetic", None, gp, 1, 4, 30), ("synthetic", None, random, 2, 4, 30)]
    with pool(1) as workers:
        many = run_many(jobs, workers)
    for job, got in zip(jobs, many):
        for a, b in zip(one(job), got):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(many[0][2], many[2][2]) or not np.array_equal(many[0][3], many[2][3])


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_committed_table_is_whole(name):
    if not (HERE / f"{name}.csv.gz").exists():
        pytest.skip(f"benchmarks/replay/tables/{name}.csv.gz is not recorded yet")
    t = load_table(name)
    spec, study = TABLES[name], replay_study(name)
    assert t.val.shape == (spec["configs"], len(spec["seeds"]), study.max_epochs, len(t.metrics))
    assert np.isfinite(t.val).all() and (t.seconds > 0).all() and np.isfinite(t.test).all()
    assert {"top1", "geom_corr"} <= set(t.metrics) and t.axes == tuple(p.name for p in study.space)


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "qmc", "random"])
def test_every_sampler_proposes_inside_the_space_through_the_searcher_quietly(name, capfd, recwarn):
    from kdbench.search.searcher import make_sampler, searcher_of

    study = Strategy("s", name, "none").study(replay_study("digits"), 3)
    searcher = searcher_of(study, make_sampler(study))
    searcher.set_search_properties(None, None, {})
    rng = np.random.default_rng(0)
    for i in range(12):  # past the model-based samplers' 10 start-up trials
        config = searcher.suggest(f"t{i}")
        assert 1 <= config["geometry"] <= 1000 and 1 <= config["temperature"] <= 8 and 0 <= config["momentum"] <= 0.99
        searcher.on_trial_complete(f"t{i}", {"epoch": study.max_epochs, "val_top1": float(rng.random()),
                                             "val_geom_corr": float(rng.random())})
    err = capfd.readouterr().err
    assert "Warning" not in err and "[W " not in err, err
    assert not [w for w in recwarn if "optuna" in str(w.filename) or "ray" in str(w.filename)], [str(w.message) for w in recwarn]


def test_a_table_file_loads_into_arrays_by_configuration_seed_and_epoch(tmp_path):
    rows = ["config,seed,epoch,geometry,temperature,epoch_seconds,val_top1,val_geom_corr,test_top1,test_geom_corr"]
    for c in (1, 0):  # out of order on purpose
        for s in (0, 1):
            for e in (1, 2, 3):
                last = f"{50 + c + s},{0.5 + s / 10}" if e == 3 else ","
                rows.append(f"{c},{s},{e},{10 ** c},{c + 1},{0.1 * e},{10 * c + e + s},{e / 10},{last}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    t = load_table("t", tmp_path / "t.csv")
    assert t.axes == ("geometry", "temperature") and t.metrics == ("top1", "geom_corr") and t.seeds == (0, 1)
    assert t.values.tolist() == [[1, 1], [10, 2]] and t.epochs == 3
    assert t.val[1, 1, :, 0].tolist() == [12, 13, 14] and t.val[0, 0, :, 1].tolist() == [0.1, 0.2, 0.3]
    assert t.seconds[0, 1].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert t.test[:, :, 0].tolist() == [[50, 51], [51, 52]] and t.test[1, 1, 1] == 0.6
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ValueError, match="11 rows; a full table has 12"):
        load_table("short", tmp_path / "short.csv")
