"""The loss terms a method combines: what each reads, which trainable parts it owns, how it is computed.

A method is term weights (:class:`kdbench.methods.Method`); the loop sums ``weight * term`` over the non-zero
ones. Each term here says what it reads — fields of :class:`kdbench.records.Batch`: the student's and teacher's
``logits``, pooled ``features``, stage ``maps`` or ``preact`` maps, the teacher's class ``t_centroids``, the
``target`` — and, where it trains parameters of its
own (a regressor, a projection), how to build them once from the two models' shapes. The loop computes
stage maps, and runs the teacher, only when some term reads them. Adding a method: one function in
:mod:`kdbench.losses`, one entry in ``TERMS`` (and its weight in ``Method``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .crd import CRD
from .measure import prepare
from .models import StagesUnavailable, build_model

__all__ = ["Term", "TERMS", "Shapes", "MethodError", "build_parts", "reads_of", "check_method", "shapes_of", "STAGE_READS"]


class MethodError(ValueError):
    """A method its models cannot run (no stage maps, a stage that does not exist): one line, exit 2."""


@dataclass(frozen=True)
class Shapes:
    """What parts are built from: the pooled feature widths and the stage maps' shapes ``(C, H, W)`` of both."""

    d_s: int
    d_t: int
    maps_s: list[tuple[int, int, int]] | None
    maps_t: list[tuple[int, int, int]] | None
    train_y: torch.Tensor | None = None  # the training labels (CRD's memory and its negatives)
    preact: tuple[bool, bool] = (True, True)  # whether student and teacher give pre-activation maps
    t_bn: list | None = None  # per teacher stage, (weight, bias) of the BN before its ReLU (OFD's margins)


@dataclass(frozen=True)
class Term:
    reads: frozenset[str]  # the kdbench.records.Batch fields compute reads
    compute: Callable  # (batch, method, parts) -> scalar tensor; parts: this term's module (or None)
    parts: Callable | None = None  # (shapes, method) -> nn.Module, trained with the student
    warmup: str | None = None  # the Method field: the share of the run over which its weight ramps up from 0
    report: Callable | None = None  # (parts, method) -> {column: value}: what the loop records once an epoch


class _ConvReg(nn.Module):
    """FitNets' convolutional regressor (as RepDistiller and mdistiller build it): a 3x3 stride-2 convolution
    where the student's map is twice the teacher's size, a transposed one where it is half, else a valid
    convolution of kernel ``1 + H_s - H_t``; then BN and ReLU."""

    def __init__(self, s: tuple[int, int, int], t: tuple[int, int, int]):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = s, t
        if hs == 2 * ht:
            self.conv = nn.Conv2d(cs, ct, 3, 2, 1)
        elif 2 * hs == ht:
            self.conv = nn.ConvTranspose2d(cs, ct, 4, 2, 1)
        elif hs >= ht:
            self.conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            raise MethodError(f"fitnet: a student map of {hs}x{ws} cannot be regressed to the teacher's {ht}x{wt}")
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _stage(maps: list | None, i: int, who: str):
    if maps is None:
        raise MethodError(f"fitnet: the {who} exposes no stage maps")
    if not 0 <= i < len(maps):
        raise MethodError(f"fitnet_stage = {i}: the {who} has stage maps 0..{len(maps) - 1} (0: the stem)")
    return maps[i]


def _fitnet_parts(sh: Shapes, m) -> nn.Module:
    i = int(m.fitnet_stage)
    return _ConvReg(_stage(sh.maps_s, i, "student"), _stage(sh.maps_t, i, "teacher"))


class _VIDParts(nn.Module):
    """Per stage pair: a 1x1-conv regressor (s -> t -> t -> t, ReLU between) and the per-channel ``log_scale`` of
    the variance, initialised to ``softplus^-1(init_var - eps)`` (Ahn et al.; trained, as RepDistiller does)."""

    def __init__(self, pairs: list[tuple[int, int]], init_var: float, eps: float = 1e-5):
        super().__init__()
        conv = lambda a, b: nn.Conv2d(a, b, 1, bias=False)
        self.regressors = nn.ModuleList(nn.Sequential(conv(s, t), nn.ReLU(), conv(t, t), nn.ReLU(), conv(t, t))
                                        for s, t in pairs)
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t,), math.log(math.expm1(init_var - eps))))
                                           for _, t in pairs)


