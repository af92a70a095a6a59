"""Where a run's curves go besides its folder: the experiment trackers researchers already watch.

``--log tensorboard`` (``[logging] trackers = ["tensorboard"]`` in a study, recorded in study.json so a resume logs
where it logged): one TensorBoard run per trial under ``DIR/tensorboard/<trial_id>`` -- every epoch's row (losses,
val and test metrics, lr, throughput) as scalars at ``step = epoch``, and when the trial ends its values (method,
seed, every term weight and recipe field that defines it) against its final metrics in the hparams view
(``DIR/tensorboard/<trial_id>/hparams``). ``tensorboard --logdir DIR/tensorboard`` opens them.

Written on the driver by the search's results writer, from the rows it writes to epochs.csv and trials.csv, so the
two always agree and a cluster search logs once. Not Ray's ``TBXLoggerCallback``: it writes into each trial's Ray
folder (kdbench removes that storage when the trials have finished; on a cluster it is the shared storage), logs
every key Tune carries (hosts, node ids) at ``step = training_iteration``, which counts mid-epoch checkpoint reports
too, and has no hparams summary of kdbench's values. A tracker that fails (a full disk) is one warning line; the
search goes on and its folder loses nothing. MLflow and W&B are to come.
"""

from __future__ import annotations

import math
from pathlib import Path

from .values import StudyError

__all__ = ["TRACKERS", "check_trackers", "open_trackers", "TensorBoard"]

TRACKERS = ("tensorboard",)  # its writer (tensorboardX) comes with ray[tune]


def check_trackers(names, where: str) -> tuple[str, ...]:
    """``names`` (a list, or a comma-separated string) as a tuple of known trackers; else one line naming them."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for n in names:
        if n not in TRACKERS:
            raise StudyError(f"{where} = {n!r}; allowed: {', '.join(TRACKERS)} (comma-separated)")
    return tuple(dict.fromkeys(n for n in names if n))


def open_trackers(names, out: Path, warn) -> list:
    """The trackers ``names`` asks for, writing for results folder ``out``; ``warn(line)`` says when one fails."""
    return [TensorBoard(Path(out), warn) for n in names if n == "tensorboard"]


def _numbers(row: dict) -> dict:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class TensorBoard:
    """One event-file folder per trial under ``out/tensorboard`` (see the module's docstring)."""

    def __init__(self, out: Path, warn):
        self.root, self.warn, self.writers, self.failed = Path(out) / "tensorboard", warn, {}, False

    def _guard(self, fn):
        if self.failed:
            return
        try:
            fn()
        except OSError as e:  # the folder's disk: say so once, and stop logging (the results are what count)
            self.failed = True
            self.warn(f"warning: TensorBoard logging stopped ({type(e).__name__}: {e}); the search goes on")

    def _writer(self, run: str):
        if run not in self.writers:
            from tensorboardX import SummaryWriter

            self.writers[run] = SummaryWriter(logdir=str(self.root / run), flush_secs=5)
        return self.writers[run]

    def epoch(self, run: str, row: dict) -> None:
        """One epochs.csv row: every number in it at ``step = epoch``."""
        def write():
            w = self._writer(run)
            for k, v in _numbers(row).items():
                if k != "epoch":
                    w.add_scalar(k, v, int(row["epoch"]))
        self._guard(write)

    def end(self, run: str, values: dict, metrics: dict) -> None:
        """A finished trial: its values against its final metrics (the hparams view); its event files closed."""
        def write():
            hp = {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool)) and v == v}
            w = self._writer(run)
            w.add_hparams(hp, {f"final/{k}": v for k, v in _numbers(metrics).items()}, name="hparams")
            w.close()
            self.writers.pop(run, None)
        self._guard(write)

    def close(self) -> None:
        for w in self.writers.values():
            self._guard(w.close)
        self.writers.clear()
