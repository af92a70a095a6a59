"""The metric registry: every measure kdbench takes of a student on a split, each once, with what the rest of
kdbench needs to know of it.

A :class:`Metric` says how to compute it from one split's outputs (:class:`kdbench.evaluation.SplitOutputs`),
whether it is maximised, the range its values cannot leave, how it is shown, and when a run computes it: at every
evaluated epoch, or only at the end (``final``: the measures that need a pass over the training split, computed at
every epoch only where a search's objective needs them). Objectives, ASHA's modes, fronts, the writer's "best"
columns, importances, intervals, the console and the pictures all read :data:`METRICS`; nothing else names a metric.

A new metric: its function (beside its kin, e.g. :mod:`kdbench.geometry`) and its entry here. Each entry becomes
the ``val_<name>`` and ``test_<name>`` columns of trials.csv and epochs.csv, an allowed ``[search] objectives``
name, a row of ``kdbench train``'s table and a column ``kdbench compare`` can rank.

This module imports no torch: reports read it without paying for it (the functions import what they compute with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["Metric", "METRICS", "FINAL", "DEFAULT_OBJECTIVES", "SPLITS", "COST", "metric", "metric_of_column", "bounds_of", "columns",
           "sign", "mode", "direction", "better"]

SPLITS = ("val", "test")


@dataclass(frozen=True)
class Metric:
    """One measure of a student on a split.

    Args:
        name: the column suffix (``val_<name>``, ``test_<name>``) and the objective's name.
        doc: one line: what it measures, where it comes from.
        compute: ``compute(outputs) -> float`` over one split's :class:`~kdbench.evaluation.SplitOutputs`.
        maximise: larger is better (False: smaller is, e.g. an error).
        bounds: the range no value (hence no mean, no interval) can leave.
        fmt: how the console shows a value.
        unit: shown after the value (``%`` for accuracies).
        teacher: needs the teacher's view of the split (its features and centroid geometry).
        final: needs the training split's features as a reference (kNN, retrieval) or a clustering: computed at
            the last epoch, and at every evaluated epoch only where a search objective needs it.
    """

    name: str
    doc: str
    compute: Callable
    maximise: bool = True
    bounds: tuple[float, float] = (-math.inf, math.inf)
    fmt: str = "{:.4f}"
    unit: str = ""
    teacher: bool = False
    final: bool = False

    def show(self, value: float) -> str:
        """``value`` as the console prints it (e.g. ``93.12 %``)."""
        return self.fmt.format(value) + (f" {self.unit}" if self.unit else "")


def _top1(o) -> float:
    return float((o.logits.argmax(1) == o.labels).float().mean() * 100)


def _geom_corr(o) -> float:
    from .geometry import geometry_corr

    return geometry_corr(o.similarity, o.teacher_similarity)


def _geom_err(o) -> float:
    from .geometry import geom_err

    return geom_err(o.similarity, o.teacher_similarity)


def _cka(o) -> float:
    from .geometry import linear_cka

    return linear_cka(o.features, o.teacher_features)


def _knn_top1(o) -> float:
    from .geometry import knn_top1

    return knn_top1(o.reference_features, o.reference_labels, o.features, o.labels, o.num_classes)


# In the order of every table's columns. Bounds: what metric_bounds gave before the registry, so that every
# committed interval is the same (retrieval and clustering scores are left unbounded, as they were).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("top1", "top-1 accuracy of the logits (%)", _top1, bounds=(0.0, 100.0), fmt="{:.2f}", unit="%"),
    Metric("geom_corr", "Pearson correlation of the student's and teacher's class-centroid similarity matrices "
                        "(strict upper triangles; 1: the same geometry)", _geom_corr, bounds=(-1.0, 1.0), teacher=True),
    Metric("geom_err", "relative Frobenius error of the student's centroid similarity matrix against the teacher's",
           _geom_err, maximise=False, bounds=(0.0, math.inf), teacher=True),
    Metric("cka", "linear CKA of the student's and teacher's features (Kornblith et al., 2019)", _cka,
           bounds=(0.0, 1.0), teacher=True),
    Metric("knn_top1", "top-1 (%) of a 10-nearest-neighbour cosine vote against the training split's features",
           _knn_top1, bounds=(0.0, 100.0), fmt="{:.2f}", unit="%", final=True),
    Metric("map_at_r", "mean average precision at R of retrieval against the training split (Musgrave et al., 2020)",
           lambda o: o.retrieval["map_at_r"], final=True),
    Metric("r_at_1", "share of queries whose nearest training neighbour has their class", lambda o: o.retrieval["r_at_1"],
           final=True),
    Metric("nmi", "normalised mutual information of k-means clusters of the features with the classes",
           lambda o: o.clusters["nmi"], final=True),
    Metric("ari", "adjusted Rand index of k-means clusters of the features with the classes",
           lambda o: o.clusters["ari"], final=True),
)}
FINAL = tuple(name for name, m in METRICS.items() if m.final)
DEFAULT_OBJECTIVES = ("top1", "geom_corr")  # accuracy and geometry kept: a search's and every front's default

# A run's cost columns: the range of their values (intervals are clipped to it) and which way is better.
COST: dict[str, Metric] = {m.name: m for m in (
    Metric("params", "trainable parameters of the student", lambda o: math.nan, maximise=False,
           bounds=(0.0, math.inf), fmt="{:,.0f}"),
    Metric("train_seconds", "seconds spent training (evaluation excluded)", lambda o: math.nan, maximise=False,
           bounds=(0.0, math.inf), fmt="{:.1f}"),
    Metric("images_per_second", "training images per second", lambda o: math.nan, bounds=(0.0, math.inf),
           fmt="{:,.0f}"),
)}


def metric(name: str) -> Metric:
    """The metric ``name`` (KeyError naming the allowed ones otherwise)."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is unknown; allowed: {', '.join(METRICS)}") from None


def metric_of_column(column: str) -> Metric | None:
    """The metric a results column holds: ``val_geom_err``, ``test_top1``, ``best_test_top1``, ``last_test_top1``,
    a bare name, or a cost column (``params``, ``*_seconds``); None for anything else."""
    for prefix in ("best_test_", "last_test_", "val_", "test_", ""):
        if column.startswith(prefix) and column[len(prefix):] in METRICS:
            return METRICS[column[len(prefix):]]
    if column in COST:
        return COST[column]
    if column.endswith("seconds"):
        return COST["train_seconds"]
    return None


def bounds_of(column: str) -> tuple[float, float]:
    """The range a results column's values cannot leave (unbounded where the column is no metric)."""
    m = metric_of_column(column)
    return m.bounds if m is not None else (-math.inf, math.inf)


def columns(splits=SPLITS) -> tuple[str, ...]:
    """``val_top1, val_geom_corr, ..., test_top1, ...``: every metric's column per split, in table order."""
    return tuple(f"{s}_{m}" for s in splits for m in METRICS)


def sign(name: str) -> float:
    """+1 for a maximised metric (or column), -1 for a minimised one: ``sign * value`` is larger-is-better."""
    m = metric_of_column(name)
    return 1.0 if m is None or m.maximise else -1.0


def mode(name: str) -> str:
    """Ray Tune's mode for a metric or column: ``max`` or ``min``."""
    return "max" if sign(name) > 0 else "min"


def direction(name: str) -> str:
    """Optuna's direction for a metric or column: ``maximize`` or ``minimize``."""
    return "maximize" if sign(name) > 0 else "minimize"


def better(name: str, a: float, b: float) -> bool:
    """Whether ``a`` is strictly better than ``b`` for metric (or column) ``name``."""
    return sign(name) * a > sign(name) * b
