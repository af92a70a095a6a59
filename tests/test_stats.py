"""Intervals, P(improvement), the front on means, front stability and confirmation candidates,
checked against independent calculations."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from kdbench import stats
from kdbench.metrics import bounds_of
from kdbench.pareto import pareto_ranks
from kdbench.results import config_id


def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653 (tables): 2 ± 4.302653 / sqrt(3) = 2 ± 2.484138.
    lo, hi = stats.mean_ci([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 2.484138, abs=1e-6) and hi == pytest.approx(2 + 2.484138, abs=1e-6)
    # Two values a, b: t_{0.975, 1} = 12.7062; s = |a - b| / sqrt(2), so the half-width is 12.7062 |a - b| / 2.
    lo, hi = stats.mean_ci([3.0, 5.0])
    assert (lo, hi) == (pytest.approx(4 - 12.7062, abs=1e-4), pytest.approx(4 + 12.7062, abs=1e-4))


def test_interval_is_clipped_to_the_metric_range():
    lo, hi = stats.mean_ci([0.99, 0.95, 0.90], bounds=bounds_of("val_geom_corr"))
    assert hi == 1.0 and lo == pytest.approx(0.9467 - 4.302653 * np.std([0.99, 0.95, 0.90], ddof=1) / math.sqrt(3), abs=1e-4)
    assert stats.mean_ci([99.7, 100.0, 98.9], bounds=bounds_of("test_top1"))[1] == 100.0
    assert bounds_of("test_knn_top1") == (0.0, 100.0) and bounds_of("geom_err")[0] == 0.0


def test_two_dimensional_values_give_the_same_intervals_row_by_row():
    v = np.random.default_rng(4).normal(size=(5, 3))
    lo, hi = stats.mean_ci(v)
    assert np.allclose(np.c_[lo, hi], [stats.mean_ci(r) for r in v])


@pytest.mark.parametrize("n", [3, 5, 10])
def test_default_interval_covers_95_percent_at_few_seeds(n):
    """20,000 draws of n values each from known distributions: the share of intervals holding the true mean
    (standard error of a coverage near 0.95: 0.0015). Normal; gamma(4) (skewness 1); and digits-like top-1:
    normal seed noise of 0.6 points (the committed digits runs spread 0.4-0.9) rounded to the 100/359-point
    steps of digits' 359-image test split, whose true mean is the rounded distribution's (from 4M draws)."""
    rng = np.random.default_rng(n)
    step = 100 / 359
    rounded = lambda x: np.round(x / step) * step
    cases = {"normal": (rng.normal(5.0, 2.0, (20_000, n)), 5.0),
             "gamma(4)": (rng.gamma(4.0, 1.0, (20_000, n)), 4.0),
             "digits steps": (rounded(rng.normal(97.0, 0.6, (20_000, n))), rounded(rng.normal(97.0, 0.6, 4_000_000)).mean())}
    for name, (draws, truth) in cases.items():
        lo, hi = stats.mean_ci(draws, bounds=bounds_of("top1") if name == "digits steps" else None)
        coverage = ((lo <= truth) & (truth <= hi)).mean()
        assert 0.92 <= coverage <= 0.98, (name, n, coverage)


def test_percentile_bootstrap_undercovers_at_three_seeds():
    """Why it is not the default: on normal draws it covers ~76% at n = 3 (fewer draws: the bootstrap is slow)."""
    rng = np.random.default_rng(7)
    hits = [lo <= 0 <= hi for lo, hi in (stats.mean_ci(rng.normal(size=3), method="bootstrap", n_resamples=500)
                                         for _ in range(300))]
    assert 0.65 <= np.mean(hits) <= 0.85


def test_bootstrap_interval_of_two_runs_is_their_range():
    # Resampling two values gives means a (1/4), (a+b)/2 (1/2), b (1/4): 2.5th and 97.5th percentiles are a and b.
    assert stats.mean_ci([3.0, 5.0], method="bootstrap") == (3.0, 5.0)


def test_bootstrap_interval_matches_exact_enumeration_of_every_resample():
    """Four values have 4^4 equally likely resamples: their exact percentile interval, computed by brute force."""
    v = np.array([0.0, 1.0, 3.0, 7.0])
    means = np.sort([np.mean(c) for c in itertools.product(v, repeat=4)])
    lo, hi = stats.mean_ci(v, method="bootstrap")
    # The bootstrap's 10,000 draws estimate the exact quantiles; on this discrete distribution they land on
    # the exact atom or its neighbour.
    atoms = np.unique(means)
    exact_lo, exact_hi = np.quantile(means, 0.025), np.quantile(means, 0.975)
    near = lambda x, e: abs(np.searchsorted(atoms, x) - np.searchsorted(atoms, e)) <= 1
    assert near(lo, exact_lo) and near(hi, exact_hi)
    assert stats.mean_ci(v, method="bootstrap") == (lo, hi)  # fixed random state: the same numbers give the same interval


@pytest.mark.parametrize("method", ["t", "bootstrap"])
def test_interval_of_many_normal_runs_matches_the_normal_approximation(method):
    x = np.random.default_rng(3).normal(10.0, 2.0, size=400)
    lo, hi = stats.mean_ci(x, method=method)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)


def test_interval_needs_two_runs_and_is_a_point_without_spread():
    assert all(math.isnan(v) for v in stats.mean_ci([4.0]))
    assert all(math.isnan(v) for v in stats.mean_ci([4.0, math.nan]))
    assert stats.mean_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)
    with pytest.raises(ValueError, match="allowed: t, bootstrap"):
        stats.mean_ci([1.0, 2.0], method="wald")


def test_seeds_for_half_width_inverts_the_t_interval():
    # t_{0.975, 17} / sqrt(18) = 2.1098 / 4.2426 = 0.4973 <= 0.5 < t_{0.975, 16} / sqrt(17) = 2.1199 / 4.1231 = 0.5142
    assert stats.seeds_for_half_width(1.0, 0.5) == 18
    v = np.arange(18.0) / np.arange(18.0).std(ddof=1)  # 18 values with s = 1
    lo, hi = stats.mean_ci(v)
    assert (hi - lo) / 2 == pytest.approx(0.4973, abs=1e-4)
    assert stats.seeds_for_half_width(0.0, 0.5) is None and stats.seeds_for_half_width(1.0, 1e-6) is None


def test_probability_of_improvement_by_hand():
    # Pairs (x, y): 1 beats 0; 2 ties 2 twice (2 x 1/2) and beats 0; 3 beats all three: 1 + 2 + 3 = 6 of 9.
    assert stats.p_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)
    assert stats.p_improvement([5, 6], [1, 2, 3]) == 1.0
    assert stats.p_improvement([1, 2], [1, 2]) == 0.5


def test_probability_of_improvement_is_complementary_and_matches_counting():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 7).astype(float), rng.integers(0, 5, 5).astype(float)
    counted = np.mean([(a > b) + 0.5 * (a == b) for a in x for b in y])
    assert stats.p_improvement(x, y) == pytest.approx(counted)
    assert stats.p_improvement(x, y) + stats.p_improvement(y, x) == pytest.approx(1.0)


def _trials(points, seeds=3, stage="search"):
    """One row per (configuration, seed): val/test objective values = the configuration's point + seed noise."""
    rng = np.random.default_rng(1)
    rows = []
    for i, (a, b) in enumerate(points):
        for s in range(seeds):
            rows.append({"study": "s", "trial_id": f"t{i}-{s}", "config_id": f"c{i}", "stage": stage,
                         "method": "geometry", "seed": s, "status": "completed", "fidelity": "full",
                         "val_top1": a + rng.normal(0, 1), "val_geom_corr": b + rng.normal(0, 0.05),
                         "test_top1": a, "test_geom_corr": b})
    return pd.DataFrame(rows)


