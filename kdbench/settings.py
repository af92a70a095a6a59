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

__all__ = ["setting", "weight", "rules", "weights", "Recipe", "SCHEDULES", "SAMPLERS", "COMPILE_BACKENDS", "COMPILE_MODES",
           "PRECISIONS", "EVAL_WHEN",
           "DATASET_DEFAULTS", "dataset_defaults", "SCHEMA_1_FIELDS", "RUN_FIELDS", "fields_dict", "trial_values", "StudyKey"]


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
SAMPLERS = ("tpe", "nsga2", "random")  # a search's Optuna sampler
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
