"""What every model of kdbench gives: ``forward(x) -> (features, logits)`` and ``forward_stages(x) -> Stages``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Stages", "Net", "init_weights"]


@dataclass
class Stages:
    """One forward pass, with its stage feature maps.

    ``maps``: the stem's output, then each stage's output ``(B, C_i, H_i, W_i)`` — the tensors RepDistiller's
    models return from ``forward(x, is_feat=True)``, without the pooled last entry. ``preact``: the same list
    with ``preact=True`` (each stage's output before its last ReLU, which OFD and ReviewKD read; None where the
    model defines none). ``features``: the pooled penultimate vector ``(B, d)``; ``logits = head(features)``.
    """

    maps: list[torch.Tensor]
    preact: list[torch.Tensor] | None
    features: torch.Tensor
    logits: torch.Tensor


class Net(nn.Module):
    """A kdbench model: subclasses write ``forward_stages``; ``forward`` is the same pass without the maps
    kept for the caller (they are references to tensors the pass computes anyway: no extra work)."""

    feature_dim: int  # and forward_stages(x) -> Stages, which every family defines

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.forward_stages(x)
        return s.features, s.logits


def pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pool to ``(B, C)``: the fixed ``AvgPool2d`` of the CIFAR models at 32x32, any size here."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """The initialisation each family was published with.

    ``kaiming``: convolutions He-normal (fan_out, ReLU), BN weight 1, bias 0 (the CIFAR ResNets);
    ``fan``: convolutions N(0, sqrt(2 / (k*k*out))), BN 1/0, linear layers N(0, 0.01) with bias 0
    (VGG, MobileNetV2; WRN keeps PyTorch's linear weights: ``fan_keep_linear``); ``default``: PyTorch's.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and scheme == "kaiming":
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Conv2d) and scheme.startswith("fan"):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and scheme != "default":
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear) and scheme == "fan":
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear) and scheme == "fan_keep_linear":
            m.bias.data.zero_()
    return model