def _brute_front(points):
    return [not any((q >= p).all() and (q > p).any() for j, q in enumerate(points) if j != i)
            for i, p in enumerate(points)]


def test_front_on_means_equals_brute_force_over_configuration_means():
    pts = np.random.default_rng(2).uniform([90, 0.6], [99, 0.99], size=(15, 2))
    df = _trials(pts)
    table = stats.summarise(df, ["val_top1", "val_geom_corr", "test_top1"])
    mask, knee = stats.front_on_means(table, ("top1", "geom_corr"))
    means = df.groupby("config_id", sort=False)[["val_top1", "val_geom_corr"]].mean().loc[table["config_id"]]
    assert mask.tolist() == _brute_front(means.to_numpy())
    assert mask[knee]
    # A minimised objective (geom_err) is turned, not ignored.
    flipped = table.assign(val_geom_err_mean=-table["val_geom_corr_mean"])
    assert stats.front_on_means(flipped, ("top1", "geom_err"))[0].tolist() == mask.tolist()


def test_front_stability_counts_search_front_configurations_that_stay_non_dominated():
    # Search (one seed): a and b on the front, c dominated. Confirmed means: a (95, 0.90), b (94, 0.89): b is now
    # dominated by a; the preset k (96, 0.80) is confirmed too. Kept: a only -> 1 of 2.
    rows = [("a", "search", 0, 97, 0.90), ("b", "search", 0, 95, 0.95), ("c", "search", 0, 90, 0.80),
            ("a", "confirm", 1, 95, 0.90), ("a", "confirm", 2, 95, 0.90),
            ("b", "confirm", 1, 94, 0.88), ("b", "confirm", 2, 94, 0.90),
            ("k", "confirm", 1, 96, 0.80), ("k", "confirm", 2, 96, 0.80)]
    df = pd.DataFrame([{"study": "s", "trial_id": f"{c}{st}{s}", "config_id": c, "stage": st, "seed": s,
                        "method": "kd" if c == "k" else "geometry", "status": "completed", "fidelity": "full",
                        "val_top1": t, "val_geom_corr": g} for c, st, s, t, g in rows])
    table = stats.summarise(df, ["val_top1", "val_geom_corr"])
    st = stats.front_stability(df, table, ("top1", "geom_corr"))
    assert (st["kept"], st["of"]) == (1, 2) and st["search_front"] == ["a", "b"] and st["kept_ids"] == ["a"]
    assert stats.front_stability(df[df["stage"] == "search"], table, ("top1", "geom_corr")) is None


