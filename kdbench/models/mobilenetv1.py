"""MobileNet-V1 for ImageNet, with the parameter names of mdistiller's ``imagenet/mobilenetv1.py``, so that the
students of its ResNet-50 -> MobileNet-V1 table load with ``strict=True``.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications", 2017: a
stride-2 3x3 stem (``model.0``), then 13 depthwise-separable blocks (``model.1`` ... ``model.13``: 3x3 depthwise
conv, BN, ReLU, 1x1 conv, BN, ReLU), a global average pool and ``fc`` (1024 -> classes). The stages end at blocks
3, 5, 11 and 13 (strides 4, 8, 16, 32); their pre-activations are those blocks' outputs before the last ReLU, as
mdistiller returns them (``preact_feats``), and ``bn_before_relu()`` are the BNs that produce them.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["MobileNetV1"]

# (in, out, stride) of the 13 depthwise-separable blocks.
_BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
           *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
_STAGE_ENDS = (3, 5, 11, 13)


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(Net):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.model = nn.Sequential(stem, *(_separable(*b) for b in _BLOCKS))
        self.fc = nn.Linear(1024, num_classes)
        self.feature_dim = 1024
        init_weights(self, "default")

    def forward_stages(self, x: torch.Tensor) -> Stages:
        maps, preact, start = [], [], 0
        for end in _STAGE_ENDS:
            for block in self.model[start:end]:
                x = block(x)
            pre = self.model[end][:-1](x)
            x = torch.relu(pre)
            maps.append(x)
            preact.append(pre)
            start = end + 1
        f = pool(x)
        return Stages(maps, preact, f, self.fc(f))

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.model[end][-2] for end in _STAGE_ENDS]
