"""The loss terms a method combines: what each reads, which trainable parts it owns, how it is computed.

A method is term weights (:class:`kdbench.train.Method`); the loop sums ``weight * term`` over the non-zero
ones. Each term here says what it reads — the student's and teacher's ``logits``, pooled ``features``, stage
``maps`` or ``preact`` maps, the class ``centroids``, the ``target`` — and, where it trains parameters of its
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
from .evaluate import prepare
from .models import StagesUnavailable, build_model

__all__ = ["Term", "TERMS", "Shapes", "MethodError", "build_parts", "reads_of", "check_method", "map_shapes"]


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


@dataclass(frozen=True)
class Term:
    reads: frozenset[str]
    compute: Callable  # (batch, method, parts) -> scalar tensor; parts: this term's module (or None)
    parts: Callable | None = None  # (shapes, method) -> nn.Module, trained with the student


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
    for (f_s, f_t), reg, log_scale in zip(losses.pair_stages(b["maps"], b["t_maps"]), parts.regressors, parts.log_scales):
        f_s, f_t = losses.match_size(f_s, f_t)
        total = total + losses.vid(reg(f_s), log_scale, f_t)
    return total


def _linear(sh: Shapes, m) -> nn.Module:
    return nn.Linear(sh.d_s, sh.d_t)  # FitNets regressor / CC embedding d_s -> d_t


LOGITS, FEATURES = frozenset({"logits", "t_logits"}), frozenset({"features", "t_features"})
MAPS = frozenset({"maps", "t_maps"})

# In a fixed order (the order the loop reports them in). The presets' weights are in kdbench.train.METHODS.
TERMS: dict[str, Term] = {
    "ce": Term(frozenset({"logits", "target"}), lambda b, m, p: F.cross_entropy(b["logits"], b["y"])),
    "kd": Term(LOGITS, lambda b, m, p: losses.kd(b["logits"], b["t_logits"], m.temperature, bool(m.standardize))),
    "feature": Term(FEATURES, lambda b, m, p: losses.feature(p(b["feat"]), b["t_feat"]), _linear),
    "geometry": Term(frozenset({"features", "centroids", "target"}),
                     lambda b, m, p: losses.geometry(b["memory"](b["feat"], b["y"]), b["t_centroids"])),
    "rkd": Term(FEATURES, lambda b, m, p: losses.rkd(b["feat"], b["t_feat"], m.rkd_distance, m.rkd_angle)),
    "sp": Term(FEATURES, lambda b, m, p: losses.sp(b["feat"], b["t_feat"])),
    "cc": Term(FEATURES, lambda b, m, p: losses.cc(p(b["feat"]), b["t_feat"], m.cc_gamma, int(m.cc_order)), _linear),
    "dkd": Term(LOGITS | {"target"}, lambda b, m, p: losses.dkd(b["logits"], b["t_logits"], b["y"], m.dkd_alpha,
                                                                m.dkd_beta, m.temperature, bool(m.standardize))),
    "at": Term(MAPS, lambda b, m, p: losses.at(b["maps"], b["t_maps"], m.at_p)),
    "pkt": Term(FEATURES, lambda b, m, p: losses.pkt(b["feat"], b["t_feat"])),
    "nst": Term(MAPS, lambda b, m, p: losses.nst(b["maps"], b["t_maps"])),
    "fitnet": Term(MAPS, lambda b, m, p: losses.feature(p(b["maps"][int(m.fitnet_stage)]),
                                                        b["t_maps"][int(m.fitnet_stage)]), _fitnet_parts),
    "vid": Term(MAPS, _vid, lambda sh, m: _VIDParts(_pairs(sh, "vid"), m.vid_init_var)),
    "crd": Term(FEATURES | {"target", "index"}, lambda b, m, p: p(b["feat"], b["t_feat"], b["index"], b["y"], b["gen"]),
                lambda sh, m: CRD(sh.d_s, sh.d_t, sh.train_y, int(m.crd_dim), int(m.crd_negatives), m.crd_temperature,
                                  m.crd_momentum)),
    "dist": Term(LOGITS, lambda b, m, p: losses.dist(b["logits"], b["t_logits"], m.dist_beta, m.dist_gamma, m.dist_tau,
                                                     bool(m.standardize))),
}
TEACHER_READS = frozenset({"t_logits", "t_features", "t_maps", "t_preact"})


def reads_of(terms) -> frozenset[str]:
    """What a set of term names reads, together."""
    return frozenset().union(*(TERMS[t].reads for t in terms))


def build_parts(terms, method, shapes: Shapes) -> nn.ModuleDict:
    """Every term's trainable parts, in TERMS order (the student's RNG draws come first, then these)."""
    for t in terms:
        if TERMS[t].reads & {"maps", "t_maps"} and TERMS[t].parts is None and (shapes.maps_s is None or shapes.maps_t is None):
            raise MethodError(f"{t}: the {'student' if shapes.maps_s is None else 'teacher'} exposes no stage maps")
    return nn.ModuleDict({t: TERMS[t].parts(shapes, method) for t in terms if TERMS[t].parts is not None})


def check_method(method, student: str, teacher, data) -> None:
    """Raise MethodError (one line) when ``method`` cannot run with these models: a term reading stage maps a
    model does not expose, a stage that does not exist. Builds the parts once on the CPU; trains nothing."""
    terms = method.terms
    if teacher is None or not reads_of(terms) & {"maps", "t_maps"} and not any(TERMS[t].parts for t in terms):
        return
    model = build_model(student, data.num_classes, data.in_channels).to(data.train_x.device)
    maps = map_shapes(model, teacher.model, data) if reads_of(terms) & {"maps", "t_maps"} else (None, None)
    build_parts(terms, method, Shapes(model.feature_dim, teacher.centroids.shape[1], *maps, data.train_y))


def map_shapes(student: nn.Module, teacher: nn.Module, data):
    """The ``(C, H, W)`` of each stage map of both models, from one eval-mode pass over two training images
    (None for a model that has no ``forward_stages``)."""
    x = prepare(data.train_x[:2], data)

    def shapes(model):
        if not hasattr(model, "forward_stages"):
            return None
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [tuple(m.shape[1:]) for m in model.forward_stages(x).maps]
        except StagesUnavailable:
            return None
        finally:
            model.train(was)

    return shapes(student), shapes(teacher)
