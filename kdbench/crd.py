"""Contrastive representation distillation (Tian et al., ICLR 2020): the parts CRD trains and the memory it keeps.

Student and teacher pooled features are embedded (a linear layer each, to 128-d, L2-normalised). Each side
keeps a memory bank of every training sample's embedding (momentum 0.5). For a batch, each sample's own row
is the positive and ``K`` rows of samples of other classes (RepDistiller's and mdistiller's "exact" mode; drawn
with replacement here, on the device, from the loop's generator) are the negatives: the student's embedding is
scored against the teacher's memory and the teacher's against the student's, ``exp(v . m / T)`` normalised by
a constant ``Z`` fixed at the first batch, and the NCE loss of each direction is summed
(:func:`kdbench.losses.crd_nce`). The banks and ``Z`` are buffers: they go into checkpoints, and a resumed run
continues exactly. Data-parallel, the negatives are drawn for the global batch, ``Z`` is its mean and the banks take
every worker's rows, so that each worker holds what one process would.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .parallel import all_rows, all_sum, world

__all__ = ["CRD"]


class CRD(nn.Module):
    def __init__(self, d_s: int, d_t: int, train_y: torch.Tensor, dim: int = 128, negatives: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        n = train_y.shape[0]
        self.embed_s, self.embed_t = nn.Linear(d_s, dim), nn.Linear(d_t, dim)
        counts = torch.bincount(train_y)
        self.k = int(min(negatives, n - int(counts.max())))  # capped by the smallest set of other-class samples
        self.temperature, self.momentum, self.n = temperature, momentum, n
        stdv = 1.0 / math.sqrt(dim / 3)  # RepDistiller's initialisation of the banks
        self.register_buffer("memory_s", torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # the normalisation constants, set by the first batch
        # Samples sorted by class: a class's samples are order[offset[c] : offset[c] + count[c]].
        self.register_buffer("order", torch.argsort(train_y, stable=True), persistent=False)
        self.register_buffer("offset", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("count", counts, persistent=False)

    def negatives(self, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``(B, K)`` indices of training samples of other classes than each ``y``, uniform, with replacement."""
        c, off = self.count[y][:, None], self.offset[y][:, None]
        w = world()  # data-parallel: drawn for the global batch, this worker's rows taken
        r = torch.rand(y.shape[0] * w.size, self.k, device=y.device, generator=gen)[w.share(y.shape[0] * w.size)]
        r = (r * (self.n - c)).long()
        return self.order[torch.where(r >= off, r + c, r)]  # skip the sample's own class in the sorted order

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor, y: torch.Tensor,
                gen: torch.Generator) -> torch.Tensor:
        v_s = F.normalize(self.embed_s(f_s.float()), dim=1)  # (B, dim)
        v_t = F.normalize(self.embed_t(f_t.float().detach()), dim=1)
        idx = torch.cat([index[:, None], self.negatives(y, gen)], dim=1)  # (B, K + 1): the positive first
        w_s, w_t = self.memory_s[idx].detach(), self.memory_t[idx].detach()  # (B, K + 1, dim)
        out_t = torch.exp(torch.bmm(w_s, v_t[:, :, None]).squeeze(2) / self.temperature)  # teacher vs student bank
        out_s = torch.exp(torch.bmm(w_t, v_s[:, :, None]).squeeze(2) / self.temperature)  # student vs teacher bank
        with torch.no_grad():  # Z: fixed at the first batch (no host sync: a select, not an `if`)
            first = all_sum(torch.stack([out_s.mean(), out_t.mean()])) / world().size * self.n
            self.z.copy_(torch.where(self.z < 0, first, self.z))
        loss = losses.crd_nce(out_s / self.z[0], self.n) + losses.crd_nce(out_t / self.z[1], self.n)
        with torch.no_grad():  # the banks: momentum update of the (global) batch's own rows
            index, v_s, v_t = all_rows(index), all_rows(v_s.detach()), all_rows(v_t)
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                memory.index_copy_(0, index, F.normalize(memory[index] * self.momentum + v.detach() * (1 - self.momentum), dim=1))
        return loss
