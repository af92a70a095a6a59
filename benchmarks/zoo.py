"""The model zoo against RepDistiller's own model code: checkpoints load strictly, the numbers agree.

    python -m benchmarks.zoo --repdistiller PATH [--json FILE]

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


def check(name: str, folder: Path) -> dict:
    torch.manual_seed(0)
    ref = _reference(name)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    ref.train()
    for _ in range(3):  # a few steps: BN running statistics and weights away from their initial values
        x = torch.randn(8, 3, 32, 32)
        loss = torch.nn.functional.cross_entropy(ref(x), torch.randint(0, 100, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = folder / f"{name}_ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": ref.state_dict(), "accuracy": 0.0, "optimizer": opt.state_dict()}, path)
    ours = build_model(name, 100, 3)
    ours.load_state_dict(read_state_dict(path), strict=True)
    ref.eval()
    ours.eval()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--repdistiller", required=True, type=Path, help="a checkout of HobbitLong/RepDistiller")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    sys.path.insert(0, str(a.repdistiller.resolve()))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in NAMES:
            r = check(name, Path(d))
            rows.append(r)
            print(f"{name:12s} keys {r['keys']:4d}  strict load ok  max rel. error: logits {r['logits']:.1e}  "
                  f"features {r['features']:.1e}  maps {r['maps']:.1e}  preact {r['preact']:.1e}", flush=True)
    worst = max(max(r["logits"], r["features"], r["maps"], r["preact"]) for r in rows)
    print(f"{len(rows)} architectures; worst relative error {worst:.1e} (tolerance 1e-4)")
    if a.json:
        a.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows, "worst": worst}, indent=2) + "\n")
    return 0 if worst <= 1e-4 and all(r["shapes_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
