"""The model zoo against RepDistiller's and mdistiller's own model code: checkpoints load strictly, the numbers agree.

    python -m benchmarks.zoo --repdistiller PATH [--json FILE]
    python -m benchmarks.zoo --mdistiller PATH [--json FILE]

``--mdistiller``: PATH holds mdistiller's ``mdistiller/models/imagenet/`` (its ImageNet ResNet-18/34/50, whose
parameter names are torchvision's, and MobileNetV1), checked the same way at 224x224 against ``tv:resnet18``,
``tv:resnet34``, ``tv:resnet50`` and kdbench's ``MobileNetV1``, 1000 classes: logits, features, its ``feats``
and ``preact_feats``.

PATH is a checkout of HobbitLong/RepDistiller (not part of kdbench; its code is imported from there at run
time, never copied). For each of the 24 names (its ``model_dict`` and the ResNet18/34 of ``resnetv2.py``):
build RepDistiller's model for 100 classes, train it for a few steps (so BN statistics are not trivial),
save it the way its ``train_teacher.py`` does (``{'epoch', 'model': state_dict, 'accuracy', 'optimizer'}``),
read that file with kdbench's checkpoint reader into kdbench's model with ``strict=True``, and compare in
eval mode on the same input: logits, pooled features, stage maps and pre-activation maps (max abs error,
relative to the reference's max abs value). Not part of the test suite: CI has no RepDistiller.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from kdbench.models import build_model
from kdbench.teacher import read_state_dict

NAMES = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
         "ResNet18", "ResNet34", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
         "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


def _reference(name: str):
    models = importlib.import_module("models")
    if name in ("ResNet18", "ResNet34"):
        return getattr(importlib.import_module("models.resnetv2"), name)(num_classes=100)
    return models.model_dict[name](num_classes=100)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _step_and_load(ref, name: str, classes: int, size: int, batch: int, steps: int, logits_of, saved, path: Path):
    """A few SGD steps of the authors' model (BN statistics and weights away from their initial values), saved as
    ``saved(state_dict, optimiser)`` (their own format), read by kdbench into its model strictly; both in eval mode."""
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    ref.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size)
        loss = torch.nn.functional.cross_entropy(logits_of(ref(x)), torch.randint(0, classes, (batch,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(saved(ref.state_dict(), opt), path)
    ours = build_model(name, classes, 3)
    ours.load_state_dict(read_state_dict(path), strict=True)
    return ref.eval(), ours.eval()


def check(name: str, folder: Path) -> dict:
    torch.manual_seed(0)
    ref, ours = _step_and_load(_reference(name), name, 100, 32, 8, 3, lambda out: out,
                               lambda state, opt: {"epoch": 240, "model": state, "accuracy": 0.0, "optimizer": opt.state_dict()},
                               folder / f"{name}_ckpt_epoch_240.pth")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats, logits = ref(x, is_feat=True)
        pre = ref(x, is_feat=True, preact=True)
        pre_feats = pre[0] if isinstance(pre, tuple) else pre[0]  # resnetv2 returns a list [feats, logits]
        s = ours.forward_stages(x)
    maps, pooled = feats[:-1], feats[-1]
    return {"name": name, "keys": len(ref.state_dict()), "strict_load": True,
            "shapes_match": [tuple(m.shape) for m in maps] == [tuple(m.shape) for m in s.maps],
            "logits": _rel(s.logits, logits), "features": _rel(s.features, pooled),
            "maps": max(_rel(a, b) for a, b in zip(s.maps, maps)),
            "preact": max(_rel(a, b) for a, b in zip(s.preact, pre_feats[:-1]))}


IMAGENET = {"tv:resnet18": "resnet18", "tv:resnet34": "resnet34", "tv:resnet50": "resnet50", "MobileNetV1": "MobileNetV1"}


def _mdistiller(name: str, root: Path):
    """mdistiller's ImageNet model ``name``, its module loaded from its file (no mdistiller package import)."""
    module = "mobilenetv1" if name == "MobileNetV1" else "resnet"
    spec = importlib.util.spec_from_file_location(f"mdistiller_{module}", root / "mdistiller/models/imagenet" / f"{module}.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return getattr(m, name)()


def check_imagenet(name: str, folder: Path, root: Path) -> dict:
    torch.manual_seed(0)
    ref, ours = _step_and_load(_mdistiller(IMAGENET[name], root), name, 1000, 224, 4, 2, lambda out: out[0],
                               lambda state, opt: state, folder / f"{IMAGENET[name]}.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, feats = ref(x)
        s = ours.forward_stages(x)
        features, plain_logits = ours(x)
    return {"name": name, "keys": len(ref.state_dict()), "strict_load": True,
            "shapes_match": [tuple(m.shape) for m in feats["feats"]] == [tuple(m.shape) for m in s.maps],
            "logits": max(_rel(s.logits, logits), _rel(plain_logits, logits)),
            "features": max(_rel(s.features, feats["pooled_feat"]), _rel(features, feats["pooled_feat"])),
            "maps": max(_rel(a, b) for a, b in zip(s.maps, feats["feats"])),
            "preact": max(_rel(a, b) for a, b in zip(s.preact, feats["preact_feats"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0])
    authors = p.add_mutually_exclusive_group(required=True)
    authors.add_argument("--repdistiller", type=Path, help="a checkout of HobbitLong/RepDistiller")
    authors.add_argument("--mdistiller", type=Path, help="a checkout of megvii-research/mdistiller")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.repdistiller:
        sys.path.insert(0, str(a.repdistiller.resolve()))
    names = NAMES if a.repdistiller else list(IMAGENET)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            r = check(name, Path(d)) if a.repdistiller else check_imagenet(name, Path(d), a.mdistiller.resolve())
            rows.append(r)
            print(f"{name:13s} keys {r['keys']:4d}  strict load ok  max rel. error: logits {r['logits']:.1e}  "
                  f"features {r['features']:.1e}  maps {r['maps']:.1e}  preact {r['preact']:.1e}", flush=True)
    worst = max(max(r["logits"], r["features"], r["maps"], r["preact"]) for r in rows)
    print(f"{len(rows)} architectures; worst relative error {worst:.1e} (tolerance 1e-4)")
    if a.json:
        a.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows, "worst": worst}, indent=2) + "\n")
    return 0 if worst <= 1e-4 and all(r["shapes_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
