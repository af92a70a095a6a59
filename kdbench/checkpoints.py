"""Mid-trial checkpoints: where they live, how a resume finds them, how they go away.

Trials report a checkpoint through Ray Tune's API (``tune.report(..., checkpoint=...)``); Ray copies
it into the run's *storage*: ``<results folder>/ray`` by default, or ``--storage PATH_OR_URI`` (a
shared file system, or any URI pyarrow understands, e.g. ``s3://bucket/prefix``) so that the nodes of
a cluster and a later resume all see it. Ray keeps only the latest checkpoint of a trial; kdbench
removes a trial's checkpoint when the trial ends, and the whole default storage once every trial of
the folder has finished. Each checkpoint folder holds ``state.pt`` (what
:func:`kdbench.train.distill` needs to continue exactly) and ``kdbench.json`` (which configuration and
seed, which epoch and batch, the history so far, the state's size): a resume finds the latest complete
checkpoint of each unfinished (configuration, seed) by reading those.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from .state import load_tensors
from .study import StudyError

__all__ = ["resolve_storage", "experiment_root", "find", "remove", "save", "load", "save_student", "read_student",
           "STATE_FILE", "META_FILE", "STUDENT_FILE"]

# A finished trial's last checkpoint holds only STUDENT_FILE (no STATE_FILE, so a resume never continues from it).
STATE_FILE, META_FILE, STUDENT_FILE = "state.pt", "kdbench.json", "student.pt"
# What pyarrow's file systems raise: ArrowInvalid (a ValueError; a bad JSON file raises one too) for a bad
# URI, ArrowNotImplementedError for an unknown scheme, OSError (FileNotFoundError, ...) for the I/O itself.
FS_ERRORS = (ValueError, pa.ArrowNotImplementedError, OSError)


def _fs(uri: str):
    return pafs.FileSystem.from_uri(uri)


def resolve_storage(storage: str | None, out: Path) -> tuple[str, bool]:
    """The storage root of results folder ``out`` and whether it is the default (inside ``out``).

    A path becomes absolute; a URI must name a scheme pyarrow knows; either must be writable (checked
    with a probe file, before anything is written). Raises StudyError with one line otherwise.
    """
    if storage is None:
        return str(Path(out).resolve() / "ray"), True
    allowed = "allowed: a writable folder or a URI pyarrow understands (s3://, gs://, hdfs://, file://)"
    uri = storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())
    try:
        fs, path = _fs(uri)
    except FS_ERRORS as e:
        raise StudyError(f"--storage {storage}: {str(e).splitlines()[0]}; {allowed}") from None
    probe = f"{path}/.kdbench-probe-{os.getpid()}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except FS_ERRORS as e:
        raise StudyError(f"--storage {storage}: not writable ({str(e).splitlines()[0]}); {allowed}") from None
    return uri, False


def experiment_root(storage: str, default: bool, out: Path, name: str) -> str:
    """Where this folder's runs keep their checkpoints: the default storage itself, or a folder of a
    shared storage named after the study and the results folder (so that folders never collide)."""
    if default:
        return storage
    return f"{storage}/kdbench-{name}-{hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]}"


def find(root: str) -> dict[tuple[str, int], dict]:
    """The latest checkpoint of each (config_id, seed) under ``root``: ``{"uri", "epoch", "batch", "history", "pid",
    "trial_id", "lineage"}``
    (``epoch``: epochs done; ``batch``: batches of the next one done, where the checkpoint is mid-epoch;
    ``history``: the per-epoch metrics up to that epoch; ``pid``: the process that wrote it; ``trial_id``: its trial's;
    ``lineage``: see :func:`lineage`)."""
    try:
        fs, path = _fs(root)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except FS_ERRORS:  # an unreachable storage has nothing to resume from
        return {}
    latest: dict[tuple[str, int], dict] = {}
    for info in infos:
        if not info.path.endswith("/" + META_FILE):
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                meta = json.loads(f.read())
        except FS_ERRORS:  # a checkpoint being written when the run was killed (bad JSON is a ValueError)
            continue
        folder = info.path[: -len(META_FILE) - 1]
        # Ray copies a checkpoint's files in no particular order: one a kill cut short is not usable.
        state = fs.get_file_info(f"{folder}/{STATE_FILE}")
        if state.type == pafs.FileType.NotFound or state.size != meta.get("state_bytes"):
            continue
        key = (str(meta["config_id"]), int(meta["seed"]))
        at = (int(meta["epoch"]), int(meta.get("batch", 0)))
        if key not in latest or at > (latest[key]["epoch"], latest[key]["batch"]):
            uri = folder if "://" not in root else root.split("://")[0] + "://" + folder
            latest[key] = {"uri": uri, "epoch": at[0], "batch": at[1], "history": meta.get("history", []),
                           "pid": meta.get("pid"), "trial_id": meta.get("trial_id", ""), "lineage": meta.get("lineage", "")}
    return latest


def lineage(earlier: dict, trial_id: str) -> str:
    """The id of the first trial of a chain of resumes, which a trial resumed from ``earlier`` (a checkpoint
    :func:`find` found, or ``{}``) continues: its tracker runs are that trial's (see :mod:`kdbench.trackers`)."""
    return earlier.get("lineage") or earlier.get("trial_id") or trial_id


def remove(where) -> bool:
    """Delete a checkpoint folder or a whole storage root, given as a URI or a Ray ``Checkpoint``.

    Best effort, as clean-up after a finished trial must never fail the search: returns whether it
    is gone (False when the storage refused; what was already gone counts as removed).
    """
    try:
        fs, path = (where.filesystem, where.path) if hasattr(where, "filesystem") else _fs(where)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except FS_ERRORS:
        return False
    return True


def save(folder: Path, state: dict, meta: dict) -> None:
    """Write a checkpoint folder: the state and its description, which records the state's size (a
    resume uses only checkpoints whose state arrived whole)."""
    torch.save(state, Path(folder) / STATE_FILE)
    meta = {**meta, "state_bytes": (Path(folder) / STATE_FILE).stat().st_size}
    (Path(folder) / META_FILE).write_text(json.dumps(meta))


def load(folder: Path) -> dict:
    """The state of a checkpoint folder, on the CPU, read with ``weights_only=True``."""
    return load_tensors(Path(folder) / STATE_FILE)


def save_student(folder: Path, blob: dict) -> None:
    """A finished trial's checkpoint folder: its trained student (see :func:`kdbench.results.student_file`)."""
    torch.save(blob, Path(folder) / STUDENT_FILE)


def read_student(checkpoint) -> dict | None:
    """The student a finished trial's Ray ``Checkpoint`` holds, on the CPU; None when it holds none."""
    import io

    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STUDENT_FILE}") as f:
            raw = f.read()
    except FS_ERRORS:
        return None
    return load_tensors(io.BytesIO(raw))