def _pairs(sh: Shapes, name: str) -> list[tuple[int, int]]:
    if sh.maps_s is None or sh.maps_t is None:
        raise MethodError(f"{name}: the {'student' if sh.maps_s is None else 'teacher'} exposes no stage maps")
    return [(s[0], t[0]) for s, t in losses.pair_stages(sh.maps_s, sh.maps_t)]


def _vid(b, m, parts) -> torch.Tensor:
    total = 0.0
    for (f_s, f_t), reg, log_scale in zip(losses.pair_stages(b.maps, b.t_maps), parts.regressors, parts.log_scales):
        f_s, f_t = losses.match_size(f_s, f_t)
        total = total + losses.vid(reg(f_s), log_scale, f_t)
    return total


class _OFDParts(nn.Module):
    """OFD's connectors (Heo et al.): per stage pair a 1x1 conv (N(0, sqrt(2 / C_t)) init) and BN from the
    student's channels to the teacher's; and the teacher's per-channel margins (buffers ``margin0..``)."""

    def __init__(self, pairs: list[tuple[int, int]], bn: list):
        super().__init__()
        self.connectors = nn.ModuleList(nn.Sequential(nn.Conv2d(s, t, 1, bias=False), nn.BatchNorm2d(t)) for s, t in pairs)
        for c in self.connectors:
            c[0].weight.data.normal_(0, math.sqrt(2.0 / c[0].out_channels))
        for i, (gamma, beta) in enumerate(bn[len(bn) - len(pairs):]):  # the stages pair_stages pairs: the last k
            self.register_buffer(f"margin{i}", losses.ofd_margin(gamma, beta))


def _ofd_parts(sh: Shapes, m) -> nn.Module:
    if sh.t_bn is None:
        raise MethodError("ofd: the teacher names no BN before its stages' ReLU (its margins); allowed teachers: the "
                          "CIFAR ResNets, ResNet18/34/50, WRNs, VGGs, the digits CNNs, MobileNetV1, torchvision's ResNets")
    return _OFDParts(_pairs(sh, "ofd"), sh.t_bn)


def _ofd(b, m, parts) -> torch.Tensor:
    """The student's pre-ReLU stages through the connectors against the teacher's (pooled to the student's size),
    the deepest pair weighted 1, each shallower one half the next (the authors' and mdistiller's weighting)."""
    pairs, total = losses.pair_stages(b.preact, b.t_preact), 0.0
    for i, ((f_s, f_t), conn) in enumerate(zip(pairs, parts.connectors)):
        f_s = conn(f_s)
        f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[2:])
        total = total + losses.ofd(f_s, f_t, getattr(parts, f"margin{i}")) / 2 ** (len(pairs) - i - 1)
    return total


