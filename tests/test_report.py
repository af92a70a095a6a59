import math

import numpy as np

import pandas as pd
import pytest

from kdbench import report
from kdbench.results import Folder


def _folder(rows, reference=None, teacher=None):
    study = {"name": "s", "reference": reference or {}, "teacher": teacher}
    return Folder(path=None, study=study, trials=pd.DataFrame(rows), epochs=None)


def _row(tid, method, top1, corr, status="completed", fidelity="full", seed=0, cid=None, stage="grid", val=None):
    val_top1, val_corr = val if val is not None else (top1, corr)
    return {"trial_id": tid, "config_id": cid or method, "stage": stage, "method": method, "seed": seed,
            "status": status, "fidelity": fidelity, "test_top1": top1, "test_geom_corr": corr,
            "val_top1": val_top1, "val_geom_corr": val_corr, "best_test_top1": top1 + 1, "test_geom_err": 0.1,
            "test_cka": 0.5, "test_knn_top1": top1, "params": 1000, "train_seconds": 2.0}


def test_leaderboard_means_stds_intervals_deltas_and_unranked_low_fidelity():
    rows = [_row("a", "baseline", 90, 0.5, seed=0), _row("b", "baseline", 92, 0.7, seed=1),
            _row("c", "geometry", 95, 0.9, seed=0), _row("d", "geometry", 97, 0.95, seed=1),
            _row("e", "geometry", 10, 0.1, status="stopped", fidelity="low", seed=2),
            _row("f", "kd", math.nan, math.nan, status="failed", fidelity="low")]
    f = _folder(rows, reference={"geometry": 75.81},
                teacher={"arch": "big", "test_top1": 99.0, "best_test_top1": 99.5, "params": 5000})
    df = report.trials_frame([f])
    lb = report.leaderboard(df, [f], ("method",))
    g = lb[lb["method"] == "geometry"].iloc[0]
    assert g["n"] == 2 and g["n_seeds"] == 2 and g["n_low"] == 1 and g["rank"] == 1
    assert g["test_top1_mean"] == pytest.approx(96.0) and g["test_top1_std"] == pytest.approx(math.sqrt(2))  # ddof=1
    # Two runs: Student-t, 96 ± t_{0.975, 1} · sqrt(2) / sqrt(2) = 96 ± 12.7062, clipped to top-1's 100.
    assert g["test_top1_ci_low"] == pytest.approx(96 - 12.7062, abs=1e-4) and g["test_top1_ci_high"] == 100.0
    # The percentile bootstrap, asked for: its means are 95 (1/4), 96 (1/2), 97 (1/4): the interval is [95, 97].
    b = report.leaderboard(df, [f], ("method",), interval="bootstrap").set_index("method").loc["geometry"]
    assert (b["test_top1_ci_low"], b["test_top1_ci_high"]) == (95.0, 97.0)
    assert g["delta_top1"] == pytest.approx(96 - 91) and g["delta_geom_corr"] == pytest.approx(0.925 - 0.6)
    assert g["p_improve_top1_vs_baseline"] == 1.0  # 95 and 97 beat 90 and 92 in all four pairs
    assert g["reported_top1"] == pytest.approx(75.81)
    kd = lb[lb["method"] == "kd"].iloc[0]
    assert kd["n"] == 0 and kd["n_failed"] == 1 and math.isnan(kd["rank"])  # counted, never ranked
    teacher = lb[lb["method"] == "teacher (big)"].iloc[0]
    assert teacher["test_top1_mean"] == 99.0 and math.isnan(teacher["rank"])
    md = report.to_markdown(lb, ("method",))
    assert "96.00 ± 1.41 [83.29, 100.00]" in md and "+5.00" in md and "t-CI" in md


def test_single_seed_configurations_rank_after_those_with_intervals_and_say_so():
    rows = [_row("a", "baseline", 90, 0.5, seed=1, stage="confirm"), _row("b", "baseline", 91, 0.6, seed=2, stage="confirm"),
            _row("c", "geometry", 99, 0.9, cid="lucky", stage="search")]
    f = _folder(rows)
    lb = report.leaderboard(report.trials_frame([f]), [f])
    assert lb["config_id"].tolist() == ["baseline", "lucky"]  # 99 % on one seed ranks second
    md = report.to_markdown(lb, ("config",))
    assert "99.00 (1 seed)" in md and "90.50 ± 0.71 [84.15, 96.85]" in md  # 90.5 ± 12.7062 · 0.5


def test_confirmed_configuration_rests_on_its_confirmation_seeds_only():
    """The search seed chose the configuration (winner's curse): once confirmed, it is left out."""
    rows = [_row("s", "geometry", 99.0, 0.99, cid="x", stage="search", seed=0),
            _row("c1", "geometry", 95.0, 0.90, cid="x", stage="confirm", seed=1),
            _row("c2", "geometry", 96.0, 0.92, cid="x", stage="confirm", seed=2)]
    f = _folder(rows)
    lb = report.leaderboard(report.trials_frame([f]), [f])
    r = lb[lb["config_id"] == "x"].iloc[0]
    assert r["n_seeds"] == 2 and r["seeds"] == "1 2" and r["test_top1_mean"] == pytest.approx(95.5)
    assert r["stage"] == "confirm"


