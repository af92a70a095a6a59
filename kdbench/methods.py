"""Methods: the term weights of a student's loss and the terms' hyperparameters, and the presets of the zoo.

A method is term weights (DESIGN §4); the loop in :mod:`kdbench.train` sums ``weight * term`` over the non-zero
ones, each term defined in :mod:`kdbench.terms`. Presets are just weights; a study or ``--set`` overrides any.
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import setting, weight

__all__ = ["Method", "METHODS"]


@dataclass(frozen=True)
class Method:
    """Term weights of the student loss and the terms' own hyperparameters (DESIGN §4).

    A term is on when its weight (a name of :data:`kdbench.terms.TERMS`: ``ce``, ``kd``, ``feature``,
    ``geometry``, ``rkd``, ``sp``, ``cc``, ``dkd``, ``at``, ``pkt``, ``nst``, ``fitnet``, ``vid``, ``dist``, ``crd``, ``ofd``,
    ``reviewkd``, ``ctkd``)
    is non-zero; any preset can be turned into a combination by setting more weights.
    """

    name: str = "baseline"
    ce: float = weight(1.0)
    kd: float = weight(0.0)
    temperature: float = setting(4.0, above=True)  # T of the kd and dkd terms
    feature: float = weight(0.0)
    geometry: float = weight(0.0)  # lambda
    momentum: float = setting(0.9, hi=0.999)  # centroid momentum m of the geometry term
    rkd: float = weight(0.0)
    rkd_distance: float = setting(25.0)
    rkd_angle: float = setting(50.0)
    sp: float = weight(0.0)
    cc: float = weight(0.0)
    cc_gamma: float = setting(0.4, above=True)
    cc_order: int = setting(2, hi=8)
    dkd: float = weight(0.0)
    dkd_alpha: float = setting(1.0)
    dkd_beta: float = setting(8.0)
    dkd_warmup: float = setting(1 / 12, hi=1)  # fraction of the run over which the dkd weight ramps up (20 of 240 epochs)
    at: float = weight(0.0)
    at_p: float = setting(2.0, above=True)  # the power of the attention maps
    pkt: float = weight(0.0)
    nst: float = weight(0.0)
    fitnet: float = weight(0.0)  # the hint at one stage map (a conv regressor), beside `feature` on the pooled features
    fitnet_stage: int = setting(2)  # which map: 0 the stem, 1.. the stages (RepDistiller's and mdistiller's hint layer 2)
    vid: float = weight(0.0)
    vid_init_var: float = setting(5.0, above=True)  # the variances' initial value
    dist: float = weight(0.0)
    dist_beta: float = setting(1.0)  # inter-class relation weight
    dist_gamma: float = setting(1.0)  # intra-class relation weight
    dist_tau: float = setting(1.0, above=True)  # DIST's temperature
    standardize: int = setting(0, hi=1)  # 1: logit standardisation (Sun et al., CVPR 2024) in kd, dkd, dist and ctkd
    crd: float = weight(0.0)
    crd_dim: int = setting(128, lo=1)  # embedding width
    crd_negatives: int = setting(16384, lo=1)  # K, capped by the training samples of other classes
    crd_temperature: float = setting(0.07, above=True)
    crd_momentum: float = setting(0.5, hi=0.999)  # of the memory banks
    ofd: float = weight(0.0)
    reviewkd: float = weight(0.0)
    reviewkd_warmup: float = setting(1 / 12, hi=1)  # the share of the run over which the reviewkd weight ramps up (20 of 240 epochs)
    ctkd: float = weight(0.0)  # kd at a learned temperature, its gradient reversed (curriculum temperature)
    ctkd_min: float = setting(1.0, above=True)  # the temperature's range: ctkd_min + ctkd_range * sigmoid(theta)
    ctkd_range: float = setting(20.0)
    # the share of the run over which the reversal lambda rises 0 -> 1 (10 of 240 epochs)
    ctkd_loops: float = setting(1 / 24, hi=1, above=True)

    @property
    def terms(self) -> dict[str, float]:
        """The loss terms with a non-zero weight, in a fixed order."""
        from .terms import TERMS  # here: the terms are torch code, a Method is plain settings

        return {t: getattr(self, t) for t in TERMS if getattr(self, t) != 0}

    @property
    def needs_teacher_forward(self) -> bool:
        """Whether a term reads the teacher's per-batch outputs (geometry only reads cached centroids)."""
        from .terms import TEACHER_READS, reads_of

        return bool(reads_of(self.terms) & TEACHER_READS)


