"""VGG with batch norm for 32x32 inputs, with the parameter names of RepDistiller's ``models/vgg.py``.

Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015, as the CIFAR KD benchmarks run it:
five conv blocks (``block0..4``, each conv-BN-ReLU with the block's last ReLU taken out to expose the
pre-activation), max-pool between the first four, global average pool, one linear ``classifier``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["VGG", "vgg", "VGG_CONFIGS"]

# Channels per block (RepDistiller's cfg S, A, B, D, E).
VGG_CONFIGS = {8: [[64], [128], [256], [512], [512]],
               11: [[64], [128], [256, 256], [512, 512], [512, 512]],
               13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
               16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
               19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]]}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    layers = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])  # the block's last ReLU is applied outside (pre-activation exposed)


class VGG(Net):
    def __init__(self, cfg: list[list[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(widths, cin))
            cin = widths[-1]
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(2, 2) for _ in range(4))
        self.classifier = nn.Linear(512, num_classes)
        self.feature_dim = 512
        init_weights(self, "fan")

    def forward_stages(self, x) -> Stages:
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        maps, preact, x = [f0], [f0], f0
        for i in range(1, 5):
            if i < 4 or h == 64:  # RepDistiller pools before block4 only at 64x64 inputs
                x = getattr(self, f"pool{i - 1}")(x)
            pre = getattr(self, f"block{i}")(x)
            x = F.relu(pre)
            maps.append(x)
            preact.append(pre)
        f = pool(x)
        return Stages(maps, preact, f, self.classifier(f))

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """Each stage's last BN, before its ReLU (OFD's margins)."""
        return [getattr(self, f"block{i}")[-1] for i in range(1, 5)]


def vgg(depth: int):
    return lambda num_classes, in_channels=3: VGG(VGG_CONFIGS[depth], num_classes, in_channels)
