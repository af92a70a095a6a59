"""The records that cross a module boundary during a run: what a training step's terms read (:class:`Batch`), what
the loop reports once an epoch (:class:`Epoch`: a row of numbers, and beside it the continuation state or the
final outputs), what a run returns (:class:`Run`), the exact-continuation state (:class:`TrainState`) and what a
search records of a finished trial (:class:`TrialRow`).

A row (:data:`Row`) is one epoch's numbers by column name — ``epoch``, ``lr``, ``train_loss``, ``loss_<term>``,
a term's own records (CTKD's ``ctkd_temperature``), ``val_<metric>``, ``test_<metric>`` — exactly what epochs.csv
holds. Everything that is not a number of that epoch travels in its own field, never in the row.

No torch at import: reports and the search's driver read these without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = ["Row", "Batch", "Epoch", "Final", "Run", "TrainState", "TrialRow"]

Row = dict[str, float]  # one epoch's numbers by column name (epochs.csv's row)


@dataclass
class Batch:
    """What a training step's terms read, by the names they declare (:attr:`kdbench.terms.Term.reads`).

    Shapes: B images, C classes, d / d_t the student's / teacher's feature widths. A field no term of the method
    reads may be None (the teacher runs, and stage maps are computed, only where some term reads them); a term
    that reads a field it does not declare fails on it (tests/test_terms.py builds batches of its reads alone).
    """

    logits: torch.Tensor | None = None  # (B, C) the student's, float32
    features: torch.Tensor | None = None  # (B, d) the student's pooled penultimate features, float32
    target: torch.Tensor | None = None  # (B,) class labels
    index: torch.Tensor | None = None  # (B,) the images' indices in the training split (CRD's memory)
    epoch: int | None = None  # 1-based
    epochs: int | None = None  # of the whole run (CTKD's curriculum)
    generator: torch.Generator | None = None  # the run's generator on its device (CRD's negatives)
    maps: list | None = None  # the student's stage maps, stem first, each (B, C_i, H_i, W_i)
    preact: list | None = None  # the same before their last ReLU (OFD)
    t_logits: torch.Tensor | None = None  # (B, C) the teacher's, under inference mode, copied out of it
    t_features: torch.Tensor | None = None  # (B, d_t)
    t_maps: list | None = None
    t_preact: list | None = None
    t_centroids: torch.Tensor | None = None  # (C, d_t) the teacher's train-split class centroids (cached)
    memory: Any = None  # the geometry term's centroid memory (kdbench.geometry.CentroidMemory)

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every name a term may declare it reads."""
        return frozenset(f.name for f in fields(cls))


@dataclass(frozen=True)
class TrainState:
    """Everything an exact continuation of a run needs after ``epoch`` (and ``batch`` batches of the next one), on
    the CPU: the modules' state dicts (``student``, ``extras``: the terms' trainable parts, ``memory``: the geometry
    term's, where it has one), the optimiser's, the loop's generator and every RNG state, and the loop's counters
    and history. Mid-epoch (``batch`` > 0) also the generator as the epoch began (what drew its order: the
    permutation, or a streamed epoch's seed that every image's crop and flip derive from), the epoch's running sums
    and its time so far.

    :meth:`state_dict` is what a checkpoint file holds (flat, readable with ``torch.load(weights_only=True)``);
    :meth:`from_state_dict` reads it back: the one place either is spelt.
    """

    epoch: int
    step: int
    modules: dict[str, dict]
    optimizer: dict
    generator: torch.Tensor
    rng: dict
    history: list[Row]
    best_test: float
    train_seconds: float
    untimed: int = 0  # images of steps kept out of the timing (the first compiled step)
    batch: int = 0  # batches of epoch ``epoch + 1`` done (0: at an epoch's end)
    epoch_generator: torch.Tensor | None = None  # mid-epoch: the generator's state as that epoch began
    sums: torch.Tensor | None = None  # mid-epoch: the epoch's running loss sums (see distill)
    epoch_seconds: float = 0.0  # mid-epoch: the epoch's training time so far

    def state_dict(self) -> dict:
        mid = {"batch": self.batch, "epoch_generator": self.epoch_generator, "sums": self.sums,
               "epoch_seconds": self.epoch_seconds} if self.batch else {}
        return {**self.modules, "optimizer": self.optimizer, "generator": self.generator, "rng": self.rng,
                "history": list(self.history), "step": self.step, "best_test": self.best_test,
                "train_seconds": self.train_seconds, "epoch": self.epoch, "untimed": self.untimed, **mid}

    @classmethod
    def from_state_dict(cls, d: dict) -> TrainState:
        counters = {"optimizer", "generator", "rng", "history", "step", "best_test", "train_seconds", "epoch", "untimed",
                    "batch", "epoch_generator", "sums", "epoch_seconds"}
        return cls(epoch=int(d["epoch"]), step=int(d["step"]), modules={k: v for k, v in d.items() if k not in counters},
                   optimizer=d["optimizer"], generator=d["generator"], rng=d["rng"], history=list(d["history"]),
                   best_test=float(d["best_test"]), train_seconds=float(d["train_seconds"]),
                   untimed=int(d.get("untimed", 0)), batch=int(d.get("batch", 0)),
                   epoch_generator=d.get("epoch_generator"), sums=d.get("sums"),
                   epoch_seconds=float(d.get("epoch_seconds", 0.0)))


