"""Residual networks for 32x32 inputs, with the parameter names of RepDistiller's two ResNet files.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Two families, as the CIFAR
distillation benchmarks use them:

- ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4`` (RepDistiller ``models/resnet.py``): a
  3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks, shortcut ``downsample``, head ``fc``;
  the ``x4`` ones four times as wide.
- ``ResNet18/34/50`` (RepDistiller ``models/resnetv2.py``, kdbench's ``resnet18/34/50``): a 64-wide 3x3
  stem without max-pool, four stages, shortcut ``shortcut``, head ``linear``.

Each block returns its output and its pre-activation (the residual sum before the last ReLU).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "cifar_resnet", "resnet_v2"]


def _conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """1x1 convolution + BN where the shape changes; None (identity) where it does not."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "downsample"):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut
        setattr(self, shortcut, _projection(cin, planes, stride))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = getattr(self, self.shortcut_name)
        pre = out + (x if short is None else short(x))
        return F.relu(pre), pre


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "downsample"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.shortcut_name = shortcut
        setattr(self, shortcut, _projection(cin, planes * 4, stride))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        short = getattr(self, self.shortcut_name)
        pre = out + (x if short is None else short(x))
        return F.relu(pre), pre


class ResNet(Net):
    """Stem ``conv1``/``bn1``, stages ``layer1..N`` (the first keeps the resolution, each later one halves
    it), global average pool, linear head (``fc`` or ``linear``)."""

    def __init__(self, block, blocks: list[int], widths: list[int], stem: int, num_classes: int, in_channels: int = 3,
                 shortcut: str = "downsample", head: str = "fc"):
        super().__init__()
        self.conv1, self.bn1 = _conv3(in_channels, stem), nn.BatchNorm2d(stem)
        cin, self.n_stages, self.head_name = stem, len(blocks), head
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n):
                stage.append(block(cin, w, 2 if (i > 0 and j == 0) else 1, shortcut))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.feature_dim = cin
        setattr(self, head, nn.Linear(cin, num_classes))
        init_weights(self, "kaiming")

    def forward_stages(self, x) -> Stages:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, stem, H, W)
        maps, preact = [x], [x]
        for i in range(1, self.n_stages + 1):
            for block in getattr(self, f"layer{i}"):
                x, pre = block(x)
            maps.append(x)
            preact.append(pre)
        f = pool(x)  # (B, d)
        return Stages(maps, preact, f, getattr(self, self.head_name)(f))

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """Per stage, the BN whose output the last block adds to its shortcut before the ReLU (OFD's margins)."""
        last = [getattr(self, f"layer{i}")[-1] for i in range(1, self.n_stages + 1)]
        return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in last]


def cifar_resnet(depth: int, widths: list[int]):
    """RepDistiller's ``resnet<depth>`` (``widths``: stem, then the three stages)."""
    n = (depth - 2) // 6
    return lambda num_classes, in_channels=3: ResNet(BasicBlock, [n] * 3, widths[1:], widths[0], num_classes,
                                                     in_channels, "downsample", "fc")


def resnet_v2(block, blocks: list[int]):
    """RepDistiller's ``ResNet18/34/50`` (``resnetv2.py``): stages of 64, 128, 256, 512 planes."""
    return lambda num_classes, in_channels=3: ResNet(block, blocks, [64, 128, 256, 512], 64, num_classes, in_channels,
                                                     "shortcut", "linear")


