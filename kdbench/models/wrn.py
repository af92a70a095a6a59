"""Wide residual networks, with the parameter names of RepDistiller's ``models/wrn.py``.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation blocks (BN-ReLU-conv),
``(depth - 4) / 6`` per stage, stages of 16k, 32k, 64k channels after a 16-channel stem, a final BN-ReLU.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["WideResNet", "wrn"]


class _Block(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 ``convShortcut`` on the activated input where the width changes.
    Returns the output and ``bn1(x)`` (the input's BN before its ReLU: what OFD reads as pre-activation)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.bn1(x)
        a = F.relu(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + out, pre


class _Group(nn.Module):
    """One stage: ``layer`` holds its blocks (RepDistiller's ``NetworkBlock``)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        first = None
        for i, block in enumerate(self.layer):
            x, pre = block(x)
            first = pre if i == 0 else first
        return x, first


class WideResNet(Net):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = _Group(n, ch[0], ch[1], 1), _Group(n, ch[1], ch[2], 2), _Group(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.feature_dim = ch[3]
        init_weights(self, "fan_keep_linear")

    def forward_stages(self, x) -> Stages:
        f0 = self.conv1(x)
        f1, _ = self.block1(f0)
        f2, pre1 = self.block2(f1)  # pre1 = block2's first BN on f1
        f3, pre2 = self.block3(f2)
        pre3 = self.bn1(f3)
        f = pool(F.relu(pre3))
        return Stages([f0, f1, f2, f3], [f0, pre1, pre2, pre3], f, self.fc(f))

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The BNs that make the pre-activations of stages 1..3 (OFD's margins)."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]


def wrn(depth: int, widen: int):
    return lambda num_classes, in_channels=3: WideResNet(depth, widen, num_classes, in_channels)
