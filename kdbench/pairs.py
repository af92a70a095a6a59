"""A benchmark over teacher -> student pairs: one study per pair, from one shared base.

A study file with ``[pairs]`` is expanded here into one :class:`~kdbench.study.Study` per pair, each validated
as a study of its own and run into its own results folder (``DIR/<teacher>-<student>``)::

    [pairs]
    list = [["resnet56", "resnet20"], ["resnet32x4", "ShuffleV1"]]     # (teacher, student)
    lr = { ShuffleV1 = 0.01 }                                         # recipe.lr for these students
    teacher_checkpoint = "teachers/{teacher}_vanilla/ckpt_epoch_240.pth"  # used where the file exists
    [pairs.reference.resnet56-resnet20]                               # published test top-1 per method
    teacher = 72.34

A pair's teacher is read from ``teacher_checkpoint`` (``{teacher}`` replaced by its name, ``{arch}`` by the name
without a library prefix; relative to the working directory, as cifar_teachers.tar unpacks) where that file
exists, and trained with
``[teacher_recipe]`` where it does not.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from .flags import Flags, apply_flags
from .models import check_model
from .methods import METHODS
from .settings import fields_dict
from .study import Study, StudyError, parse_study, read_toml

__all__ = ["load_studies", "pair_name", "plan_lines", "space_text", "teacher_text"]


def pair_name(teacher: str, student: str) -> str:
    """A pair's folder and reference key: ``resnet32x4-resnet8x4``."""
    return f"{teacher}-{student}"


def load_studies(path: str | Path | None, flags: Flags | None = None, raw: dict | None = None) -> list[Study]:
    """The studies of a study file (or of ``raw``, its table; ``path`` None: of flags alone): itself, or one per
    ``[pairs]`` entry; ``flags`` (``tune``'s) applied first."""
    raw = read_toml(path) if raw is None else raw
    raw, origins = apply_flags(raw, flags or Flags(), str(path) if path is not None else "the command line")
    pairs = raw.pop("pairs", None)
    if pairs is None:
        return [parse_study(raw, path, origins=origins)]
    where = f"{path}: pairs"
    if not isinstance(pairs, dict) or set(pairs) - {"list", "lr", "teacher_checkpoint", "reference"}:
        raise StudyError(f"{where}: {sorted(pairs) if isinstance(pairs, dict) else pairs!r}; allowed keys: list, lr, "
                         f"teacher_checkpoint, reference")
    items, lr = pairs.get("list"), pairs.get("lr", {})
    template, reference = pairs.get("teacher_checkpoint", ""), pairs.get("reference", {})
    if not isinstance(items, list) or not items or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in items):
        raise StudyError(f"{where}.list = {items!r}; allowed: a non-empty list of [teacher, student] names")
    for t, s in items:
        for role, name in (("teacher", t), ("student", s)):
            try:
                check_model(name)
            except ValueError as e:
                raise StudyError(f"{where}.list: {role} {e}") from None
    if len({pair_name(*p) for p in items}) != len(items):
        raise StudyError(f"{where}.list: a pair appears twice; allowed: each [teacher, student] once")
    if not isinstance(lr, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                           for v in lr.values()):
        raise StudyError(f"{where}.lr = {lr!r}; allowed: a table of student name = learning rate > 0")
    if not isinstance(reference, dict) or not all(isinstance(v, dict) for v in reference.values()):
        raise StudyError(f"{where}.reference = {reference!r}; allowed: a table per pair of method = published top-1")
    unknown = set(reference) - {pair_name(*p) for p in items}
    if unknown:
        raise StudyError(f"{where}.reference: {sorted(unknown)} name no pair; allowed: "
                         f"{', '.join(pair_name(*p) for p in items)}")
    if not isinstance(template, str) or template and "{teacher}" not in template and "{arch}" not in template:
        raise StudyError(f"{where}.teacher_checkpoint = {template!r}; allowed: a path with {{teacher}} (the name) or "
                         f"{{arch}} (the name without a library prefix: resnet34 for tv:resnet34) in it")
    studies, base = [], raw.get("name", Path(path).stem if path else "pairs")
    for t, s in items:
        sub = copy.deepcopy(raw)
        sub |= {"name": f"{base}-{pair_name(t, s)}", "teacher": t, "student": s,
                "reference": reference.get(pair_name(t, s), sub.get("reference", {}))}
        if s in lr:
            sub.setdefault("recipe", {})["lr"] = float(lr[s])
        ckpt = Path(template.format(teacher=t, arch=t.partition(":")[2] or t)).expanduser() if template else None
        if ckpt is not None and ckpt.is_file():
            sub["teacher_checkpoint"] = str(ckpt)
        st = parse_study(sub, path, f"{path} [{pair_name(t, s)}]", origins)
        missing = ckpt is not None and not ckpt.is_file() and not st.teacher_checkpoint  # (a flag may name one)
        studies.append(dataclasses.replace(st, teacher_looked_for=str(ckpt)) if missing else st)
    return studies