@dataclass(frozen=True)
class Final:
    """What the last epoch carries beside its row: the run's own numbers and outputs."""

    run: Row  # last_test_top1, peak_memory_mib, compile_seconds: numbers of the whole run (trials.csv's)
    precision: str  # the autocast the training step ran in (bf16 | fp32): the recipe's precision on this device
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # centroid similarity per split: val, test,
    # teacher_val, teacher_test ((C, C) float32)
    weights: dict | None = None  # the student's state_dict on the CPU, when asked for (a search keeps it)


@dataclass(frozen=True)
class Epoch:
    """What the loop hands ``report`` once an epoch."""

    row: Row  # empty where the loop hands only a mid-epoch state (see distill's ``state_when``)
    state: TrainState | None = None  # where a continuation was asked for after this epoch (or step)
    final: Final | None = None  # at the last epoch


@dataclass
class Run:
    """What :func:`kdbench.train.distill` returns."""

    metrics: Row  # the final numbers: the last epoch's row, the run's (see Final.run) and ``epochs``
    history: list[Row]  # every epoch's row, the last included
    model: nn.Module  # the trained student
    precision: str  # see Final.precision
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # see Final.matrices

    def __getitem__(self, key: str) -> float:  # res["test_top1"]: a final metric
        return self.metrics[key]


@dataclass(frozen=True)
class TrialRow:
    """One trials.csv row, as the search writes it when a trial ends: which trial and configuration, how it ended,
    what defines it, what it measured and where it ran. :meth:`as_row` is the row (its columns' order is
    :data:`kdbench.results.TRIAL_COLUMNS`, the values' columns after them)."""

    trial_id: str
    config_id: str
    stage: str  # search | grid | confirm
    status: str  # completed | stopped (by ASHA) | failed
    seed: int
    epochs: int  # how far it got
    values: dict  # the method's name and every term weight, hyperparameter and recipe field that defines it
    measured: dict  # what its last report held of the trials.csv columns: final metrics, cost, where and how it ran
    seconds: float  # from its start to its end, as the driver saw them
    failure: str = ""  # why it failed (one line)
    point: int | None = None  # a grid's point

    @property
    def fidelity(self) -> str:
        """``full`` for a completed trial; ``low`` for one stopped early (or failed): never on a front."""
        return "full" if self.status == "completed" else "low"

    def as_row(self) -> dict:
        row = {"trial_id": self.trial_id, "config_id": self.config_id, "stage": self.stage, "status": self.status,
               "fidelity": self.fidelity, "seed": self.seed, "epochs": self.epochs, **self.values}
        if self.point is not None:
            row["point"] = self.point
        return {**row, **{k: v for k, v in self.measured.items() if k not in row}, "seconds": self.seconds,
                "failure": self.failure}