def test_confirm_candidates_front_first_knee_first_one_per_configuration():
    # Front: (99, 0.80), (97, 0.90), (90, 0.99); second front: (96, 0.85); a duplicate of the knee's configuration.
    pts = [(99, 0.80), (97, 0.90), (90, 0.99), (96, 0.85), (80, 0.5)]
    df = pd.DataFrame([{"trial_id": f"t{i}", "config_id": f"c{i}", "stage": "search", "status": "completed",
                        "fidelity": "full", "seed": 0, "val_top1": a, "val_geom_corr": b} for i, (a, b) in enumerate(pts)])
    df = pd.concat([df, df.iloc[[1]].assign(trial_id="t9", val_top1=96.5)], ignore_index=True)
    got = stats.confirm_candidates(df, ("top1", "geom_corr"), top=4)["config_id"].tolist()
    assert got[0] == "c1"  # the knee: nearest the utopia corner after scaling
    assert set(got[:3]) == {"c0", "c1", "c2"} and got[3] == "c3"  # then the next front
    assert stats.confirm_candidates(df, ("top1", "geom_corr"), top=1)["config_id"].tolist() == ["c1"]
    assert pareto_ranks(np.array(pts)).tolist() == [0, 0, 0, 1, 2]


def test_pareto_ranks_equal_fronts_peeled_one_at_a_time():
    # A second formulation: the front of what is left, taken again and again (ties and duplicates included).
    from kdbench.pareto import pareto_mask

    rng = np.random.default_rng(0)
    for n, k in ((1, 2), (7, 2), (60, 2), (40, 3)):
        p = rng.integers(0, 5, size=(n, k)).astype(float)
        expected, left, level = np.full(n, -1), np.arange(n), 0
        while len(left):
            expected[left[pareto_mask(p[left])]] = level
            left, level = left[~pareto_mask(p[left])], level + 1
        assert pareto_ranks(p).tolist() == expected.tolist()


def test_config_id_ignores_the_seed_and_names_every_hyperparameter():
    ctx = {"dataset": "digits", "split_seed": 0, "teacher": "cnn_teacher", "student": "cnn_student", "epochs": 30}
    values = {"ce": 0.1, "kd": 0.9, "temperature": 4.0, "geometry": 100.0, "momentum": 0.9, "lr": 0.05, "cc_order": 2}
    a = config_id(ctx, {**values, "seed": 0, "method": "geometry"})
    assert a == config_id(ctx, {**values, "seed": 7, "method": "geometry", "epochs": 12})  # seed, epochs run: same
    assert a == config_id(ctx, {**values, "geometry": 100, "cc_order": 2.0})  # 100 == 100.0 (TOML, CSV, Optuna)
    assert a == config_id(ctx, {**values, "method": "my_name"})  # a renamed preset with the same weights
    others = {config_id(ctx, {**values, k: v * 1.5 + 0.1}) for k, v in values.items()}
    others |= {config_id({**ctx, k: "x"}, values) for k in ctx}
    assert len(others) == len(values) + len(ctx) and a not in others
    assert len(a) == 10 and all(ch in "0123456789abcdef" for ch in a)


