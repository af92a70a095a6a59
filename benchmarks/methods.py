"""kdbench's loss functions against the published implementations they name, on random tensors.

    python -m benchmarks.methods --mdistiller PATH --logit-standardization PATH [--ctkd PATH] [--json FILE]

PATH: checkouts of megvii-research/mdistiller, sunshangquan/logit-standardization-KD and zhengli97/CTKD (not part of
kdbench: their loss functions are imported from there at run time, never copied). DIST is compared with the
formula of the authors' ``dist_kd.py`` (hunto/image_classification_sota), written out here. Stage maps of other
sizes and channel counts where the method allows them. Prints the max relative error of each (tolerance 1e-5).
Not part of the test suite: CI has neither repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch

from kdbench import losses


def _distillers(root: Path) -> dict:
    """Load ``<root>/mdistiller/distillers/*.py`` without the package's __init__ (which needs its engine)."""
    for name in [k for k in sys.modules if k == "mdistiller" or k.startswith("mdistiller.")]:
        del sys.modules[name]
    for pkg, path in (("mdistiller", root / "mdistiller"), ("mdistiller.distillers", root / "mdistiller" / "distillers")):
        m = types.ModuleType(pkg)
        m.__path__ = [str(path)]
        sys.modules[pkg] = m
    out = {}
    names = ("_base", "_common", "AT", "PKT", "NST", "VID", "KD", "DKD")
    names += tuple(n for n in ("CRD", "OFD", "ReviewKD") if (root / f"mdistiller/distillers/{n}.py").is_file())
    for name in names:
        spec = importlib.util.spec_from_file_location(f"mdistiller.distillers.{name}", root / "mdistiller" / "distillers" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        out[name] = mod
    return out


def _dist_reference(zs, zt, beta, gamma, tau):
    cos = lambda a, b, eps=1e-8: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    pearson = lambda a, b: cos(a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1))
    inter = lambda a, b: 1 - pearson(a, b).mean()
    ys, yt = (zs / tau).softmax(1), (zt / tau).softmax(1)
    return tau ** 2 * (beta * inter(ys, yt) + gamma * inter(ys.T, yt.T))


def _crd(theirs) -> float:
    """kdbench's CRD module against mdistiller's CRD loss (embeddings, ContrastMemory, ContrastLoss) with the
    same weights, banks and contrast indices (kdbench's sampler draws them; theirs is given them), two steps."""
    from kdbench.crd import CRD

    theirs.AliasMethod.cuda = lambda self: self  # their memory moves its sampler to CUDA; it is not used here
    torch.manual_seed(1)
    y_all = torch.arange(500) % 10
    ours = CRD(64, 96, y_all, 128, 300)

    class Ref(torch.nn.Module):
        crd_loss = theirs.CRD.crd_loss

    ref = Ref()
    ref.embed_s, ref.embed_t = theirs.Embed(64, 128), theirs.Embed(96, 128)
    ref.contrast = theirs.ContrastMemory(128, 500, 300, 0.07, 0.5)
    ref.criterion_s, ref.criterion_t = theirs.ContrastLoss(500), theirs.ContrastLoss(500)
    ref.embed_s.linear.load_state_dict(ours.embed_s.state_dict())
    ref.embed_t.linear.load_state_dict(ours.embed_t.state_dict())
    ref.contrast.memory_v1.copy_(ours.memory_s)
    ref.contrast.memory_v2.copy_(ours.memory_t)
    worst, gen = 0.0, torch.Generator().manual_seed(2)
    for _ in range(2):
        index = torch.randperm(500)[:32]
        f_s, f_t = torch.randn(32, 64), torch.randn(32, 96)
        state = gen.get_state()
        a = ours(f_s, f_t, index, y_all[index], gen)
        gen2 = torch.Generator()
        gen2.set_state(state)
        contrast = torch.cat([index[:, None], ours.negatives(y_all[index], gen2)], 1)
        b = ref.crd_loss(f_s, f_t, index, contrast)
        worst = max(worst, float((a - b).abs() / b.abs()), float((ours.memory_s - ref.contrast.memory_v1).abs().max()))
    return worst


def _ofd(theirs) -> dict:
    """OFD's margins from a BN's weight and bias (a channel with almost no negative response included) and its
    partial L2 loss, against mdistiller's init_ofd_modules and feat_loss."""
    from types import SimpleNamespace

    bn = torch.nn.BatchNorm2d(64)
    bn.weight.data, bn.bias.data = torch.randn(64) * 0.8, torch.randn(64)
    bn.weight.data[0], bn.bias.data[0] = 0.1, 2.0  # Phi(-20) ~ 0: the -3 s branch
    ref = SimpleNamespace(_align_list=lambda *lists: theirs.OFD._align_list(None, *lists))
    theirs.OFD.init_ofd_modules(ref, [64], [32], [bn])
    margin = losses.ofd_margin(bn.weight.data, bn.bias.data)
    src, tgt = torch.randn(8, 64, 8, 8), torch.randn(8, 64, 8, 8) * 1.5 - 0.3
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))
    return {"ofd margins (64 channels from BN weight and bias)": rel(margin, ref.margins[0].flatten()),
            "ofd partial L2": rel(losses.ofd(src, tgt, margin), theirs.feat_loss(src, tgt, ref.margins[0]))}


def _reviewkd(theirs) -> dict:
    """ReviewKD's HCL loss, and the whole review path — kdbench's ABFs with mdistiller's weights loaded into its
    ABFs, run as its forward_train runs them — for a resnet8x4-like student (stages 64/128/256 at 32/16/8, pooled
    256) and a teacher of other widths (stages 32/64/128, pooled 256)."""
    from kdbench.terms import Shapes, _ReviewParts

    maps = [torch.randn(4, 32, 32, 32)] + [torch.randn(4, c, h, h) for c, h in ((64, 32), (128, 16), (256, 8))]
    feat = torch.randn(4, 256)
    t = [torch.randn(4, 16, 32, 32)] + [torch.randn(4, c, h, h) for c, h in ((32, 32), (64, 16), (128, 8))]
    t_feat = torch.randn(4, 256)
    ours = _ReviewParts(Shapes(256, 256, [tuple(m.shape[1:]) for m in maps], [tuple(m.shape[1:]) for m in t]))
    ref = torch.nn.ModuleList(theirs.ABF(cin, 256, cout, i < 3) for i, (cin, cout) in
                              enumerate(zip((64, 128, 256, 256), (32, 64, 128, 256))))[::-1]
    ref.load_state_dict(ours.abfs.state_dict())
    ours.eval(), ref.eval()
    x = (maps[1:] + [feat[:, :, None, None]])[::-1]
    out, res = ref[0](x[0], out_shape=1)
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], ref[1:], (8, 16, 32), (8, 16, 32)):
        out, res = abf(f, res, shape, out_shape)
        results.insert(0, out)
    t_levels = t[1:] + [t_feat[:, :, None, None]]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    mine = ours(maps, feat)
    near = [f + torch.randn_like(f) for f in t_levels]
    return {"reviewkd hcl (four levels, 32x32 to 1x1)": rel(losses.hcl(near, t_levels), theirs.hcl_loss(near, t_levels)),
            "reviewkd fused maps (ABFs, mdistiller's weights)": max(rel(a, b) for a, b in zip(mine, results)),
            "reviewkd loss through the ABFs": rel(losses.hcl(mine, t_levels), theirs.hcl_loss(results, t_levels))}


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ctkd(root: Path) -> dict:
    """kdbench's ctkd term against the CTKD authors' Global_T (gradient reversal) and DistillKL at epochs 1, 3
    and 12 of their 240-epoch CIFAR-100 run (CosineDecay(0, -1, 10), t_start 1, t_end 20): the loss, the
    temperature's gradient and the student logits' gradient."""
    from kdbench.terms import TERMS, _Temperature
    from kdbench.methods import METHODS

    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # their DistillKL moves the temperature to CUDA
    try:
        temp_global, kd = _load(root / "models" / "temp_global.py", "ctkd_temp"), _load(root / "distiller_zoo" / "KD.py", "ctkd_kd")
        out = {}
        # in float64: the temperature's gradient is a small difference of large terms (float32 leaves ~1e-3 of it)
        zs0, zt = torch.randn(64, 100, dtype=torch.float64) * 3, torch.randn(64, 100, dtype=torch.float64) * 5
        for epoch in (1, 3, 12):
            value = (math.cos(min(epoch, 10) * math.pi / 10) + 1.0) * 0.5 * (0 - (-1)) + (-1)  # their CosineDecay
            mlp, zs_t = temp_global.Global_T().double(), zs0.clone().requires_grad_(True)
            temp = 1 + 20 * torch.sigmoid(mlp(None, None, value))
            theirs = kd.DistillKL()(zs_t, zt, temp)
            theirs.backward()
            parts, zs_o = _Temperature().double(), zs0.clone().requires_grad_(True)
            ours = TERMS["ctkd"].compute({"logits": zs_o, "t_logits": zt, "epoch": epoch, "epochs": 240}, METHODS["ctkd"], parts)
            ours.backward()
            rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))
            out[f"ctkd epoch {epoch} (loss, temperature grad, logit grad)"] = max(
                rel(ours.detach(), theirs.detach()), rel(parts.theta.grad, mlp.global_T.grad), rel(zs_o.grad, zs_t.grad))
        return out
    finally:
        torch.Tensor.cuda = cuda


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods", description=__doc__.splitlines()[0])
    p.add_argument("--mdistiller", required=True, type=Path)
    p.add_argument("--logit-standardization", required=True, type=Path)
    p.add_argument("--ctkd", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rel = lambda x, y: float((x - y).abs().max() / y.abs().max().clamp(min=1e-12))
    ms = [torch.randn(8, 16, 32, 32), torch.randn(8, 32, 16, 16), torch.randn(8, 64, 8, 8), torch.randn(8, 128, 4, 4)]
    mt = [torch.randn(8, 24, 32, 32), torch.randn(8, 48, 32, 32), torch.randn(8, 96, 8, 8), torch.randn(8, 200, 8, 8)]
    fs, ft = torch.randn(64, 256), torch.randn(64, 512)
    zs, zt, y = torch.randn(64, 100) * 3, torch.randn(64, 100) * 5, torch.randint(0, 100, (64,))
    reg, log_scale = torch.nn.Conv2d(64, 96, 1), torch.randn(96)
    rows = {}
    with torch.no_grad():
        md = _distillers(a.mdistiller)
        rows["at (p 2; stage maps of other sizes and widths)"] = rel(losses.at(ms, mt), md["AT"].at_loss(ms[1:], mt[1:], 2))
        rows["nst (idem)"] = rel(losses.nst(ms, mt), md["NST"].nst_loss(ms[1:], mt[1:]))
        rows["pkt (256- vs 512-d features)"] = rel(losses.pkt(fs, ft), md["PKT"].pkt_loss(fs.clone(), ft.clone()))
        rows["vid (one stage)"] = rel(losses.vid(reg(ms[2]), log_scale, mt[2]), md["VID"].vid_loss(reg, log_scale, ms[2], mt[2]))
        rows["kd (T 4)"] = rel(losses.kd(zs, zt, 4.0), md["KD"].kd_loss(zs, zt, 4.0))
        rows["dkd (1, 8, T 4)"] = rel(losses.dkd(zs, zt, y, 1.0, 8.0, 4.0), md["DKD"].dkd_loss(zs, zt, y, 1.0, 8.0, 4.0))
        ls = _distillers(a.logit_standardization)
        rows["kd + LS (T 2)"] = rel(losses.kd(zs, zt, 2.0, True), ls["KD"].kd_loss(zs, zt, 2.0, True))
        rows["dkd + LS (9, 72, T 2)"] = rel(losses.dkd(zs, zt, y, 9.0, 72.0, 2.0, True),
                                            ls["DKD"].dkd_loss(zs, zt, y, 9.0, 72.0, 2.0, True))
        rows["dist (2, 2, tau 4)"] = rel(losses.dist(zs, zt, 2.0, 2.0, 4.0), _dist_reference(zs, zt, 2.0, 2.0, 4.0))
        rows["crd (two steps: NCE of both directions, memory update, Z)"] = _crd(md["CRD"])
        if "OFD" in md:  # mdistiller's; the logit-standardization checkout has neither
            rows.update(_ofd(md["OFD"]))
            rows.update(_reviewkd(md["ReviewKD"]))
    if a.ctkd:
        rows.update(_ctkd(a.ctkd))
    for k, v in rows.items():
        print(f"{k:50s} max relative error {v:.1e}")
    worst = max(rows.values())
    print(f"worst {worst:.1e} (tolerance 1e-5)")
    if a.json:
        a.json.write_text(json.dumps({"torch": torch.__version__, "relative_error": rows, "worst": worst}, indent=2) + "\n")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
