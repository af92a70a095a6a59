"""``kdbench tune`` and ``kdbench confirm``: Ray Tune runs the trials, Optuna proposes them, ASHA
stops the poor ones early.

The only package that imports Ray. Flow: validated Study -> teacher (cache hit or trained once, in
the driver) -> a Tuner whose trials each run ``distill()`` and report once per epoch -> a driver
callback that keeps ``trials.csv``/``epochs.csv`` up to date (atomically) as each trial ends.

Trials checkpoint through Ray Tune (see :mod:`kdbench.checkpoints`); Ray retries a trial whose
worker died from its last checkpoint (``max_failures``). Resume is kdbench's own on top of that:
finished trials are read back from ``trials.csv``; an interrupted trial runs again with the same
configuration and seed (grids and confirmations: the missing points; searches: Optuna's interrupted
trials are marked failed and their parameters enqueued first) and continues from its last checkpoint;
ASHA's rungs are rebuilt from the recorded validation curves.

Layout: ``trainable`` (what runs in a Ray worker), ``searcher`` (Optuna: the space, the sampler, what it is told),
``schedulers`` (ASHA: top-1 and two-objective rungs), ``writer`` (the driver's callback that writes the results
folder), ``run`` (tune and confirm).
"""

from __future__ import annotations

import os

for _k, _v in {"RAY_AIR_NEW_OUTPUT": "0", "RAY_USAGE_STATS_ENABLED": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
               "RAY_DEDUP_LOGS": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "3600",
               "RAY_CHDIR_TO_TRIAL_DIR": "0",
               # A failed trial's last report carries its reason and no metrics; ASHA skips such a result.
               "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}.items():
    os.environ.setdefault(_k, _v)


__all__ = ["run_study", "run_confirm", "init_ray", "SearchState"]


def __getattr__(name: str):
    """The driver's side, imported on first use: a Ray worker imports ``trainable`` only (not the
    report's pandas/scipy), so that each trial's process starts sooner."""
    if name in ("run_study", "run_confirm", "init_ray", "_init_ray"):  # _init_ray: the tests' and benchmarks' name
        from . import run

        return getattr(run, name.lstrip("_"))
    if name == "SearchState":
        from .writer import SearchState

        return SearchState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
