"""Measure students trained anywhere against a teacher, with no training: ``kdbench evaluate``.

Each student file (a kdbench ``student.pt``, a RepDistiller or mdistiller checkpoint, a plain state_dict)
is loaded strictly into its architecture and measured as a trained run is at its end: val and test top-1,
geom_corr, geom_err, CKA, kNN top-1. The rows (``stage = evaluate``) go into a results folder that
``compare`` ranks and plots beside trained ones; files given one ``--label`` are the seeds of one
configuration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import results
from .data import Data, DataError
from .measure import evaluate, reference, teacher_views
from .models import build_model, count_parameters
from .teacher import file_digest, load_strict, read_state_dict
from .train import Teacher

__all__ = ["evaluate_students", "check_students"]


def check_students(arch: str, files: list[Path], data: Data, out: Path) -> None:
    """Every file exists and loads strictly into ``arch`` for ``data``'s classes, and ``out`` is new or an evaluate
    folder (one line otherwise): checked before a teacher is read or trained."""
    out = Path(out)
    if (out / "study.json").exists():
        if results.read_study(out).get("kind") != "evaluate":
            raise DataError(f"--out {out}: holds a {results.read_study(out).get('kind', 'single')} run; allowed: a new "
                            f"folder or an evaluate folder")
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out}: folder exists and is not empty; allowed: a new folder or an evaluate folder")
    if not files:
        raise DataError("--student: no student files given; allowed: kdbench evaluate FILE [FILE ...] --student ARCH")
    for f in files:
        if not f.is_file():
            raise DataError(f"--student {f}: no such file")
        model = build_model(arch, data.num_classes, data.in_channels)
        load_strict(model, read_state_dict(f, "--student"), f, arch, data.num_classes, "--student")


def _rows(data: Data, teacher: Teacher, arch: str, files: list[Path], label: str, context: dict,
          first_seed: int) -> list[dict]:
    views = teacher_views(teacher.model, data)
    cid = results.config_id(context, {"evaluated": label})
    rows = []
    for i, path in enumerate(files):
        model = build_model(arch, data.num_classes, data.in_channels).to(data.device)
        load_strict(model, read_state_dict(path, "--student"), path, arch, data.num_classes, "--student")
        t0 = time.perf_counter()
        ref = reference(model, data)  # kNN's reference set, once for both splits
        row = {"trial_id": f"{label}-{file_digest(path)[:8]}", "config_id": cid, "stage": "evaluate",
               "status": "completed", "fidelity": "full", "method": label, "seed": first_seed + i, "file": str(path.resolve())}
        for split in views:
            row |= evaluate(model, data, split, views[split], knn=ref)
        row["last_test_top1"] = row.get("test_top1")
        row |= {"params": count_parameters(model), "seconds": time.perf_counter() - t0}
        rows.append(row)
    return rows


def evaluate_students(out: Path, data: Data, teacher: Teacher, arch: str, files: list[Path], label: str,
                      study: dict, device: str) -> list[dict]:
    """Measure ``files`` (each a state dict of ``arch``) against ``teacher`` and add them to the folder ``out``.

    ``out`` is created, or must be an evaluate folder of the same data set, teacher and student architecture
    (rows are appended; a file already there under the same label is not measured again). ``study``: the
    data set, teacher and student as ``study.json`` records them. Returns the rows added.
    """
    out = Path(out)
    check_students(arch, files, data, out)
    existing = []
    if (out / "study.json").exists():
        meta = results.read_study(out)
        if meta.get("study") != json.loads(json.dumps(results.jsonable(study))):  # as study.json holds it
            raise DataError(f"--out {out}: evaluates another data set, teacher or student ({meta['study'].get('dataset')}, "
                            f"{meta['study'].get('teacher')}, {meta['study'].get('student')}); allowed: a new folder or an "
                            f"evaluate folder of the same data set, teacher and student")
        existing = results.read_table(out / "trials.csv").to_dict("records")
    done = {r["trial_id"] for r in existing}
    todo = [f for f in files if f"{label}-{file_digest(f)[:8]}" not in done]
    context = results.run_context(study)
    first = sum(r.get("method") == label for r in existing)  # files added to a label later continue its seeds
    rows = _rows(data, teacher, arch, todo, label, context, first)  # everything measured before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if not existing:
        results.write_json(out / "study.json", {"schema": results.SCHEMA, "name": out.name, "kind": "evaluate", "study": study,
                                                "teacher": {k: v for k, v in teacher.meta.items() if k != "path"},
                                                "environment": results.environment(device)})
    results.write_csv(out / "trials.csv", existing + rows, results.TRIAL_COLUMNS)
    return rows
