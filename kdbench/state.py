"""What an exact continuation of a run saves and restores beside its weights: tensors moved to the CPU (what a
checkpoint file holds) and every random-number generator's state; and the one way kdbench reads a file of tensors."""

from __future__ import annotations

import re
import warnings

import torch

__all__ = ["to_cpu", "get_rng", "set_rng", "load_tensors", "first_line"]


def load_tensors(source, map_location="cpu"):
    """``torch.load(source, weights_only=True)`` (a path or a file object): tensors and plain containers only, a
    file that carries code is refused. torch's own warnings about the file (e.g. an unusual pickle protocol) are
    not printed: a refusal is the caller's one line, an accepted file needs no comment."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location=map_location, weights_only=True)


def first_line(error: BaseException) -> str:
    """An exception's first line without terminal colour codes (torch's load errors carry some), or its type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def to_cpu(obj):
    """A copy of ``obj`` with every tensor on the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def get_rng(device: torch.device) -> dict:
    """The CPU generator's state, and the device's where it is CUDA."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
