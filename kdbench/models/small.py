"""Small CNNs for the embedded 8x8 digits set (``cnn_teacher``, ``cnn_student``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Net, Stages, pool

__all__ = ["SmallCNN"]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class SmallCNN(Net):
    """conv-BN-ReLU (the stem), conv-BN-ReLU, 2x2 max-pool (8x8 -> 4x4), conv-BN-ReLU, average pool, linear.

    Stage maps: the stem (a x 8 x 8), the second conv (a x 8 x 8), the third (b x 4 x 4); pre-activations
    are the same maps before their ReLU (the stem's after it, as the CIFAR models give theirs).
    """

    def __init__(self, widths: tuple[int, int], num_classes: int, in_channels: int = 1):
        super().__init__()
        a, b = widths
        self.body = nn.Sequential(_conv_bn(in_channels, a), nn.ReLU(inplace=True), _conv_bn(a, a), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2), _conv_bn(a, b), nn.ReLU(inplace=True))
        self.feature_dim = b
        self.fc = nn.Linear(b, num_classes)

    def forward_stages(self, x) -> Stages:
        body = self.body
        stem = F.relu(body[0](x))  # (B, a, 8, 8)
        pre1 = body[2](stem)
        m1 = F.relu(pre1)
        pre2 = body[5](body[4](m1))  # (B, b, 4, 4)
        m2 = F.relu(pre2)
        f = pool(m2)
        return Stages([stem, m1, m2], [stem, pre1, pre2], f, self.fc(f))

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BNs before the ReLUs of the two stages (OFD's margins)."""
        return [self.body[2][1], self.body[5][1]]
