"""Intervals, P(improvement), the front on means, front stability and confirmation candidates,
checked against independent calculations."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from kdbench import stats
from kdbench.pareto import pareto_ranks
from kdbench.results import config_id


def test_interval_of_two_runs_is_their_range():
    # Resampling two values gives means a (1/4), (a+b)/2 (1/2), b (1/4): 2.5th and 97.5th percentiles are a and b.
    assert stats.mean_ci([3.0, 5.0]) == (3.0, 5.0)


def test_interval_matches_exact_enumeration_of_every_resample():
    """Four values have 4^4 equally likely resamples: their exact percentile interval, computed by brute force."""
    v = np.array([0.0, 1.0, 3.0, 7.0])
    means = np.sort([np.mean(c) for c in itertools.product(v, repeat=4)])
    lo, hi = stats.mean_ci(v)
    # The bootstrap's 10,000 draws estimate the exact quantiles; on this discrete distribution they land on
    # the exact atom or its neighbour.
    atoms = np.unique(means)
    exact_lo, exact_hi = np.quantile(means, 0.025), np.quantile(means, 0.975)
    near = lambda x, e: abs(np.searchsorted(atoms, x) - np.searchsorted(atoms, e)) <= 1
    assert near(lo, exact_lo) and near(hi, exact_hi)
    assert stats.mean_ci(v) == (lo, hi)  # fixed random state: the same numbers give the same interval


def test_interval_of_many_normal_runs_matches_the_normal_approximation():
    x = np.random.default_rng(3).normal(10.0, 2.0, size=400)
    lo, hi = stats.mean_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.03) and hi == pytest.approx(x.mean() + half, abs=0.03)


def test_interval_needs_two_runs_and_is_a_point_without_spread():
    assert all(math.isnan(v) for v in stats.mean_ci([4.0]))
    assert all(math.isnan(v) for v in stats.mean_ci([4.0, math.nan]))
    assert stats.mean_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)


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
