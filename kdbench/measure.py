"""Measuring a model on a split: its features and logits, and every metric of :mod:`kdbench.metrics` on them.

Everything here runs without augmentation, in eval mode, under ``torch.inference_mode()``; none of it
touches the training state, so when a run evaluates never changes how it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from . import parallel
from .data import Data, normalize
from .downstream import clustering, retrieval
from .geometry import class_centroids, similarity_matrix
from .metrics import METRICS

__all__ = ["DivergedError", "resolve_precision", "peak_memory_mib", "autocast", "prepare", "forward_all", "reference", "evaluate",
           "teacher_views", "SplitOutputs"]


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where ``precision`` resolves to "bf16" (see :func:`resolve_precision`), on CUDA and CPU
    alike; else a no-op context."""
    on = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)




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
def forward_all(model: nn.Module, source: str | torch.Tensor, data: Data, batch_size: int = 1000,
                rows: torch.Tensor | None = None, spread: bool = False):
    """Features ``(N, d)`` and logits ``(N, C)`` of ``model`` in eval mode over split ``source`` of ``data`` (in
    the split's order, or its ``rows``; not augmented: :meth:`Data.chunks`), or over a tensor of uint8 images.
    ``spread``: every data-parallel worker calls it together; each forwards its contiguous share of the rows and
    all of them get every row back, in order (one process: the same pass)."""
    w = parallel.world() if spread and isinstance(source, str) else parallel.World()
    if w.size > 1:
        shares = torch.tensor_split(torch.arange(data.size(source)) if rows is None else rows, w.size)
        f, z = forward_all(model, source, data, batch_size, shares[w.rank])
        n = [len(s) for s in shares]
        return parallel.all_rows(f, n), parallel.all_rows(z, n)
    was_training = model.training
    model.eval()
    feats, logits = [], []
    chunks = data.chunks(source, batch_size, rows) if isinstance(source, str) else \
        ((source[i:i + batch_size], None) for i in range(0, source.shape[0], batch_size))
    with autocast(data.device):
        for x, _ in chunks:
            f, z = model(prepare(x, data))
            feats.append(f.float())
            logits.append(z.float())
    model.train(was_training)
    d = getattr(model, "feature_dim", 0)
    return (torch.cat(feats), torch.cat(logits)) if feats else \
        (torch.zeros(0, d, device=data.device), torch.zeros(0, data.num_classes, device=data.device))


@dataclass
class SplitOutputs:
    """One split's student outputs and what its metrics compare them with: what every
    :class:`kdbench.metrics.Metric` computes from. The shared intermediate results (the centroid similarity
    matrix, retrieval's two scores, one k-means) are computed once, on first use."""

    features: torch.Tensor  # (N, d) pooled penultimate features
    logits: torch.Tensor  # (N, C)
    labels: torch.Tensor  # (N,)
    num_classes: int
    teacher_features: torch.Tensor | None = None  # (N, d_t): the teacher's features on the same images
    teacher_similarity: torch.Tensor | None = None  # (C, C): the teacher's centroid similarity matrix on the split
    reference_features: torch.Tensor | None = None  # (N_train, d): the student's training-split features
    reference_labels: torch.Tensor | None = None  # (N_train,)

    @cached_property
    def similarity(self) -> torch.Tensor:
        """(C, C): cosine similarities of the student's class centroids on the split."""
        return similarity_matrix(class_centroids(self.features, self.labels, self.num_classes))

    @cached_property
    def retrieval(self) -> dict:
        return retrieval(self.features, self.labels, self.reference_features, self.reference_labels)

    @cached_property
    def clusters(self) -> dict:
        return clustering(self.features, self.labels, self.num_classes)


class DivergedError(RuntimeError):
    """The training loss, or the student's outputs on a split, became NaN or infinite."""


def reference(model: nn.Module, data: Data, rows: torch.Tensor | None = None, spread: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN's and retrieval's reference set: ``model``'s features on the training split (or its ``rows``, see
    :func:`kdbench.data.reference_rows`) and their labels. ``spread``: see :func:`forward_all`."""
    labels = data.labels("train")
    return forward_all(model, "train", data, rows=rows, spread=spread)[0], labels if rows is None else labels[rows]


def evaluate(model: nn.Module, data: Data, split: str, teacher_view: dict | None = None,
             knn: bool | tuple[torch.Tensor, torch.Tensor] = False, keep: dict | None = None, spread: bool = False
             ) -> dict[str, float]:
    """Every metric of :data:`kdbench.metrics.METRICS` on ``split`` without augmentation, prefixed ``<split>_``.

    ``teacher_view`` holds the teacher's features and similarity matrix on the same split; without it the metrics
    that compare with the teacher are left out. ``knn``: True (every training image), or the reference
    (:func:`reference`) when the caller already has it (one pass serves every split): then the ``final`` metrics too
    (kNN, retrieval, clustering).
    ``keep``: a dict that receives the student's centroid-similarity matrix of the split (float32, on the CPU).
    ``spread``: every data-parallel worker calls it together and gets the metrics (see :func:`forward_all`).
    """
    f, z = forward_all(model, split, data, spread=spread)
    if not (torch.isfinite(f).all() and torch.isfinite(z).all()):  # one check a pass: k-means and the rest need numbers
        raise DivergedError(f"the model's features or logits on {split} are not finite")
    o = SplitOutputs(f, z, data.labels(split), data.num_classes)
    if teacher_view is not None:
        o.teacher_features, o.teacher_similarity = teacher_view["features"], teacher_view["S"]
        if keep is not None:
            keep[split] = o.similarity.float().cpu().numpy()
    if knn is not False:
        o.reference_features, o.reference_labels = knn if isinstance(knn, tuple) else reference(model, data, spread=spread)
    return {f"{split}_{name}": float(m.compute(o)) for name, m in METRICS.items()
            if (teacher_view is not None or not m.teacher) and (knn is not False or not m.final)}


def teacher_views(teacher: nn.Module, data: Data, spread: bool = False) -> dict:
    """The teacher's fixed views of the evaluation splits: ``{split: {"features", "S"}}`` (its features and its
    centroid-similarity matrix), what every student's geometry is measured against. Splits without images
    (``val_fraction = 0``) are left out. ``spread``: see :func:`forward_all`."""
    teacher.eval()
    views = {}
    for split in ("val", "test"):
        if data.size(split) == 0:
            continue
        f, _ = forward_all(teacher, split, data, spread=spread)
        views[split] = {"features": f.clone(),
                        "S": similarity_matrix(class_centroids(f, data.labels(split), data.num_classes)).clone()}
    return views
