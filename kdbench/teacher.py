"""The teacher: trained once through :func:`~kdbench.train.distill`, or read from a checkpoint file, and cached.

Either way the cache file holds the weights, the train-split class centroids and metadata (how it was
made, its val/test top-1), and is read with ``weights_only=True``. Trained teachers are keyed by
(data set, split seed, architecture, recipe, seed); checkpoint teachers by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from .data import Data, DataError, cache_dir, load_data
from .measure import evaluate, forward_all
from .geometry import class_centroids
from .models import build_model, count_parameters, fitting_models
from .methods import METHODS
from .settings import Recipe, fields_dict
from .state import first_line, load_tensors
from .train import Teacher, TrainConfig, distill

__all__ = ["get_teacher", "load_teacher", "study_data", "teacher_key", "read_state_dict", "load_strict", "file_digest"]

CACHE_VERSION = 2  # 2: the CIFAR ResNets under RepDistiller's parameter names
CHECKPOINT_KEYS = ("state_dict", "model", "net")  # where RepDistiller, mdistiller and most trainers keep the weights


def teacher_key(data: Data, split_seed: int, arch: str, how: dict) -> str:
    """``how``: ``{"recipe": ..., "seed": ...}`` for a trained teacher, ``{"checkpoint": sha256}`` for a file."""
    spec = {"v": CACHE_VERSION, "dataset": data.name, "split_seed": split_seed, "arch": arch, **how}
    if data.key:  # non-default data options or an image folder's contents (old keys stay valid)
        spec["data"] = data.key
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _cache_path(data: Data, arch: str, key: str) -> Path:
    return cache_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', data.name)[-48:]}-{arch.replace(':', '_')}-{key}.pt"


def load_teacher(source: str | Path | dict, data: Data) -> Teacher:
    """A teacher on ``data``'s device, from a cache file (read with ``weights_only=True``) or from the
    blob ``{"state_dict", "centroids", "meta"}`` that :meth:`Teacher.blob` gives (how trials on other
    machines of a Ray cluster receive it)."""
    device = data.device
    blob = source if isinstance(source, dict) else load_tensors(source, map_location=device)
    meta = blob["meta"]
    model = build_model(meta["arch"], data.num_classes, data.in_channels).to(device)
    model.load_state_dict(blob["state_dict"])
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    path = {"path": str(source)} if not isinstance(source, dict) else {}
    return Teacher(model, blob["centroids"].to(device), {**meta, **path})


def _save(path: Path, model, centroids, meta: dict) -> Teacher:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "centroids": centroids.cpu(), "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written teacher
    return Teacher(model, centroids, {**meta, "path": str(path)})


def get_teacher(data: Data, arch: str, recipe: Recipe, seed: int = 0, split_seed: int = 0,
                report: Callable[[dict], None] | None = None, use_cache: bool = True,
                checkpoint: str | Path | None = None, option: str = "--teacher-checkpoint") -> tuple[Teacher, bool]:
    """The teacher for ``data``: loaded from the cache, else trained now (or read from ``checkpoint``) and cached.

    Returns ``(teacher, cache_hit)``.
    """
    if checkpoint:
        return _from_checkpoint(Path(checkpoint).expanduser(), data, arch, split_seed, use_cache, option)
    key = teacher_key(data, split_seed, arch, {"recipe": fields_dict(recipe), "seed": seed})
    path = _cache_path(data, arch, key)
    if use_cache and path.is_file():
        return load_teacher(path, data), True
    with _training(path):  # another process training this teacher now: wait for it, then read what it cached
        if use_cache and path.is_file():
            return load_teacher(path, data), True
        return _train(path, data, arch, recipe, seed, split_seed, key, report), False


@contextmanager
def _training(path: Path):
    """An exclusive lock on ``path``'s ``.lock`` file (POSIX; elsewhere none) while its teacher is trained."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


def _train(path, data, arch, recipe, seed, split_seed, key, report) -> Teacher:
    result = distill(TrainConfig(arch, METHODS["baseline"], recipe, seed, eval_val="every_epoch", eval_test="every_epoch"),
                     data, report=report)
    model = result.model.eval().requires_grad_(False)
    feats, _ = forward_all(model, "train", data)
    meta = {"dataset": data.name, "arch": arch, "seed": seed, "split_seed": split_seed, "key": key,
            "recipe": fields_dict(recipe), **result.metrics, "autocast": result.precision}
    return _save(path, model, class_centroids(feats, data.labels("train"), data.num_classes).clone(), meta)


