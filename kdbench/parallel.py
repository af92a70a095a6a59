"""Data-parallel training: one run on N worker processes that compute what one process would.

Ray Train starts the workers and their process group (NCCL on GPUs, gloo on CPUs; :mod:`kdbench.search`);
:func:`kdbench.train.distill` reads :func:`world` and, where it has more than one worker:

- the study's ``batch_size`` stays the global batch: every worker draws the same epoch order (and a resident
  set's augmentation) from the same seeded generator and trains on its contiguous share of each global batch;
- DDP averages the gradients of the student and of the terms' trainable parts (one bucketed all-reduce, overlapped
  with the backward pass);
- every term that keeps state across samples sees the global batch: the geometry memory's class sums and counts,
  CRD's memory banks, its normalisation constants and its negatives (drawn for the global batch) -- through
  :func:`all_sum` and :func:`all_rows`;
- a measuring pass (the teacher's views, the geometry memory's first centroids, every evaluation) is spread: each
  worker forwards its contiguous share of the split and every worker gets all the features back (:func:`all_rows`),
  then computes every metric from them, as one process would (rank 0 reports them);
- BatchNorm normalises with each worker's own batch statistics, as DDP does by default (what mdistiller's
  DataParallel and torchvision's reference scripts do), or with the global batch's where ``[recipe] sync_bn = true``
  (:class:`SyncBatchNorm`: the same numbers as one process; torch's own runs on GPUs only, this one on gloo too).

With one process every function here is the identity: today's path, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "world", "all_sum", "all_rows", "SyncBatchNorm", "sync_batchnorm"]


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` workers."""

    rank: int = 0
    size: int = 1

    def share(self, n: int) -> slice:
        """The rows of a global batch of ``n`` this worker trains on (``n`` a multiple of ``size``)."""
        b = n // self.size
        return slice(self.rank * b, (self.rank + 1) * b)


def world() -> World:
    """The process group's rank and size, or one process where there is none."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the workers; differentiable where ``t`` requires grad (each worker's gradient is the sum of
    every worker's: the loss each computes from the sum is the same). ``t`` itself with one process."""
    if world().size == 1:
        return t
    import torch.distributed._functional_collectives as funcol  # torch's differentiable collectives

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))


def agree(flag: bool, device) -> bool:
    """Whether any worker says ``flag``: a decision every worker must take together (rank 0's clock asks for a
    mid-epoch checkpoint; every worker reports it). One one-element all-reduce and one host sync."""
    if world().size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_rows(t: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """Every worker's ``t`` concatenated along dim 0 in rank order; not differentiable. ``rows``: how many rows each
    worker holds, where they differ (the collective moves equal shapes: the shorter ones travel padded)."""
    w = world()
    if w.size == 1:
        return t
    longest = max(rows) if rows else t.shape[0]
    if t.shape[0] < longest:
        t = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    out = [torch.empty_like(t) for _ in range(w.size)]
    dist.all_gather(out, t.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, rows)] if rows else out)


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch: each worker's per-channel count, sum and
    sum of squares summed with one differentiable all-reduce; the running statistics updated as one process's
    (unbiased variance). Outside training or with one worker: BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world().size == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), xf.new_full((1,), x.numel() / c)])
        total = all_sum(local)
        s, s2, n = total[:c], total[c:2 * c], total[2 * c]
        mean = s / n
        var = (s2 / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d a :class:`SyncBatchNorm` holding the same parameters and buffers (its
    state_dict's keys unchanged: a checkpoint reads back either way)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.to(next(child.buffers(), torch.empty(0)).device))
        else:
            sync_batchnorm(child)
    return module
