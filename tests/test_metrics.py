"""One contract over every registered metric (kdbench.metrics.METRICS): computed on a split's outputs it is finite
and inside its bounds, the teacher's own outputs score it at its best where it compares with the teacher, and its
direction is the one fronts, Optuna and both ASHA rules follow."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdbench import stats
from kdbench.measure import SplitOutputs
from kdbench.metrics import METRICS, bounds_of, direction, metric_of_column, mode, sign
from kdbench.search.schedulers import ParetoASHA


def _outputs(same_as_teacher: bool = False) -> SplitOutputs:
    """120 samples of 6 classes: class-dependent features, a teacher's, and a training reference."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 3
    y = torch.arange(120) % 6
    f = centres[y] + torch.randn(120, 16, generator=g)
    t = f.clone() if same_as_teacher else centres[y] @ torch.randn(16, 24, generator=g) + torch.randn(120, 24, generator=g)
    ref_y = torch.arange(300) % 6
    ref = centres[ref_y] + torch.randn(300, 16, generator=g)
    from kdbench.geometry import class_centroids, similarity_matrix

    return SplitOutputs(f, f @ centres.T, y, 6, teacher_features=t,
                        teacher_similarity=similarity_matrix(class_centroids(t, y, 6)),
                        reference_features=ref, reference_labels=ref_y)


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_is_finite_and_within_its_bounds(name):
    m = METRICS[name]
    value = float(m.compute(_outputs()))
    lo, hi = m.bounds
    assert math.isfinite(value) and lo <= value <= hi, (name, value)
    assert metric_of_column(f"val_{name}") is m and bounds_of(f"test_{name}") == m.bounds
    assert m.show(value) and (m.unit == "" or m.show(value).endswith(m.unit))


@pytest.mark.parametrize("name", [n for n, m in METRICS.items() if m.teacher])
def test_a_student_equal_to_its_teacher_scores_a_teacher_metric_at_its_best(name):
    m = METRICS[name]
    best = m.bounds[1] if m.maximise else m.bounds[0]
    assert float(m.compute(_outputs(same_as_teacher=True))) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name", list(METRICS))
def test_fronts_optuna_and_both_asha_rules_follow_every_metrics_direction(name):
    m = METRICS[name]
    good, bad = (0.9, 0.1) if m.maximise else (0.1, 0.9)  # "good" is better in the metric's own direction
    assert (mode(name), direction(name), sign(name)) == (("max", "maximize", 1.0) if m.maximise else
                                                         ("min", "minimize", -1.0))
    # the front on means: two configurations equal on top-1, apart on this metric -> the better one alone
    objectives = ("top1", name) if name != "top1" else ("geom_corr", "top1")
    table = pd.DataFrame({f"val_{objectives[0]}_mean": [50.0, 50.0], f"val_{objectives[1]}_mean": [bad, good]})
    mask, knee = stats.front_on_means(table, objectives)
    assert mask.tolist() == [False, True] and knee == 1
    # two-objective ASHA: at a rung of factor 2 the worse trial stops, the better continues
    asha = ParetoASHA(time_attr="epoch", metrics=[f"val_{o}" for o in objectives], modes=[mode(o) for o in objectives],
                      max_t=4, grace_period=1, reduction_factor=2)
    vector = lambda v: asha._vector({f"val_{objectives[0]}": 50.0, f"val_{objectives[1]}": v})
    assert asha.decide("good", 1, vector(good)) == "CONTINUE" and asha.decide("bad", 1, vector(bad)) == "STOP"
    turned = stats.oriented(np.array([[good], [bad]]), [name])[:, 0]  # every column maximised: the good one higher
    assert turned[0] > turned[1]