def test_front_is_on_configuration_means_of_validation_with_baseline_reference():
    # Configuration means (val): baseline (91, 0.6), p (96, 0.9), q (97, 0.6), r (94, 0.8): dominated by p.
    rows = [_row("a", "baseline", 90, 0.5, seed=0), _row("b", "baseline", 92, 0.7, seed=1),
            _row("c", "geometry", 50, 0.1, cid="p", seed=0, val=(95, 0.85)),
            _row("d", "geometry", 50, 0.1, cid="p", seed=1, val=(97, 0.95)),
            _row("e", "kd", 99, 0.99, cid="q", val=(97, 0.6)),
            _row("g", "geometry", 99, 0.99, cid="r", val=(94, 0.8)),
            _row("h", "geometry", 99, 0.99, cid="s", status="stopped", fidelity="low", val=(99, 0.99))]
    fr = report.front(report.trials_frame([_folder(rows)]))
    assert sorted(fr.rows["config_id"]) == ["p", "q"]  # s dominates both but is low fidelity; test values play no part
    assert fr.reference_point == (91.0, 0.6) and fr.reference_source.startswith("baseline mean")
    # Staircase above (91, 0.6): (97-91)*(0.6-0.6) + (96-91)*(0.9-0.6) = 1.5
    assert fr.hypervolume == pytest.approx(1.5)
    assert fr.rows.set_index("config_id").loc["p", "test_top1_mean"] == 50  # test means are reported beside


def test_empty_study_gives_an_empty_front():
    fr = report.front(report.trials_frame([_folder([])]))
    assert fr.rows.empty and fr.hypervolume == 0.0 and fr.knee is None


def test_hex_ids_that_look_like_numbers_stay_text(tmp_path):
    """A trial_id, config_id or node made of digits only (hex can be) is read back as the same text."""
    import pandas as pd

    from kdbench.results import read_table

    pd.DataFrame({"trial_id": ["00123456"], "config_id": ["0123456789"], "node": ["000000000012"],
                  "val_top1": [1.5]}).to_csv(tmp_path / "t.csv", index=False)
    t = read_table(tmp_path / "t.csv")
    assert t.loc[0, ["trial_id", "config_id", "node"]].tolist() == ["00123456", "0123456789", "000000000012"]
    assert t["val_top1"].dtype.kind == "f"


def test_importances_fall_back_to_the_deepest_epoch_enough_trials_reached(tmp_path):
    """Two completed trials (too few), eight that reached epoch 2: fANOVA at epoch 2, where val_top1 depends on x
    only and val_geom_corr on y only (an independent expectation: each objective's importance goes to its own)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", directions=["maximize"] * 2)
    rng = np.random.default_rng(0)
    xs, ys = rng.uniform(0, 1, 10), rng.uniform(0, 1, 10)
    trials = pd.DataFrame([{"trial_id": f"t{i}", "config_id": f"c{i}", "stage": "search", "status": "completed" if i < 2
                            else "stopped", "fidelity": "full" if i < 2 else "low", "method": "geometry", "seed": 0,
                            "x": xs[i], "y": ys[i]} for i in range(10)])
    epochs = pd.DataFrame([{"trial_id": f"t{i}", "epoch": e, "val_top1": 10 * xs[i] + e, "val_geom_corr": ys[i]}
                           for i in range(10) for e in ((1, 2, 3, 4) if i < 2 else (1, 2))])
    space = [{"name": "x", "type": "uniform", "low": 0.0, "high": 1.0, "choices": [], "when": []},
             {"name": "y", "type": "uniform", "low": 0.0, "high": 1.0, "choices": [], "when": []}]
    f = Folder(tmp_path, {"name": "s", "study": {"search": {"space": space, "objectives": ["top1", "geom_corr"]},
                                                   "recipe": {"epochs": 4}}}, trials, epochs)
    imp, note = report.importances(f)
    assert "10 trials at epoch 2 of 4" in note and set(imp["epoch"]) == {2}, note  # json and csv say the epoch too
    got = {(r["objective"], r["param"]): r["importance"] for r in imp.to_dict("records")}
    assert got[("val_top1", "x")] > 0.7 > got[("val_top1", "y")]  # fANOVA's forest on 10 points: not exactly 1
    assert got[("val_geom_corr", "y")] > 0.7 > got[("val_geom_corr", "x")]


def test_the_front_plot_has_a_colour_for_every_method_of_a_twenty_method_zoo(tmp_path):
    """(A plot of more than ten methods once ran out of colours and failed after every trial had finished.)"""
    from kdbench.plots import plot_front

    rows = [_row(f"{m}{s}", f"m{m}", 90 + m * 0.3 + s * 0.1, 0.5 + m * 0.02, seed=s, cid=f"c{m}")
            for m in range(20) for s in range(2)]
    f = _folder(rows)
    df = report.trials_frame([f])
    plot_front(df, report.front(df), [f], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
