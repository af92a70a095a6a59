"""What an exact continuation of a run saves and restores beside its weights: tensors moved to the CPU (what a
checkpoint file holds) and every random-number generator's state."""

from __future__ import annotations

import torch

__all__ = ["to_cpu", "get_rng", "set_rng"]


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