def study_data(study, data_root: str | None = None, download: bool = False, device="cpu",
               report: Callable[[dict], None] | None = None) -> tuple[Data, Teacher, bool]:
    """A study's data set (on ``device``, with its ``[data]`` options) and teacher (from the cache, trained,
    or read from its ``teacher_checkpoint``): what tune, confirm and rerun start from."""
    root = str(Path(data_root or study.data_root).expanduser().resolve())
    data = load_data(study.dataset, root, study.split_seed, download, device, study.data_options)
    teacher, hit = get_teacher(data, study.teacher, study.teacher_recipe, study.teacher_seed, study.split_seed,
                               report, checkpoint=study.teacher_checkpoint or None)
    return data, teacher, hit


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def read_state_dict(path: Path, option: str = "--teacher-checkpoint") -> dict:
    """The state_dict a checkpoint file holds: the file itself, or its ``state_dict``, ``model`` or ``net``
    entry; read with ``weights_only=True`` (a file that carries code is refused); a DataParallel
    ``module.`` prefix is removed. Errors name ``option``, the command's own name for the file."""
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    try:
        obj = load_tensors(path)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = first_line(e)
        code = "weights_only" in str(e) or "Unsupported global" in str(e)  # torch's advice on unsafe loading: left out
        why = "it carries code or objects other than tensors" if code else f"not a PyTorch checkpoint ({first[:160]})"
        raise DataError(f"{option} {path}: cannot be read with weights_only=True: {why}; "
                        f"allowed: a state_dict, or a dict holding one under {', '.join(CHECKPOINT_KEYS)}") from None
    state = obj if _is_state_dict(obj) else next(
        (obj[k] for k in CHECKPOINT_KEYS if isinstance(obj, dict) and _is_state_dict(obj.get(k))), None)
    if state is None:
        found = f"a dict with keys {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{option} {path}: holds {found}, not a state_dict; allowed: a state_dict, or a "
                        f"dict holding one under {', '.join(CHECKPOINT_KEYS)}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def model_in_channels(model) -> int:
    """The input channels of a model's first convolution (3 where it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def load_strict(model, state: dict, path: Path, arch: str, num_classes: int, option: str = "--teacher-checkpoint") -> None:
    """Load ``state`` into ``model`` with ``strict=True``, or one line naming what does not fit (and the zoo
    architecture its keys do fit, if any)."""
    own = model.state_dict()
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{len(x)} {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
                 for x, what in ((missing, "missing"), (unexpected, "unexpected")) if x]
        fits = fitting_models(state, model_in_channels(model))
        hint = f"; its keys fit {', '.join(fits)}" if fits else ""
        raise DataError(f"{option} {path}: does not fit {arch}: {' and '.join(parts)} keys{hint}; allowed: "
                        f"a state_dict of {arch} itself")
    for k, v in own.items():
        if v.shape != state[k].shape:
            if v.ndim and v.shape[0] == num_classes and v.shape[1:] == state[k].shape[1:]:  # the classifier
                raise DataError(f"{option} {path}: its classifier {k} has {state[k].shape[0]} classes, the "
                                f"data set {num_classes}; allowed: a model trained on these classes")
            fits = fitting_models(state, model_in_channels(model))
            hint = f"; its keys and shapes fit {', '.join(fits)}" if fits else ""
            raise DataError(f"{option} {path}: {k} has shape {tuple(state[k].shape)}, {arch} needs "
                            f"{tuple(v.shape)}{hint}; allowed: a state_dict of {arch} itself")
    model.load_state_dict(state, strict=True)


def _from_checkpoint(path: Path, data: Data, arch: str, split_seed: int, use_cache: bool,
                     option: str = "--teacher-checkpoint") -> tuple[Teacher, bool]:
    """A teacher read from a checkpoint: evaluated once (val and test top-1, kNN), centroids computed, cached
    by the file's hash: no training at all."""
    state = read_state_dict(path, option)
    digest = file_digest(path)
    key = teacher_key(data, split_seed, arch, {"checkpoint": digest})
    cached = _cache_path(data, arch, key)
    if use_cache and cached.is_file():
        return load_teacher(cached, data), True
    t0 = time.perf_counter()
    device = data.device
    model = build_model(arch, data.num_classes, data.in_channels)
    load_strict(model, state, path, arch, data.num_classes, option)
    model = model.to(device).eval().requires_grad_(False)
    feats, _ = forward_all(model, "train", data)
    metrics = {**(evaluate(model, data, "val") if data.size("val") else {}),
               **evaluate(model, data, "test", knn=(feats, data.labels("train")))}
    meta = {"dataset": data.name, "arch": arch, "seed": None, "split_seed": split_seed, "key": key,
            "recipe": None, "checkpoint": str(path.resolve()), "checkpoint_sha256": digest, **metrics,
            "best_test_top1": metrics["test_top1"], "params": count_parameters(model), "epochs": 0,
            "train_seconds": 0.0, "eval_seconds": time.perf_counter() - t0}
    return _save(cached, model, class_centroids(feats, data.labels("train"), data.num_classes).clone(), meta), False
