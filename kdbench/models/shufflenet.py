"""ShuffleNet V1 and V2 for 32x32 inputs, with the parameter names of RepDistiller's ``ShuffleNetv1/v2.py``.

Zhang et al., "ShuffleNet", CVPR 2018 (``ShuffleV1``: groups 3, stages of 240/480/960 channels with
4/8/4 blocks); Ma et al., "ShuffleNet V2", ECCV 2018 (``ShuffleV2``: width 1, stages of 116/232/464,
3/7/3 blocks, a 1024-wide last 1x1 convolution). Both start from a 1x1 convolution to 24 channels at full
resolution, as RepDistiller's CIFAR versions do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Net, Stages, init_weights, pool

__all__ = ["ShuffleNetV1", "ShuffleNetV2", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> view as ``(B, g, C/g, H, W)``, swap the two channel axes, flatten back."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _V1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an average-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid, self.stride = cout // 4, stride
        self.g = 1 if cin == 24 else groups  # the first block's input (24 channels) is not grouped
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, groups=self.g, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x
        return F.relu(pre), pre


class ShuffleNetV1(Net):
    def __init__(self, num_classes: int, in_channels: int = 3, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin = 24
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):  # the first block concatenates its pooled input: it adds w - cin channels
                stage.append(_V1Block(cin, w - (cin if j == 0 else 0), 2 if j == 0 else 1, groups))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        init_weights(self, "default")

    def forward_stages(self, x) -> Stages:
        x = F.relu(self.bn1(self.conv1(x)))
        maps, preact = [x], [x]
        for i in (1, 2, 3):
            for block in getattr(self, f"layer{i}"):
                x, pre = block(x)
            maps.append(x)
            preact.append(pre)
        f = pool(x)
        return Stages(maps, preact, f, self.linear(f))


class _V2Block(nn.Module):
    """Split the channels in half; one half passes, the other goes 1x1-dw3x3-1x1; concatenate, shuffle.
    The pre-activation is the concatenation before the last ReLU, unshuffled (as RepDistiller gives it)."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        c = x.shape[1] // 2
        keep, x2 = x[:, :c], x[:, c:]
        pre = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))))
        return channel_shuffle(torch.cat([keep, F.relu(pre)], 1), 2), torch.cat([keep, pre], 1)


class _V2Down(nn.Module):
    """Stride 2: a depthwise-3x3 + 1x1 branch and a 1x1 + depthwise-3x3 + 1x1 branch, concatenated, shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(Net):
    def __init__(self, num_classes: int, in_channels: int = 3, widths=(116, 232, 464), blocks=(3, 7, 3), last: int = 1024):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin = 24
        for i, (w, n) in enumerate(zip(widths, blocks)):
            setattr(self, f"layer{i + 1}", nn.Sequential(_V2Down(cin, w), *[_V2Block(w) for _ in range(n)]))
            cin = w
        self.conv2, self.bn2 = nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last)
        self.linear = nn.Linear(last, num_classes)
        self.feature_dim = last
        init_weights(self, "default")

    def forward_stages(self, x) -> Stages:
        x = F.relu(self.bn1(self.conv1(x)))
        maps, preact = [x], [x]
        for i in (1, 2, 3):
            layer = getattr(self, f"layer{i}")
            x = layer[0](x)
            for block in layer[1:]:
                x, pre = block(x)
            maps.append(x)
            preact.append(pre)
        f = pool(F.relu(self.bn2(self.conv2(x))))
        return Stages(maps, preact, f, self.linear(f))