# Presets are just term weights; a study or --set overrides any of them. Weights of the zoo are the
# published CIFAR-100 settings: RKD 25/50 with CE (Park et al.; RepDistiller), SP 3000 (RepDistiller),
# CC 0.02 with gamma 0.4 and a 2nd-order kernel (RepDistiller, Peng et al.), DKD alpha 1, beta 8, T 4
# with CE and a 20-of-240-epoch warm-up (Zhao et al.; mdistiller); AT 1000 (p = 2), PKT 30000, NST 50,
# VID 1 (initial variance 5), FitNet 100 at stage map 2, each with CE 1 (mdistiller's CIFAR-100 configs);
# DIST 1 with beta = gamma = 2, tau = 4 (Huang et al.'s CIFAR-100 setting, from the paper); CRD 0.8 with CE 1
# (mdistiller's config, RepDistiller's "-a 0 -b 0.8"; crd_kd adds KD 1 at T 4: its "CRD+KD"); KD + LS:
# CE 0.1, KD 9, T 2; DKD + LS: alpha 9, beta 72, T 2 (Sun et al.'s README: --base-temp 2 --kd-weight 9); OFD
# 0.001 with CE 1 (mdistiller's CIFAR default, a 1x1 connector); ReviewKD 5 with CE 1 and a 20-of-240-epoch
# warm-up (mdistiller's configs/cifar100/reviewkd.yaml over its defaults); CTKD: CE 0.1, KD 0.9 at a global
# temperature learned in 1 + 20 * sigmoid(theta), lambda 0 -> 1 over 10 of 240 epochs on a cosine (Li et al., AAAI
# 2023; the authors' scripts/run_cifar_distill.sh: -r 0.1 -a 0.9, --t_start 1 --t_end 20, --decay_loops 10).
METHODS: dict[str, Method] = {
    "baseline": Method("baseline"),
    "kd": Method("kd", ce=0.1, kd=0.9, temperature=4.0),
    "feature": Method("feature", ce=1.0, feature=1.0),
    "geometry": Method("geometry", ce=0.1, kd=0.9, temperature=4.0, geometry=100.0, momentum=0.9),
    "geometry_only": Method("geometry_only", ce=1.0, geometry=100.0, momentum=0.9),
    "rkd": Method("rkd", ce=1.0, rkd=1.0),
    "sp": Method("sp", ce=1.0, sp=3000.0),
    "cc": Method("cc", ce=1.0, cc=0.02),
    "dkd": Method("dkd", ce=1.0, dkd=1.0, temperature=4.0),
    "at": Method("at", ce=1.0, at=1000.0),
    "pkt": Method("pkt", ce=1.0, pkt=30000.0),
    "nst": Method("nst", ce=1.0, nst=50.0),
    "vid": Method("vid", ce=1.0, vid=1.0),
    "fitnet": Method("fitnet", ce=1.0, fitnet=100.0),
    "dist": Method("dist", ce=1.0, dist=1.0, dist_beta=2.0, dist_gamma=2.0, dist_tau=4.0),
    "crd": Method("crd", ce=1.0, crd=0.8),
    "crd_kd": Method("crd_kd", ce=1.0, kd=1.0, temperature=4.0, crd=0.8),
    "kd_ls": Method("kd_ls", ce=0.1, kd=9.0, temperature=2.0, standardize=1),
    "dkd_ls": Method("dkd_ls", ce=1.0, dkd=1.0, dkd_alpha=9.0, dkd_beta=72.0, temperature=2.0, standardize=1),
    "ofd": Method("ofd", ce=1.0, ofd=0.001),
    "reviewkd": Method("reviewkd", ce=1.0, reviewkd=5.0),
    "ctkd": Method("ctkd", ce=0.1, ctkd=0.9),
}
