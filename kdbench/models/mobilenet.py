"""MobileNetV2 at width 0.5 for 32x32 inputs, with the parameter names of RepDistiller's ``mobilenetv2.py``.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, as the CIFAR KD
benchmarks run it (``MobileNetV2`` = RepDistiller's ``mobile_half``: expansion 6, width 0.5, a stride-2
stem, a 1280-wide last 1x1 convolution). Its stage maps have no separate pre-activation (the linear
bottleneck ends in BN): ``preact`` is ``maps``, as RepDistiller returns it.
"""

from __future__ import annotations

from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["MobileNetV2", "mobilenet_v2"]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (``conv.0`` ... ``conv.7``); residual where shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


# (expansion, channels, blocks, first stride) per block group, before the width multiplier.
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# The groups after which a stage map is taken (RepDistiller's f1..f4).
_TAPS = (1, 2, 4, 6)


class MobileNetV2(Net):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 0.5, expand: int = 6):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            cout, layers = int(c * width), []
            for i in range(n):
                layers.append(_InvertedResidual(cin, cout, s if i == 0 else 1, expand if t != 1 else 1))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.feature_dim = last
        init_weights(self, "fan")

    def forward_stages(self, x) -> Stages:
        x = self.conv1(x)
        maps = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in _TAPS:
                maps.append(x)
        f = pool(self.conv2(x))
        return Stages(maps, list(maps), f, self.classifier(f))


def mobilenet_v2():
    return lambda num_classes, in_channels=3: MobileNetV2(num_classes, in_channels)
