"""What a run is set to, field by field: the :class:`Recipe` (optimiser, schedule, how it computes), each field's
rules beside it (:func:`setting`), the data sets' defaults, and which fields make a run's identity.

A field's rules live in its metadata: the range a number may take (``lo``, ``hi``, ``above``: a lower bound
that is excluded) or the words a string may be (``choices``). :mod:`kdbench.values` checks every study key,
``--set KEY=VALUE`` and search bound against them; ``kdbench train --help`` lists them. A new field is one line
here (or in :class:`kdbench.methods.Method`) and nothing else.

No torch here: the command line's help and the study reader import it without paying for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from .metrics import DEFAULT_OBJECTIVES

__all__ = ["setting", "weight", "rules", "weights", "Recipe", "SCHEDULES", "SAMPLERS", "COMPILE_BACKENDS", "COMPILE_MODES",
           "PRECISIONS", "EVAL_WHEN",
           "DATASET_DEFAULTS", "dataset_defaults", "SCHEMA_1_FIELDS", "RUN_FIELDS", "fields_dict", "trial_values", "StudyKey", "Param",
           "Confirm", "Search", "Grid", "Asha", "Resources", "Checkpointing", "Evaluation"]


def setting(default, lo: float | None = 0, hi: float | None = None, above: bool = False, choices: tuple = (),
            doc: str = "", is_weight: bool = False):
    """A dataclass field with its rules: a number in ``[lo, hi]`` (``above``: ``lo`` itself excluded; ``None``:
    no bound), or one of ``choices``. Numbers default to ``>= 0``."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above, "choices": tuple(choices), "doc": doc,
                                            "weight": is_weight})


def weight(default: float = 0.0):
    """A method's weight of one loss term (a name of :data:`kdbench.terms.TERMS`): >= 0, the term off at 0."""
    return setting(default, is_weight=True)


def rules(cls) -> dict[str, dataclasses.Field]:
    """Every settable field of a settings dataclass, by name (``name`` is a method's label, not a setting)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}


def weights(cls) -> tuple[str, ...]:
    """The term weights among a settings dataclass's fields."""
    return tuple(name for name, f in rules(cls).items() if f.metadata["weight"])


