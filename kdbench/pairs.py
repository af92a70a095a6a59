"""A benchmark over teacher -> student pairs: one study per pair, from one shared base.

A study file with ``[pairs]`` is expanded here into one :class:`~kdbench.study.Study` per pair, each validated
as a study of its own and run into its own results folder (``DIR/<teacher>-<student>``)::

    [pairs]
    list = [["resnet56", "resnet20"], ["resnet32x4", "ShuffleV1"]]     # (teacher, student)
    lr = { ShuffleV1 = 0.01 }                                         # recipe.lr for these students
    teacher_checkpoint = "teachers/{teacher}_vanilla/ckpt_epoch_240.pth"  # used where the file exists
    [pairs.reference.resnet56-resnet20]                               # published test top-1 per method
    teacher = 72.34

A pair's teacher is read from ``teacher_checkpoint`` (``{teacher}`` replaced by its name, relative to the
working directory, as cifar_teachers.tar unpacks) where that file exists, and trained with
``[teacher_recipe]`` where it does not.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .models import check_model
from .study import Study, StudyError, parse_study, read_toml

__all__ = ["load_studies", "pair_name", "plan_lines"]


def pair_name(teacher: str, student: str) -> str:
    """A pair's folder and reference key: ``resnet32x4-resnet8x4``."""
    return f"{teacher}-{student}"


def load_studies(path: str | Path) -> list[Study]:
    """The studies of a study file: itself, or one per ``[pairs]`` entry."""
    raw = read_toml(path)
    pairs = raw.pop("pairs", None)
    if pairs is None:
        return [parse_study(raw, path)]
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
    unknown = set(reference) - {pair_name(*p) for p in items} if isinstance(reference, dict) else {"?"}
    if unknown:
        raise StudyError(f"{where}.reference: {sorted(unknown)} name no pair; allowed: "
                         f"{', '.join(pair_name(*p) for p in items)}")
    if template and "{teacher}" not in template:
        raise StudyError(f"{where}.teacher_checkpoint = {template!r}; allowed: a path with {{teacher}} in it")
    studies, base = [], raw.get("name", Path(path).stem)
    for t, s in items:
        sub = copy.deepcopy(raw)
        sub |= {"name": f"{base}-{pair_name(t, s)}", "teacher": t, "student": s,
                "reference": reference.get(pair_name(t, s), sub.get("reference", {}))}
        if s in lr:
            sub.setdefault("recipe", {})["lr"] = float(lr[s])
        ckpt = Path(template.format(teacher=t)).expanduser() if template else None
        if ckpt is not None and ckpt.is_file():
            sub["teacher_checkpoint"] = str(ckpt)
        studies.append(parse_study(sub, path, f"{path} [{pair_name(t, s)}]"))
    return studies


def plan_lines(studies: list[Study]) -> list[str]:
    """What a run of ``studies`` would do, without data: per study its teacher, student, trials and trial-epochs."""
    lines, total = [], 0
    for st in studies:
        teacher = (f"read from {st.teacher_checkpoint}" if st.teacher_checkpoint else
                   f"trained if not cached: {st.teacher_recipe.epochs} epochs")
        kind = (f"grid of {len(st.grid)} runs ({len({m for m, _, _ in st.grid})} methods × "
                f"{len({sd for _, sd, _ in st.grid})} seeds)" if st.is_grid else
                f"search of {st.samples} trials ({st.sampler}, ASHA {'on' if st.asha else 'off'})")
        epochs = st.trial_count() * st.recipe.epochs
        total += epochs
        lines.append(f"{st.name}: {st.dataset}, teacher {st.teacher} ({teacher}), student {st.student} (lr "
                     f"{st.recipe.lr}); {kind}; at most {epochs:,} trial-epochs; {st.concurrency} at once, "
                     f"{st.cpus_per_trial:g} CPU and {'auto' if st.gpus_per_trial is None else st.gpus_per_trial} GPU each")
    if len(studies) > 1:
        lines.append(f"{len(studies)} studies; at most {total:,} trial-epochs in all")
    return lines
