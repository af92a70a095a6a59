"""Teacher and student networks. Every model's ``forward(x)`` returns ``(features, logits)``.

``features`` is the pooled penultimate vector ``(B, d)``; ``model.feature_dim`` is ``d``.
Add a model by writing one constructor and registering it in ``MODELS``: nothing else changes.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["MODELS", "build_model", "check_model", "count_parameters"]


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, planes, stride)
        self.conv2 = _conv_bn(planes, planes)
        out = planes * self.expansion
        self.shortcut = _conv_bn(cin, out, stride, 1) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(_conv_bn(cin, planes, 1, 1), nn.ReLU(inplace=True),
                                  _conv_bn(planes, planes, stride), nn.ReLU(inplace=True),
                                  _conv_bn(planes, out, 1, 1))
        self.shortcut = _conv_bn(cin, out, stride, 1) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages of blocks, global average pool, linear head.

    ``widths``/``blocks`` give one entry per stage; the first stage keeps the resolution and each
    later one halves it. Covers both the ImageNet-shaped family (resnet18/34/50, stem width 64) and
    RepDistiller's ``resnet8x4``/``resnet32x4`` (3 stages of 64/128/256 after a 32-wide stem).
    """

    def __init__(self, block, blocks: list[int], widths: list[int], stem: int, num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, stem), nn.ReLU(inplace=True))
        layers, cin = [], stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        f = self.layers(self.stem(x))  # (B, d, h, w)
        f = torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)  # (B, d)
        return f, self.fc(f)


class SmallCNN(nn.Module):
    """A small VGG-like CNN for 8x8 inputs (the embedded digits set): two conv stages, avg pool."""

    def __init__(self, widths: tuple[int, int], num_classes: int, in_channels: int = 1):
        super().__init__()
        a, b = widths
        self.body = nn.Sequential(
            _conv_bn(in_channels, a), nn.ReLU(inplace=True), _conv_bn(a, a), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            _conv_bn(a, b), nn.ReLU(inplace=True),
        )
        self.feature_dim = b
        self.fc = nn.Linear(b, num_classes)

    def forward(self, x):
        f = torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)  # (B, d)
        return f, self.fc(f)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda num_classes, in_channels=3: ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], 64, num_classes, in_channels),
    "resnet34": lambda num_classes, in_channels=3: ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes, in_channels),
    "resnet50": lambda num_classes, in_channels=3: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], 64, num_classes, in_channels),
    "resnet8x4": lambda num_classes, in_channels=3: ResNet(BasicBlock, [1, 1, 1], [64, 128, 256], 32, num_classes, in_channels),
    "resnet32x4": lambda num_classes, in_channels=3: ResNet(BasicBlock, [5, 5, 5], [64, 128, 256], 32, num_classes, in_channels),
    "cnn_teacher": lambda num_classes, in_channels=1: SmallCNN((64, 128), num_classes, in_channels),
    "cnn_student": lambda num_classes, in_channels=1: SmallCNN((8, 16), num_classes, in_channels),
}


def check_model(name: str) -> str:
    """``name`` if kdbench can build it, else a ValueError that says what is allowed: a kdbench model,
    ``tv:NAME`` (any torchvision classification model) or ``timm:NAME`` (any timm model; timm installed)."""
    library, _, arch = name.partition(":")
    if not arch:
        if name not in MODELS:
            raise ValueError(f"{name!r} is unknown; allowed: {', '.join(MODELS)}, tv:NAME (a torchvision "
                             f"classification model), timm:NAME (a timm model)")
        return name
    if library == "tv":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)  # classification models only
        if arch not in known:
            raise ValueError(f"{name!r}: torchvision has no classification model {arch!r}; allowed e.g. "
                             f"{', '.join(k for k in known if k.startswith(arch[:3]))[:120] or ', '.join(known[:6])}")
        return name
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"{name!r} needs timm, which is not installed; allowed once installed: "
                             f"pip install \"kdbench[timm]\"") from None
        if not timm.is_model(arch):
            raise ValueError(f"{name!r}: timm has no model {arch!r}; allowed: a name from timm.list_models()")
        return name
    raise ValueError(f"{name!r}: unknown library {library!r}; allowed: tv:NAME, timm:NAME or {', '.join(MODELS)}")


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Construct ``name`` (see :func:`check_model`) with the data set's classes and channels, untrained."""
    library, _, arch = check_model(name).partition(":")
    if library == "tv":
        return _torchvision(arch, num_classes, in_channels)
    if library == "timm":
        return _timm(arch, num_classes, in_channels)
    return MODELS[name](num_classes, in_channels)


def _adapt(model: nn.Module, head: nn.Linear, forward: Callable) -> nn.Module:
    """Give a library model kdbench's ``forward(x) -> (features, logits)`` without renaming a parameter (the
    library's own state_dicts load as they are): the instance's class becomes a subclass with that forward."""
    object.__setattr__(model, "kd_head", head)  # not registered twice: it stays a module at its library path
    model.feature_dim = head.in_features
    base = type(model)
    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": __name__})
    return model


def _torchvision(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A torchvision classifier. Its last ``nn.Linear`` is the head; the features are that layer's input in
    the model's own forward pass (a hook keeps it), so ``logits == head(features)`` exactly."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:  # the stem's first convolution takes the data set's channels
        name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    head.register_forward_pre_hook(lambda module, args: module.__dict__.__setitem__("kd_input", args[0]))
    library_forward = type(model).forward

    def forward(self, x):
        logits = library_forward(self, x)
        return self.kd_head.__dict__.pop("kd_input"), logits

    return _adapt(model, head, forward)


def _timm(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A timm model: features from ``forward_features`` + ``forward_head(pre_logits=True)``, logits from its
    classifier (``get_classifier()``) on them."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    def forward(self, x):
        feats = self.forward_head(self.forward_features(x), pre_logits=True)
        return feats, self.kd_head(feats)

    return _adapt(model, model.get_classifier(), forward)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