SCHEDULES = ("cosine", "step", "constant")
SAMPLERS = ("tpe", "nsga2", "gp", "qmc", "random")  # a search's Optuna sampler
COMPILE_BACKENDS = ("inductor", "aot_eager", "cudagraphs")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule: SGD with momentum, weight decay, warm-up then cosine/step/constant."""

    epochs: int = setting(30, lo=1)
    batch_size: int = setting(64, lo=2)
    lr: float = setting(0.05, above=True)
    sgd_momentum: float = setting(0.9, hi=1)
    weight_decay: float = setting(5e-4)
    schedule: str = setting("cosine", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0)
    # step: the epochs after which lr is multiplied by gamma (default: 50%, 75%)
    milestones: tuple[int, ...] = setting((), lo=1, doc="increasing epochs >= 1, e.g. [150, 180, 210]")
    gamma: float = setting(0.1, hi=1, above=True)  # step: the factor at each milestone
    # auto: bf16 autocast on a CUDA device that has it, fp32 elsewhere
    precision: str = setting("auto", choices=PRECISIONS, doc="auto: bf16 on CUDA, fp32 on CPU")
    channels_last: bool = setting(False)  # the student and its batches channels_last on the CPU too (CUDA always is)
    compile: bool = setting(False)  # torch.compile the student's forward (where no term reads its stage maps)
    # torch.compile's backend: inductor | aot_eager (graph capture, no codegen) | cudagraphs
    compile_backend: str = setting("inductor", choices=COMPILE_BACKENDS)
    compile_mode: str = setting("default", choices=COMPILE_MODES)  # inductor's mode
    # data-parallel workers: BatchNorm's batch statistics over the global batch, not each worker's (kdbench.parallel)
    sync_bn: bool = setting(False)


EVAL_WHEN = ("end", "every_epoch")

# Models and recipe per data set when the user names none.
DATASET_DEFAULTS: dict[str, dict] = {
    "digits": dict(teacher="cnn_teacher", student="cnn_student", recipe=Recipe(epochs=30, batch_size=64, lr=0.05)),
    "synthetic": dict(teacher="cnn_teacher", student="cnn_student", recipe=Recipe(epochs=10, batch_size=64, lr=0.05)),
    "cifar10": dict(teacher="resnet50", student="resnet18", recipe=Recipe(epochs=30, batch_size=64, lr=0.05)),
    "cifar100": dict(teacher="resnet50", student="resnet18", recipe=Recipe(epochs=30, batch_size=64, lr=0.05)),
    "folder": dict(teacher="resnet50", student="resnet18", recipe=Recipe(epochs=30, batch_size=64, lr=0.05)),
}


def dataset_defaults(name: str) -> dict:
    """The default models and recipe of data set ``name`` (an image folder, ``folder:PATH``, gets CIFAR's)."""
    return DATASET_DEFAULTS["folder" if name.startswith("folder:") else name]


# ---------------------------------------------------------------------------------------------
# A run's identity

# A run's identity (its config_id, its trials.csv columns, the teacher cache's key) holds a field when it is set to
# something else than its default -- or, for the fields results were first published with (schema 1, frozen: this
# set never grows), always, so that every folder and cached teacher keeps its id. A new field is thus in no id
# until a run sets it: adding one changes nothing already written.
SCHEMA_1_FIELDS = frozenset({
    "name", "ce", "kd", "temperature", "feature", "geometry", "momentum", "rkd", "rkd_distance", "rkd_angle", "sp",
    "cc", "cc_gamma", "cc_order", "dkd", "dkd_alpha", "dkd_beta", "dkd_warmup",
    "epochs", "batch_size", "lr", "sgd_momentum", "weight_decay", "schedule", "warmup_epochs"})

# How a run computes, not what: kept in a study's recipe (study.json, so a rerun computes the same way), out of a
# configuration's identity and its trials.csv columns (they change numbers by float noise only).
RUN_FIELDS = {"channels_last", "compile", "compile_backend", "compile_mode"}


def fields_dict(obj) -> dict:
    """``dataclasses.asdict(obj)``: the fields of schema 1, and the others where they differ from their default."""
    defaults = {f.name: f.default for f in dataclasses.fields(obj)}
    return {k: v for k, v in dataclasses.asdict(obj).items() if k in SCHEMA_1_FIELDS or v != defaults[k]}


def trial_values(method, recipe: Recipe) -> dict:
    """Every term weight, hyperparameter and recipe field of a run: the trials.csv columns that define it
    (``method`` holds the method's name; the epoch count is the study's; see ``SCHEMA_1_FIELDS``, ``RUN_FIELDS``)."""
    hp = {**fields_dict(method), **{k: v for k, v in fields_dict(recipe).items() if k not in RUN_FIELDS}}
    hp.pop("epochs")
    hp["method"] = hp.pop("name")
    if hp.get("milestones"):
        hp["milestones"] = " ".join(map(str, hp["milestones"]))  # one CSV cell, one id however it was spelt
    return hp


@dataclass(frozen=True)
class StudyKey:
    """Marks a command-line option (in its ``Annotated[...]``) as setting one key of the study's table: ``key`` dotted
    (``search.samples``), the option's value turned into the key's by ``parse``. A new flag for a study key is its
    option with this mark, in cli.py alone."""

    key: str
    parse: Callable = lambda v: v


# ---------------------------------------------------------------------------------------------
# A study's tables ([search], [grid], [asha], ...): what kdbench.study.Study holds, validated by kdbench.study


@dataclass(frozen=True)
class Param:
    """One axis of a search space. ``when``: the methods it applies to (empty: all)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    when: tuple[str, ...] = ()


@dataclass(frozen=True)
class Confirm:
    """A confirmation stage: retrain the search's best ``top`` configurations and the presets ``with``
    on ``seeds`` fresh seeds (``kdbench confirm``; run by ``tune`` when a study has ``[confirm]``).

    ``until_settled``: then add seeds in rounds, one at a time to the configurations whose front
    membership the seeds do not settle yet, up to ``max_seeds`` each (see :mod:`kdbench.confirm`)."""

    seeds: int = 3
    top: int = 3
    with_: tuple[str, ...] = ("baseline", "kd")
    until_settled: bool = False
    max_seeds: int = 8


@dataclass(frozen=True)
class Search:
    """``[search]``: a sampler proposes ``samples`` trials in ``space``, ``concurrency`` at once, ranked on two
    validation ``objectives``."""

    sampler: str = "tpe"
    samples: int = 16
    concurrency: int = 2
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    space: tuple[Param, ...] = ()


@dataclass(frozen=True)
class Grid:
    """``[grid]``: every (method, seed, fixed values) point of its methods x seeds x values, ``concurrency`` at once."""

    points: tuple[tuple[str, int, tuple[tuple[str, float], ...]], ...] = ()
    concurrency: int = 2


@dataclass(frozen=True)
class Asha:
    """``[asha]``: early stopping at rungs ``grace_period * reduction_factor ** k`` epochs; ``rank``: rungs rank by
    val top-1 (``top1``) or by non-dominated sorting on the objectives (``pareto``, a search's default: see
    :mod:`kdbench.search.schedulers`)."""

    enabled: bool = False
    grace_period: int = 1
    reduction_factor: int = 3
    rank: str = "top1"


@dataclass(frozen=True)
class Resources:
    """``[resources]``: per trial; ``gpus_per_trial`` None: one GPU shared by the concurrent trials where Ray has
    GPUs. ``workers_per_trial`` > 1: each trial a data-parallel Ray Train run of that many workers, CPUs and GPUs
    per worker (plus a fraction of a CPU for the trial's driver)."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    workers_per_trial: int = 1


@dataclass(frozen=True)
class Checkpointing:
    """``[checkpoint]``: a trial's checkpoints every ``every`` epochs (0: none), and at the first step's end
    ``minutes`` after the last (0: off; mid-epoch too, resumed exactly: an ImageNet epoch is an hour on one GPU);
    ``max_failures`` retries of a trial whose worker died, each from its last."""

    every: int = 1
    minutes: float = 0.0
    max_failures: int = 1


@dataclass(frozen=True)
class Evaluation:
    """``[evaluation]``: when trials evaluate each split: ``end`` or ``every_epoch`` (ASHA needs val every epoch;
    test every epoch gives the paper's best-epoch top-1); how many training images a class kNN and retrieval
    compare with (a seeded subsample: ImageNet's 1.28 M features would not fit beside the model)."""

    val: str = "every_epoch"
    test: str = "end"
    reference_per_class: int = 0  # kNN's, retrieval's reference: this many training images a class, seeded (0: all)
