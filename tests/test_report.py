import math

import pandas as pd
import pytest

from kdbench import report
from kdbench.results import Folder


def _folder(rows, reference=None, teacher=None):
    study = {"name": "s", "reference": reference or {}, "teacher": teacher}
    return Folder(path=None, study=study, trials=pd.DataFrame(rows), epochs=None)


def _row(tid, method, top1, corr, status="completed", fidelity="full", seed=0):
    return {"trial_id": tid, "method": method, "seed": seed, "status": status, "fidelity": fidelity,
            "test_top1": top1, "test_geom_corr": corr, "best_test_top1": top1 + 1, "test_geom_err": 0.1,
            "test_cka": 0.5, "test_knn_top1": top1, "params": 1000, "train_seconds": 2.0}


def test_leaderboard_means_stds_deltas_and_unranked_low_fidelity():
    rows = [_row("a", "baseline", 90, 0.5), _row("b", "baseline", 92, 0.7),
            _row("c", "geometry", 95, 0.9), _row("d", "geometry", 97, 0.95),
            _row("e", "geometry", 10, 0.1, status="stopped", fidelity="low"),
            _row("f", "kd", math.nan, math.nan, status="failed", fidelity="low")]
    f = _folder(rows, reference={"geometry": 75.81},
                teacher={"arch": "big", "test_top1": 99.0, "best_test_top1": 99.5, "params": 5000})
    df = report.trials_frame([f])
    lb = report.leaderboard(df, [f])
    g = lb[lb["method"] == "geometry"].iloc[0]
    assert g["n"] == 2 and g["n_low"] == 1 and g["rank"] == 1
    assert g["top1_mean"] == pytest.approx(96.0) and g["top1_std"] == pytest.approx(math.sqrt(2))  # ddof=1
    assert g["delta_top1"] == pytest.approx(96 - 91) and g["delta_geom_corr"] == pytest.approx(0.925 - 0.6)
    assert g["reported_top1"] == pytest.approx(75.81)
    kd = lb[lb["method"] == "kd"].iloc[0]
    assert kd["n"] == 0 and kd["n_failed"] == 1 and math.isnan(kd["rank"])  # counted, never ranked
    teacher = lb[lb["method"] == "teacher (big)"].iloc[0]
    assert teacher["top1_mean"] == 99.0 and math.isnan(teacher["rank"])
    md = report.to_markdown(lb, ("method",))
    assert "96.00 ± 1.41" in md and "+5.00" in md


def test_front_uses_full_fidelity_only_and_baseline_reference():
    rows = [_row("a", "baseline", 90, 0.5), _row("b", "baseline", 92, 0.7), _row("c", "geometry", 95, 0.9),
            _row("d", "kd", 97, 0.6), _row("e", "geometry", 99, 0.99, status="stopped", fidelity="low")]
    fr = report.front(report.trials_frame([_folder(rows)]))
    assert sorted(fr.rows["trial_id"]) == ["c", "d"]  # e dominates both but is low fidelity
    assert fr.reference_point == (91.0, 0.6) and fr.reference_source == "baseline mean"
    # Staircase above (91, 0.6): (97-91)*(0.6-0.6) + (95-91)*(0.9-0.6) = 1.2
    assert fr.hypervolume == pytest.approx(1.2)
    assert fr.best["test_top1"]["trial_id"] == "d" and fr.best["test_geom_corr"]["trial_id"] == "c"


def test_empty_study_gives_an_empty_front():
    fr = report.front(report.trials_frame([_folder([])]))
    assert fr.rows.empty and fr.hypervolume == 0.0 and fr.knee is None
