"""torchvision (``tv:NAME``) and timm (``timm:NAME``) models in kdbench's contract, their parameter names kept.

``forward(x) -> (features, logits)`` from one pass of the library's own forward; ``forward_stages(x)``
gives the library's stage outputs (timm's ``forward_intermediates``; torchvision's ``layer1..4``,
``trunk_output`` blocks or the last ``features`` module at each resolution). torchvision's ResNets also give
their pre-activations, as mdistiller's ImageNet ResNet returns them (``preact_feats``, what OFD and ReviewKD
read): each stage's last block before its final ReLU, after the stem's output (before the max-pool: after its
ReLU, as in mdistiller, whose in-place ReLU overwrites the BN output it keeps); ``maps`` are the same after the
ReLU; ``bn_before_relu()`` the BNs whose outputs those blocks add.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import Stages

__all__ = ["torchvision_model", "timm_model", "StagesUnavailable"]


class StagesUnavailable(ValueError):
    """A library model whose stage outputs kdbench cannot find."""


def _adapt(model: nn.Module, head: nn.Linear, forward: Callable, forward_stages: Callable) -> nn.Module:
    """Give a library model kdbench's methods without renaming a parameter (the library's own state_dicts load
    as they are): the instance's class becomes a subclass with them."""
    object.__setattr__(model, "kd_head", head)  # not registered twice: it stays a module at its library path
    model.feature_dim = head.in_features
    base = type(model)
    model.__class__ = type(base.__name__, (base,), {"forward": forward, "forward_stages": forward_stages,
                                                     "__module__": __name__})
    return model


def _tv_stage_modules(model: nn.Module) -> tuple[list[nn.Module], bool]:
    """The modules whose outputs are a torchvision model's stages, and whether only the last of each
    resolution counts (a flat ``features`` sequence)."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):  # ResNet, ResNeXt, Wide ResNet: stem ReLU, stages
        return [model.relu, *(getattr(model, f"layer{i}") for i in range(1, 5))], False
    if hasattr(model, "trunk_output"):  # RegNet
        return [model.stem, *model.trunk_output.children()], False
    if isinstance(getattr(model, "features", None), nn.Sequential):  # VGG, MobileNet, EfficientNet, ConvNeXt, ...
        return list(model.features.children()), True
    raise StagesUnavailable(f"{type(model).__name__}: no stage modules found (layer1..4, trunk_output or features)")


def torchvision_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
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

    def forward_stages(self, x):
        if isinstance(self, torchvision.models.ResNet):
            return _resnet_stages(self, x)
        modules, last_per_size = _tv_stage_modules(self)
        outs = []
        hooks = [m.register_forward_hook(lambda mod, args, out: outs.append(out)) for m in modules]
        try:
            features, logits = forward(self, x)
        finally:
            for h in hooks:
                h.remove()
        maps = [o for o in outs if isinstance(o, torch.Tensor) and o.ndim == 4]
        if last_per_size:  # keep each resolution's last output
            maps = [m for i, m in enumerate(maps) if i + 1 == len(maps) or maps[i + 1].shape[-1] != m.shape[-1]]
        return Stages(maps, None, features, logits)

    model = _adapt(model, head, forward, forward_stages)
    if isinstance(model, torchvision.models.ResNet):
        type(model).bn_before_relu = _resnet_bn_before_relu
    return model


def _resnet_stages(model, x) -> Stages:
    """A torchvision ResNet's pass with its stage maps and pre-activations (see the module's docstring); the
    same arithmetic as its own forward, module by module."""
    x = model.relu(model.bn1(model.conv1(x)))
    maps, preact = [x], [x]
    x = model.maxpool(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer[:-1]:
            x = block(x)
        last = layer[-1]
        identity = last.downsample(x) if last.downsample is not None else x
        out = last.relu(last.bn1(last.conv1(x)))
        if hasattr(last, "bn3"):  # Bottleneck
            out = last.bn3(last.conv3(last.relu(last.bn2(last.conv2(out)))))
        else:
            out = last.bn2(last.conv2(out))
        pre = out + identity
        x = torch.relu(pre)
        maps.append(x)
        preact.append(pre)
    features = torch.flatten(model.avgpool(x), 1)
    return Stages(maps, preact, features, model.fc(features))


def _resnet_bn_before_relu(self) -> list[nn.BatchNorm2d]:
    """Per stage, the BN of the last block whose output is added to the shortcut before the ReLU (OFD's
    margins), as mdistiller's ``get_bn_before_relu`` (the stem's BN first)."""
    last = [getattr(self, f"layer{i}")[-1] for i in range(1, 5)]
    return [self.bn1, *(b.bn3 if hasattr(b, "bn3") else b.bn2 for b in last)]


def timm_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A timm model: features from ``forward_features`` + ``forward_head(pre_logits=True)``, logits from its
    classifier (``get_classifier()``) on them; stages from ``forward_intermediates``."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    def forward(self, x):
        feats = self.forward_head(self.forward_features(x), pre_logits=True)
        return feats, self.kd_head(feats)

    def forward_stages(self, x):
        if not hasattr(self, "forward_intermediates"):
            raise StagesUnavailable(f"timm:{arch} has no forward_intermediates: no stage maps")
        final, maps = self.forward_intermediates(x)
        feats = self.forward_head(final, pre_logits=True)
        return Stages(list(maps), None, feats, self.kd_head(feats))

    return _adapt(model, model.get_classifier(), forward, forward_stages)
