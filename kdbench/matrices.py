"""The class geometry itself, kept: every run's centroid-similarity matrices (DESIGN §4's ``S``) and the teacher's.

A search, grid or confirmation writes ``matrices/teacher.npz`` once (``val``, ``test``: the teacher's matrices;
``classes``: the class names) and ``matrices/<trial_id>.npz`` per finished run (``val``, ``test``: its student's);
``kdbench train --out DIR`` writes ``DIR/matrices.npz`` with both (the teacher's as ``teacher_val``,
``teacher_test``). C x C float32 each: 40 kB at 100 classes. Folders written before these files existed read as
having none. Here too: the order a picture shows the classes in, and the class pairs a student moved most.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

__all__ = ["MATRICES", "write_run", "write_teacher", "read_matrices", "Matrices", "cluster_order", "moved_pairs"]

MATRICES = "matrices"


def _write_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _split(matrices: dict, prefix: str = "") -> dict:
    return {k[len(prefix):]: np.asarray(v, dtype=np.float32) for k, v in matrices.items()
            if k.startswith(prefix) and k[len(prefix):] in ("val", "test")}


def write_run(folder: Path, trial_id: str, matrices: dict) -> None:
    """``matrices/<trial_id>.npz``: the student's matrices of a run's report (``distill``'s ``matrices``)."""
    student = _split(matrices)
    if student:
        _write_npz(Path(folder) / MATRICES / f"{trial_id}.npz", student)


def write_teacher(path: Path, matrices: dict, class_names, student: bool = False) -> None:
    """The teacher's matrices (and the class names) at ``path``; ``student``: the run's own beside them (train)."""
    teacher = _split(matrices, "teacher_")
    if not teacher:
        return
    arrays = {("teacher_" if student else "") + k: v for k, v in teacher.items()}
    if student:
        arrays |= _split(matrices)
    n = next(iter(teacher.values())).shape[0]
    names = [str(c) for c in class_names] if len(class_names or ()) == n else [str(i) for i in range(n)]
    _write_npz(Path(path), arrays | {"classes": np.array(names)})


class Matrices:
    """A folder's kept matrices: ``teacher[split]``, ``runs[trial_id][split]``, ``classes`` (names)."""

    def __init__(self, teacher: dict, runs: dict, classes: list[str]):
        self.teacher, self.runs, self.classes = teacher, runs, classes

    def __bool__(self) -> bool:
        return bool(self.teacher) and bool(self.runs)

    def mean(self, trial_ids, split: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The seed-mean student matrix over ``trial_ids`` on ``split``, its per-entry std (ddof 1; 0 for one run)
        and how many runs it rests on; None when none of them kept one."""
        kept = [self.runs[t][split] for t in trial_ids if t in self.runs and split in self.runs[t]]
        if not kept:
            return None
        stack = np.stack(kept).astype(np.float64)
        std = stack.std(0, ddof=1) if len(kept) > 1 else np.zeros_like(stack[0])
        return stack.mean(0), std, len(kept)


def _load(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):  # cut short or foreign: as if absent
        return {}


def read_matrices(folder: Path) -> Matrices:
    """What ``folder`` kept (a search's ``matrices/`` or a train run's ``matrices.npz``); empty where nothing."""
    folder = Path(folder)
    if (folder / "matrices.npz").is_file():
        z = _load(folder / "matrices.npz")
        teacher = {k[8:]: z[k] for k in z if k.startswith("teacher_")}
        runs = {"train": {k: z[k] for k in ("val", "test") if k in z}}
        return Matrices(teacher, runs, [str(c) for c in z.get("classes", [])])
    d = folder / MATRICES
    if not d.is_dir():
        return Matrices({}, {}, [])
    z = _load(d / "teacher.npz")
    teacher = {k: z[k] for k in ("val", "test") if k in z}
    runs = {p.stem: _load(p) for p in sorted(d.glob("*.npz")) if p.name != "teacher.npz"}
    return Matrices(teacher, {k: v for k, v in runs.items() if v}, [str(c) for c in z.get("classes", [])])


def cluster_order(s: np.ndarray) -> np.ndarray:
    """The classes in the leaf order of an average-linkage clustering of ``s`` (distance 1 - similarity, scipy):
    related classes sit together, so a picture shows the teacher's blocks."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = s.shape[0]
    if n < 3:
        return np.arange(n)
    d = np.clip(1.0 - (s + s.T) / 2.0, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return leaves_list(linkage(squareform(d, checks=False), method="average"))


def moved_pairs(teacher: np.ndarray, mean: np.ndarray, std: np.ndarray, classes: list[str], k: int = 3) -> list[dict]:
    """The ``k`` class pairs (i < j) whose similarity moved most from the teacher's, largest |change| first:
    ``{"a", "b", "teacher", "student", "std"}`` (names, the teacher's value, the student's mean and std)."""
    n = teacher.shape[0]
    i, j = np.triu_indices(n, 1)
    change = np.abs(mean[i, j] - teacher[i, j])
    top = np.argsort(-change, kind="stable")[:k]
    name = (lambda c: classes[c]) if len(classes) == n else str
    return [{"a": name(int(i[t])), "b": name(int(j[t])), "teacher": float(teacher[i[t], j[t]]),
             "student": float(mean[i[t], j[t]]), "std": float(std[i[t], j[t]])} for t in top]