def test_data_options_and_a_teacher_checkpoint_enter_the_id_only_when_set():
    """Folders written before [data] and teacher checkpoints existed keep their config ids; a committed search
    still names each of its trials as the study in its study.json does today."""
    from pathlib import Path

    from kdbench.results import read_folder, run_context
    from kdbench.study import study_from_dict
    from kdbench.trial import resolve_trial, row_config, trial_config_id

    study = {"dataset": "digits", "split_seed": 0, "teacher": "t", "teacher_recipe": {"epochs": 30}, "teacher_seed": 0,
             "student": "s", "recipe": {"epochs": 30}}
    old = run_context(study)
    assert set(old) == {"dataset", "split_seed", "teacher", "teacher_recipe", "teacher_seed", "student", "epochs"}
    assert run_context({**study, "data_options": {}, "teacher_checkpoint": ""}) == old
    ckpt = run_context({**study, "teacher_checkpoint": "/t.pt"})
    assert ckpt["teacher_recipe"] is None and ckpt["teacher_seed"] is None  # a file has no recipe
    contexts = (old, run_context({**study, "data_options": {"val_fraction": 0.3}}), ckpt)
    assert len({config_id(c, {"kd": 1.0}) for c in contexts}) == 3
    folder = read_folder(Path(__file__).resolve().parents[1] / "results" / "digits")
    s = study_from_dict(folder.study["study"])
    for row in folder.trials.to_dict("records"):
        assert trial_config_id(s, *resolve_trial(s, row_config(row))[:2]) == row["config_id"]


def _seeded(values):
    """Rows of configurations given as {config: [(val_top1, val_geom_corr) per seed]}."""
    return pd.DataFrame([{"study": "s", "trial_id": f"{c}{i}", "config_id": c, "stage": "grid", "seed": i,
                          "method": "geometry", "status": "completed", "fidelity": "full",
                          "val_top1": t, "val_geom_corr": g} for c, runs in values.items() for i, (t, g) in enumerate(runs)])


def test_p_on_front_is_one_for_a_dominant_configuration_and_matches_an_exact_count():
    # a dominates b whatever seeds are drawn: P(a) = 1, P(b) = 0.
    front = lambda df, r=2000: dict(zip(*(lambda t: (t["config_id"], stats.p_on_front(df, t, ("top1", "geom_corr"),
                                                                                        n_resamples=r)))(
        stats.summarise(df, ["val_top1", "val_geom_corr"]))))
    assert front(_seeded({"a": [(99, 0.99), (98, 0.98)], "b": [(90, 0.80), (91, 0.81)]})) == {"a": 1.0, "b": 0.0}
    # c has two seeds, (90, 0.99) and (99, 0.80), against d fixed at (95, 0.90): c's resampled mean is (90, .99)
    # with p 1/4, (94.5, .895) 1/2 (dominated by d), (99, .80) 1/4; none dominates d. So P(c) = 1/2, P(d) = 1
    # (a bootstrap of 4,000: standard error 0.008).
    p = front(_seeded({"c": [(90, 0.99), (99, 0.80)], "d": [(95, 0.90), (95, 0.90)]}), 4000)
    assert p["d"] == 1.0 and p["c"] == pytest.approx(0.5, abs=0.03)
    # The batched Pareto mask equals the mask of each resample on its own.
    from kdbench.pareto import pareto_mask
    sets = np.random.default_rng(0).normal(size=(6, 9, 2))
    assert pareto_mask(sets).tolist() == [pareto_mask(x).tolist() for x in sets]


def test_unsettled_pairs_name_the_seeds_that_would_separate_them():
    # a (front) and b overlap on both objectives; c is far below: separated.
    df = _seeded({"a": [(97, 0.90), (98, 0.92), (96, 0.91)], "b": [(96.5, 0.89), (97.5, 0.90), (96, 0.91)],
                  "c": [(80, 0.50), (81, 0.51), (80.5, 0.52)]})
    table = stats.summarise(df, ["val_top1", "val_geom_corr"])
    got = stats.unsettled(table, ("top1", "geom_corr"))
    assert [(u["member"], u["rival"]) for u in got] == [("a", "b")]
    u = got[0]
    need = {o: stats.seeds_for_half_width(max(table.set_index("config_id").loc[["a", "b"], f"val_{o}_std"]),
                                          abs(np.diff(table.set_index("config_id").loc[["a", "b"], f"val_{o}_mean"]))[0] / 2)
            for o in ("top1", "geom_corr")}
    assert u["seeds_needed"] == min(need.values()) and u["objective"] == min(need, key=need.get)
