"""Teacher and student networks: the CIFAR model zoo of RepDistiller and mdistiller under their names and
parameter names (their published checkpoints load with ``strict=True``), small CNNs for the embedded digits
set, and torchvision / timm adapters.

Every model's ``forward(x)`` returns ``(features, logits)``; ``features`` is the pooled penultimate vector
``(B, d)`` and ``model.feature_dim`` is ``d``. ``forward_stages(x)`` also gives the stem and stage feature
maps (:class:`~kdbench.models.base.Stages`: ``.maps``, ``.preact``) that feature-map losses read. Add a
model by writing its constructor in the module of its family and one line in ``MODELS``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .adapters import StagesUnavailable, timm_model, torchvision_model
from .base import Net, Stages
from .mobilenet import mobilenet_v2
from .mobilenetv1 import MobileNetV1
from .resnet import BasicBlock, Bottleneck, cifar_resnet, resnet_v2
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .small import SmallCNN
from .vgg import vgg
from .wrn import wrn

__all__ = ["MODELS", "ALIASES", "build_model", "check_model", "count_parameters", "fitting_models", "Stages", "Net",
           "StagesUnavailable"]

# RepDistiller's model_dict (mdistiller's has the same keys), plus the ResNet18/34 of its resnetv2.py.
MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{d}": cifar_resnet(d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": cifar_resnet(8, [32, 64, 128, 256]),
    "resnet32x4": cifar_resnet(32, [32, 64, 128, 256]),
    "ResNet18": resnet_v2(BasicBlock, [2, 2, 2, 2]),
    "ResNet34": resnet_v2(BasicBlock, [3, 4, 6, 3]),
    "ResNet50": resnet_v2(Bottleneck, [3, 4, 6, 3]),
    **{f"wrn_{d}_{k}": wrn(d, k) for d in (16, 40) for k in (1, 2)},
    **{f"vgg{d}": vgg(d) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": mobilenet_v2(),
    "ShuffleV1": lambda num_classes, in_channels=3: ShuffleNetV1(num_classes, in_channels),
    "ShuffleV2": lambda num_classes, in_channels=3: ShuffleNetV2(num_classes, in_channels),
    # ImageNet: mdistiller's MobileNetV1 (its ResNets are torchvision's: tv:resnet18, tv:resnet34, tv:resnet50).
    "MobileNetV1": lambda num_classes, in_channels=3: MobileNetV1(num_classes, in_channels),
    # The embedded digits set (8x8, one channel).
    "cnn_teacher": lambda num_classes, in_channels=1: SmallCNN((64, 128), num_classes, in_channels),
    "cnn_student": lambda num_classes, in_channels=1: SmallCNN((8, 16), num_classes, in_channels),
}
# kdbench's earlier spellings of the same networks (the paper's ResNet-18/50 pair).
ALIASES = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50"}


def check_model(name: str) -> str:
    """``name`` if kdbench can build it, else a ValueError that says what is allowed: a kdbench model,
    ``tv:NAME`` (any torchvision classification model) or ``timm:NAME`` (any timm model; timm installed)."""
    library, _, arch = name.partition(":")
    if not arch:
        if name not in MODELS and name not in ALIASES:
            raise ValueError(f"{name!r} is unknown; allowed: {', '.join(MODELS)} ({', '.join(ALIASES)} also spelt so), "
                             f"tv:NAME (a torchvision classification model), timm:NAME (a timm model)")
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
        return torchvision_model(arch, num_classes, in_channels)
    if library == "timm":
        return timm_model(arch, num_classes, in_channels)
    return MODELS[ALIASES.get(name, name)](num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fitting_models(state: dict, in_channels: int = 3) -> list[str]:
    """The registered models whose state_dict has exactly ``state``'s keys and shapes (any class count): what a
    checkpoint that fits none of the named architecture was saved from. Built on the meta device (no memory)."""
    import torch

    out = []
    for name, make in MODELS.items():
        with torch.device("meta"):
            own = make(1, in_channels).state_dict()
        if own.keys() == state.keys() and all(v.shape[1:] == state[k].shape[1:] if v.ndim and v.shape[0] == 1
                                              else v.shape == state[k].shape for k, v in own.items()):
            out.append(name)
    return out
