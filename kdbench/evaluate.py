"""Evaluation: a model's features and logits over a split, and the metrics of DESIGN §5 on them.

Everything here runs without augmentation, in eval mode, under ``torch.inference_mode()``; none of it
touches the training state, so when a run evaluates never changes how it trains.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import Data, normalize
from .downstream import clustering, retrieval
from .geometry import class_centroids, geom_err, geometry_corr, knn_top1, linear_cka, similarity_matrix

__all__ = ["PRECISIONS", "resolve_precision", "peak_memory_mib", "autocast", "prepare", "forward_all", "evaluate", "teacher_views",
           "FINAL"]


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where ``precision`` resolves to "bf16" (see :func:`resolve_precision`), on CUDA and CPU
    alike; else a no-op context."""
    on = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that has it, fp32 elsewhere (a V100, the CPU); bf16 asked for where the
    device cannot run it: ValueError (one line)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision = bf16: {torch.cuda.get_device_name(device)} has no bf16; allowed here: fp32, auto")
    return precision


def peak_memory_mib(device: torch.device) -> float:
    """The device's peak memory so far: CUDA's max allocated, else this process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prepare(x: torch.Tensor, data: Data) -> torch.Tensor:
    x = normalize(x, data.mean, data.std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


@torch.inference_mode()
def forward_all(model: nn.Module, x: torch.Tensor, data: Data, batch_size: int = 1000):
    """Features ``(N, d)`` and logits ``(N, C)`` of ``model`` in eval mode over uint8 images ``x``."""
    was_training = model.training
    model.eval()
    feats, logits = [], []
    with autocast(x.device):
        for i in range(0, x.shape[0], batch_size):
            f, z = model(prepare(x[i:i + batch_size], data))
            feats.append(f.float())
            logits.append(z.float())
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


# Measures of a student's features computed beside kNN at the end of a run (or at every evaluated epoch, where a
# search's objective needs one): retrieval against the training split, clustering of the split. See downstream.py.
FINAL = ("knn_top1", "map_at_r", "r_at_1", "nmi", "ari")


def evaluate(model: nn.Module, data: Data, split: str, teacher_view: dict | None = None,
             knn: bool | torch.Tensor = False, keep: dict | None = None) -> dict[str, float]:
    """Metrics of DESIGN §5 on ``split`` without augmentation, prefixed ``<split>_``.

    ``teacher_view`` holds the teacher's features and similarity matrix on the same split; without
    it only top-1 (and the final measures) are computed. ``knn``: True, or the model's train-split features
    when the caller already has them (one pass serves every split): then the :data:`FINAL` measures too.
    ``keep``: a dict that receives the student's centroid-similarity matrix of the split (float32, on the CPU).
    """
    x, y = data.split(split)
    f, z = forward_all(model, x, data)
    out = {"top1": (z.argmax(1) == y).float().mean() * 100}
    if teacher_view is not None:
        s = similarity_matrix(class_centroids(f, y, data.num_classes))
        out |= {"geom_corr": geometry_corr(s, teacher_view["S"]), "geom_err": geom_err(s, teacher_view["S"]),
                "cka": linear_cka(f, teacher_view["features"])}
        if keep is not None:
            keep[split] = s.float().cpu().numpy()
    if knn is not False:
        ref_f = knn if isinstance(knn, torch.Tensor) else forward_all(model, data.train_x, data)[0]
        out["knn_top1"] = knn_top1(ref_f, data.train_y, f, y, data.num_classes)
        out |= retrieval(f, y, ref_f, data.train_y) | clustering(f, y, data.num_classes)
    return {f"{split}_{k}": float(v) for k, v in out.items()}


def teacher_views(teacher: nn.Module, data: Data) -> dict:
    """The teacher's fixed views of the evaluation splits: ``{split: {"features", "S"}}`` (its features and its
    centroid-similarity matrix), what every student's geometry is measured against. Splits without images
    (``val_fraction = 0``) are left out."""
    teacher.eval()
    views = {}
    for split in ("val", "test"):
        x, y = data.split(split)
        if len(x) == 0:
            continue
        f, _ = forward_all(teacher, x, data)
        views[split] = {"features": f.clone(), "S": similarity_matrix(class_centroids(f, y, data.num_classes)).clone()}
    return views