class _ABF(nn.Module):
    """ReviewKD's attention-based fusion (Chen et al.): a 1x1 conv-BN of this level's student map, fused with the
    deeper level's result (upsampled) by a 2-channel sigmoid attention, resized to the teacher's map, then a 3x3
    conv-BN to the teacher's channels. Returns (the output, the fused map the next level fuses with)."""

    def __init__(self, cin: int, mid: int, cout: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, deeper=None, out_size=None):
        x = self.conv1(x)
        if self.att_conv is not None:
            deeper = F.interpolate(deeper, x.shape[2:], mode="nearest")
            z = self.att_conv(torch.cat([x, deeper], 1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def _levels(sh: Shapes, name: str) -> tuple[list, list]:
    """ReviewKD's levels, shallow to deep: the paired stages (see pair_stages), then the pooled features as 1x1
    maps; per side ``(C, H, W)``."""
    if sh.maps_s is None or sh.maps_t is None:
        raise MethodError(f"{name}: the {'student' if sh.maps_s is None else 'teacher'} exposes no stage maps")
    k = min(len(sh.maps_s), len(sh.maps_t)) - 1
    return list(sh.maps_s[len(sh.maps_s) - k:]) + [(sh.d_s, 1, 1)], list(sh.maps_t[len(sh.maps_t) - k:]) + [(sh.d_t, 1, 1)]


class _ReviewParts(nn.Module):
    """One ABF per level; ``abfs[0]`` is the deepest (the pooled features: nothing deeper to fuse with)."""

    def __init__(self, sh: Shapes):
        super().__init__()
        s, t = _levels(sh, "reviewkd")
        mid = min(512, s[-1][0])
        self.out_sizes = [tuple(x[1:]) for x in t][::-1]
        self.abfs = nn.ModuleList(_ABF(cs[0], mid, ct[0], i < len(s) - 1) for i, (cs, ct) in enumerate(zip(s, t)))[::-1]

    def forward(self, maps: list, features: torch.Tensor) -> list:
        k = len(self.abfs) - 1
        x = ([*maps[len(maps) - k:], features[:, :, None, None]])[::-1]  # deepest first
        out, deeper = self.abfs[0](x[0], out_size=self.out_sizes[0])
        results = [out]
        for f, abf, size in zip(x[1:], self.abfs[1:], self.out_sizes[1:]):
            out, deeper = abf(f, deeper, size)
            results.insert(0, out)
        return results  # shallow to deep, at the teacher's sizes and channels


def _reviewkd(b, m, parts) -> torch.Tensor:
    t = b.t_preact
    k = len(parts.abfs) - 1
    return losses.hcl(parts(b.maps, b.features), [*t[len(t) - k:], b.t_features[:, :, None, None]])


class _Temperature(nn.Module):
    """CTKD's global temperature (Li et al., AAAI 2023): one trained parameter ``theta`` (initially 1, as the
    authors' ``Global_T``); the temperature is ``ctkd_min + ctkd_range * sigmoid(theta)``."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.ones(1))

    def forward(self, m, scale: float = 0.0) -> torch.Tensor:
        return m.ctkd_min + m.ctkd_range * torch.sigmoid(losses.reverse_grad(self.theta, scale))[0]


def _ctkd(b, m, parts) -> torch.Tensor:
    """KD at the learned temperature, whose gradient is reversed with the curriculum's scale at this epoch."""
    tau = parts(m, losses.ctkd_lambda(b.epoch, b.epochs, m.ctkd_loops))
    return losses.kd(b.logits, b.t_logits, tau, bool(m.standardize))


def _linear(sh: Shapes, m) -> nn.Module:
    return nn.Linear(sh.d_s, sh.d_t)  # FitNets regressor / CC embedding d_s -> d_t


LOGITS, FEATURES = frozenset({"logits", "t_logits"}), frozenset({"features", "t_features"})
MAPS = frozenset({"maps", "t_maps"})

# In a fixed order (the order the loop reports them in). The presets' weights are in kdbench.train.METHODS.
TERMS: dict[str, Term] = {
    "ce": Term(frozenset({"logits", "target"}), lambda b, m, p: F.cross_entropy(b.logits, b.target)),
    "kd": Term(LOGITS, lambda b, m, p: losses.kd(b.logits, b.t_logits, m.temperature, bool(m.standardize))),
    "feature": Term(FEATURES, lambda b, m, p: losses.feature(p(b.features), b.t_features), _linear),
    "geometry": Term(frozenset({"features", "t_centroids", "target", "memory"}),
                     lambda b, m, p: losses.geometry(b.memory(b.features, b.target), b.t_centroids)),
    "rkd": Term(FEATURES, lambda b, m, p: losses.rkd(b.features, b.t_features, m.rkd_distance, m.rkd_angle)),
    "sp": Term(FEATURES, lambda b, m, p: losses.sp(b.features, b.t_features)),
    "cc": Term(FEATURES, lambda b, m, p: losses.cc(p(b.features), b.t_features, m.cc_gamma, int(m.cc_order)), _linear),
    "dkd": Term(LOGITS | {"target"}, lambda b, m, p: losses.dkd(b.logits, b.t_logits, b.target, m.dkd_alpha,
                                                                m.dkd_beta, m.temperature, bool(m.standardize)),
                warmup="dkd_warmup"),
    "at": Term(MAPS, lambda b, m, p: losses.at(b.maps, b.t_maps, m.at_p)),
    "pkt": Term(FEATURES, lambda b, m, p: losses.pkt(b.features, b.t_features)),
    "nst": Term(MAPS, lambda b, m, p: losses.nst(b.maps, b.t_maps)),
    "fitnet": Term(MAPS, lambda b, m, p: losses.feature(p(b.maps[int(m.fitnet_stage)]),
                                                        b.t_maps[int(m.fitnet_stage)]), _fitnet_parts),
    "vid": Term(MAPS, _vid, lambda sh, m: _VIDParts(_pairs(sh, "vid"), m.vid_init_var)),
    "crd": Term(FEATURES | {"target", "index", "generator"},
                lambda b, m, p: p(b.features, b.t_features, b.index, b.target, b.generator),
                lambda sh, m: CRD(sh.d_s, sh.d_t, sh.train_y, int(m.crd_dim), int(m.crd_negatives), m.crd_temperature,
                                  m.crd_momentum)),
    "dist": Term(LOGITS, lambda b, m, p: losses.dist(b.logits, b.t_logits, m.dist_beta, m.dist_gamma, m.dist_tau,
                                                     bool(m.standardize))),
    "ofd": Term(frozenset({"preact", "t_preact"}), _ofd, _ofd_parts),
    "reviewkd": Term(frozenset({"maps", "features", "t_preact", "t_features"}), _reviewkd,
                     lambda sh, m: _ReviewParts(sh), warmup="reviewkd_warmup"),
    "ctkd": Term(LOGITS | {"epoch", "epochs"}, _ctkd, lambda sh, m: _Temperature(),
                 report=lambda p, m: {"ctkd_temperature": float(p(m).detach())}),
}
LOGIT_TERMS = ("kd", "dkd", "dist", "ctkd")  # the terms logit standardisation applies to
TEACHER_READS = frozenset({"t_logits", "t_features", "t_maps", "t_preact"})
STAGE_READS = frozenset({"maps", "t_maps", "preact", "t_preact"})  # the loop computes stage maps only for these


def reads_of(terms) -> frozenset[str]:
    """What a set of term names reads, together."""
    return frozenset().union(*(TERMS[t].reads for t in terms))


def build_parts(terms, method, shapes: Shapes) -> nn.ModuleDict:
    """Every term's trainable parts, in TERMS order (the student's RNG draws come first, then these)."""
    for t in terms:
        r = TERMS[t].reads
        if r & STAGE_READS and TERMS[t].parts is None and (shapes.maps_s is None or shapes.maps_t is None):
            raise MethodError(f"{t}: the {'student' if shapes.maps_s is None else 'teacher'} exposes no stage maps")
        for side, has, who in (("preact", shapes.preact[0], "student"), ("t_preact", shapes.preact[1], "teacher")):
            if side in r and not has:
                raise MethodError(f"{t}: the {who} exposes no pre-activation stage maps")
    return nn.ModuleDict({t: TERMS[t].parts(shapes, method) for t in terms if TERMS[t].parts is not None})


def shapes_of(terms, student: nn.Module, teacher, data) -> Shapes:
    """What the terms' parts are built from: feature widths, stage-map shapes (one eval-mode pass over two
    training images, only where a term reads stage maps), the teacher's BNs before its ReLUs (OFD)."""
    d_t = teacher.centroids.shape[1] if teacher is not None else 0
    if teacher is None or not reads_of(terms) & STAGE_READS:
        return Shapes(student.feature_dim, d_t, None, None, data.labels("train"))
    x = prepare(next(data.chunks("train", 2))[0].to(next(student.parameters()).device), data)

    def stages(model):
        if not hasattr(model, "forward_stages"):
            return None, False
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                s = model.forward_stages(x)
            return [tuple(m.shape[1:]) for m in s.maps], s.preact is not None
        except StagesUnavailable:
            return None, False
        finally:
            model.train(was)

    (maps_s, pre_s), (maps_t, pre_t) = stages(student), stages(teacher.model)
    bn = getattr(teacher.model, "bn_before_relu", None) if "ofd" in terms else None
    t_bn = [(b.weight.detach().cpu().clone(), b.bias.detach().cpu().clone()) for b in bn()] if bn else None
    return Shapes(student.feature_dim, d_t, maps_s, maps_t, data.labels("train"), (pre_s, pre_t), t_bn)


def check_method(method, student: str, teacher, data) -> None:
    """Raise MethodError (one line) when ``method`` cannot run with these models: a term reading stage maps a
    model does not expose, a stage that does not exist. Builds the parts once on the CPU; trains nothing."""
    terms = method.terms
    if method.standardize and not set(terms) & set(LOGIT_TERMS):
        raise MethodError(f"standardize = {method.standardize}: {method.name} has no logit term to standardise "
                          f"(allowed with {', '.join(LOGIT_TERMS)})")
    if teacher is None or not reads_of(terms) & STAGE_READS and not any(TERMS[t].parts for t in terms):
        return
    model = build_model(student, data.num_classes, data.in_channels).to(data.device)
    build_parts(terms, method, shapes_of(terms, model, teacher, data))