def space_text(space) -> str:
    """``geometry loguniform 1..1000, method in {kd, geometry}``: a search space on one line."""
    when = lambda p: f" (when {', '.join(p.when)})" if p.when else ""
    return ", ".join(f"{p.name} in {{{', '.join(map(str, p.choices))}}}{when(p)}" if p.type == "categorical" else
                     f"{p.name} {p.type} {p.low:g}..{p.high:g}{when(p)}" for p in space)


def teacher_text(st: Study) -> str:
    """Where a study's teacher comes from: its file, or training (and the [pairs] file looked for, where missing)."""
    looked = f"no file at {st.teacher_looked_for}: " if st.teacher_looked_for else ""
    return (f"read from {st.teacher_checkpoint}" if st.teacher_checkpoint else
            f"{looked}trained if not cached: {st.teacher_recipe.epochs} epochs")


def plan_lines(studies: list[Study]) -> list[str]:
    """What a run of ``studies`` would do, without data: per study its teacher, student, trials and trial-epochs."""
    lines, total = [], 0
    for st in studies:
        teacher = teacher_text(st)
        values = len({v for _, _, v in st.grid.points}) if st.is_grid else 0
        n = lambda k, word: f"{k} {word}{'s' if k != 1 else ''}"  # noqa: E731
        kind = (f"grid of {n(len(st.grid.points), 'run')} ({n(len({m for m, _, _ in st.grid.points}), 'method')} × "
                f"{n(len({sd for _, sd, _ in st.grid.points}), 'seed')}{f' × {values} values' if values > 1 else ''})"
                if st.is_grid else
                f"search of {st.search.samples} trials ({st.search.sampler}, ASHA {'on' if st.asha.enabled else 'off'})")
        epochs = st.trial_count() * st.recipe.epochs
        total += epochs
        streamed = {True: " (streamed from disk)", "auto": ""}.get(st.data_options.get("stream", "auto"), " (in memory)") \
            if st.dataset.startswith("folder:") else ""
        w = st.resources.workers_per_trial
        workers = f"each trial {w} data-parallel workers (Ray Train, global batch {st.recipe.batch_size}) of " if w > 1 else ""
        lines.append(f"{st.name}: {st.dataset}{streamed}, teacher {st.teacher} ({teacher}), student {st.student} (lr "
                     f"{st.recipe.lr}, {st.recipe.epochs} epochs); {kind}; at most {epochs:,} trial-epochs; "
                     f"{st.concurrency} at once, {workers}{st.resources.cpus_per_trial:g} CPU and "
                     f"{'auto' if st.resources.gpus_per_trial is None else st.resources.gpus_per_trial} GPU each")
        if not st.is_grid:
            preset = METHODS.get(st.method)
            changed = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields_dict(st.methods[st.method]).items()
                       if preset is None or getattr(preset, k) != v]
            lines.append(f"  method {st.method}{' (' + ', '.join(changed) + ')' if changed else ''}; space: "
                         f"{space_text(st.space)}; objectives: val {' and val '.join(st.objectives)}")
    if len(studies) > 1:
        lines.append(f"{len(studies)} studies; at most {total:,} trial-epochs in all")
    return lines
