import math

import pytest
import torch

from kdbench import losses


def _kd_by_hand(s, t, T):
    """KL(p_t || p_s) * T^2 summed over classes, averaged over the batch, written out in float64."""
    s, t = s.double() / T, t.double() / T
    p_t = t.exp() / t.exp().sum(1, keepdim=True)
    p_s = s.exp() / s.exp().sum(1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T


@pytest.mark.parametrize("T", [1.0, 4.0, 7.5])
def test_kd_matches_the_written_out_formula(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    assert losses.kd(s.double(), t.double(), T).item() == pytest.approx(_kd_by_hand(s, t, T).item(), abs=1e-5)


def test_kd_hand_worked_two_class_case():
    # p_t = softmax([0, 0]) = (1/2, 1/2); p_s = softmax([ln 3, 0]) = (3/4, 1/4); T = 1.
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.zeros(1, 2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert losses.kd(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # T^2 is kept: at T=2 the logits halve, and the loss is multiplied by 4.
    s2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert losses.kd(s2, t, 2.0).item() == pytest.approx(4 * expected, abs=1e-6)


def test_kd_is_zero_for_identical_logits():
    z = torch.randn(8, 5)
    assert losses.kd(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_is_mean_squared_error():
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    assert losses.feature(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), abs=1e-6)


def _geometry_by_hand(cs, ct):
    """Mean over i != j of (cos_s(i, j) - cos_t(i, j))^2, one pair at a time."""
    c = cs.shape[0]
    total = 0.0
    for i in range(c):
        for j in range(c):
            if i != j:
                a = torch.nn.functional.cosine_similarity(cs[i].double(), cs[j].double(), dim=0)
                b = torch.nn.functional.cosine_similarity(ct[i].double(), ct[j].double(), dim=0)
                total += (a - b).item() ** 2
    return total / (c * (c - 1))


def test_geometry_matches_pairwise_loop_with_different_widths():
    g = torch.Generator().manual_seed(1)
    cs, ct = torch.randn(7, 5, generator=g), torch.randn(7, 12, generator=g)
    assert losses.geometry(cs, ct).item() == pytest.approx(_geometry_by_hand(cs, ct), abs=1e-5)


def test_geometry_hand_worked_case():
    # Student: orthogonal axes (cos = 0). Teacher: classes 0 and 1 identical (cos = 1), class 2 orthogonal.
    cs = torch.eye(3)
    ct = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Off-diagonal pairs: (0,1),(1,0) differ by 1; the other four by 0 -> 2 / 6.
    assert losses.geometry(cs, ct).item() == pytest.approx(2 / 6, abs=1e-6)


def test_geometry_is_zero_for_equal_centroids_and_invariant_to_rescaling():
    ct = torch.randn(10, 8)
    assert losses.geometry(ct.clone(), ct).item() == pytest.approx(0.0, abs=1e-6)
    cs = torch.randn(10, 4)
    scale = torch.rand(10, 1) * 9 + 0.1  # a different positive factor per centroid
    assert losses.geometry(cs * scale, ct).item() == pytest.approx(losses.geometry(cs, ct).item(), abs=1e-6)
    # And the student's geometry equal to the teacher's up to rescaling gives 0 as well.
    assert losses.geometry(ct * scale, ct).item() == pytest.approx(0.0, abs=1e-6)


def test_geometry_sends_gradient_to_student_only():
    cs = torch.randn(6, 4, requires_grad=True)
    ct = torch.randn(6, 9, requires_grad=True)
    losses.geometry(cs, ct).backward(inputs=[cs])
    assert cs.grad is not None and cs.grad.abs().sum() > 0
    assert ct.grad is None
    # Under inference mode the teacher's centroids cannot even carry a graph.
    with torch.inference_mode():
        frozen = torch.randn(6, 9)
    cs.grad = None
    losses.geometry(cs, frozen.clone()).backward()
    assert cs.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The method zoo: each loss against an independent float64 computation written out by hand


def _smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def _rkd_by_hand(s, t, wd, wa):
    s, t = s.double().tolist(), t.double().tolist()
    b = len(s)

    def dist(e):
        d = [[sum((a - c) ** 2 for a, c in zip(e[i], e[j])) ** 0.5 for j in range(b)] for i in range(b)]
        nz = [v for row in d for v in row if v > 0]
        mean = sum(nz) / len(nz) if nz else 1.0
        return [[v / mean for v in row] for row in d]

    def unit(v):
        n = sum(x * x for x in v) ** 0.5
        return [x / n for x in v] if n > 0 else [0.0 for _ in v]

    def angle(e, i, j, k):
        u = unit([a - c for a, c in zip(e[i], e[j])])
        w = unit([a - c for a, c in zip(e[k], e[j])])
        return sum(x * y for x, y in zip(u, w))

    ds, dt = dist(s), dist(t)
    ld = sum(_smooth_l1(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b ** 2
    la = sum(_smooth_l1(angle(s, i, j, k) - angle(t, i, j, k))
             for i in range(b) for j in range(b) for k in range(b)) / b ** 3
    return wd * ld + wa * la


def _sp_by_hand(s, t):
    b = s.shape[0]

    def g(f):
        f = f.double().reshape(b, -1)
        gram = f @ f.T
        return gram / gram.norm(dim=1, keepdim=True)

    return ((g(s) - g(t)) ** 2).sum().item() / b ** 2


def _cc_by_hand(s, t, gamma, order):
    b = s.shape[0]

    def kernel(e):
        e = e.double()
        k = torch.zeros(b, b, dtype=torch.float64)
        for i in range(b):
            for j in range(b):
                x = (e[i] @ e[j]) / (e[i].norm() * e[j].norm())
                k[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x ** p
                              for p in range(order + 1))
        return k

    return ((kernel(s) - kernel(t)) ** 2).sum().item() / b ** 2


def _dkd_by_hand(s, t, y, alpha, beta, T):
    s, t = s.double() / T, t.double() / T
    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = torch.softmax(s[i], 0), torch.softmax(t[i], 0)
        c = int(y[i])
        bs, bt = torch.stack([ps[c], 1 - ps[c]]), torch.stack([pt[c], 1 - pt[c]])
        tckd = (bt * (bt / bs).log()).sum()
        keep = [k for k in range(s.shape[1]) if k != c]
        qs, qt = torch.softmax(s[i, keep], 0), torch.softmax(t[i, keep], 0)
        nckd = (qt * (qt / qs).log()).sum()
        total += (alpha * tckd + beta * nckd).item() * T * T
    return total / s.shape[0]


def test_rkd_matches_written_out_distances_and_angles():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g) * 4
    assert losses.rkd(s.double(), t.double(), 25.0, 50.0).item() == pytest.approx(_rkd_by_hand(s, t, 25.0, 50.0), abs=1e-5)


def test_sp_matches_row_normalised_gram_by_hand():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    assert losses.sp(s.double(), t.double()).item() == pytest.approx(_sp_by_hand(s, t), abs=1e-5)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_cc_matches_taylor_kernel_by_hand(order):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert losses.cc(s.double(), t.double(), 0.4, order).item() == pytest.approx(_cc_by_hand(s, t, 0.4, order), abs=1e-5)


@pytest.mark.parametrize("alpha, beta, T", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_binary_and_non_target_kl_by_hand(alpha, beta, T):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 6, generator=g) * 2, torch.randn(8, 6, generator=g) * 2
    y = torch.randint(0, 6, (8,), generator=g)
    got = losses.dkd(s.double(), t.double(), y, alpha, beta, T).item()
    assert got == pytest.approx(_dkd_by_hand(s, t, y, alpha, beta, T), abs=1e-5)


ZOO = {
    "rkd": lambda s, t, y: losses.rkd(s, t),
    "sp": lambda s, t, y: losses.sp(s, t),
    "cc": lambda s, t, y: losses.cc(s, t),
    "dkd": lambda s, t, y: losses.dkd(s, t, y),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_loss_is_zero_when_student_equals_teacher(name):
    x = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert ZOO[name](x.clone(), x.clone(), y).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("batch", ["one_class", "repeated", "two"])
def test_zoo_loss_is_finite_with_finite_gradient_on_degenerate_batches(name, batch):
    g = torch.Generator().manual_seed(4)
    if batch == "one_class":
        s, t, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.zeros(6, dtype=torch.long)
    elif batch == "repeated":
        s, t, y = torch.randn(1, 5, generator=g).repeat(6, 1), torch.randn(1, 5, generator=g).repeat(6, 1), torch.zeros(6, dtype=torch.long)
    else:
        s, t, y = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g), torch.tensor([0, 1])
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = ZOO[name](s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert t.grad is None  # gradient to the student only


def test_geometry_and_zoo_losses_are_registered():
    assert set(losses.LOSSES) == {"kd", "feature", "geometry", "rkd", "sp", "cc", "dkd", "at", "pkt", "nst", "vid", "dist", "crd",
                                "ofd", "reviewkd", "ctkd"}


TERMS = {  # every term of LOSSES on (student tensor, teacher tensor, labels)
    "kd": lambda s, t, y: losses.kd(s, t, 4.0),
    "feature": lambda s, t, y: losses.feature(s, t),
    "geometry": lambda s, t, y: losses.geometry(s, t),
    **ZOO,
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_teacher_side_of_every_term_is_a_constant(name):
    """One rule for all terms: a plain backward() never reaches the teacher's tensor, even when it requires grad."""
    assert set(TERMS) == set(losses.LOSSES) - {"at", "nst", "vid", "pkt", "dist", "crd", "ofd", "reviewkd", "ctkd"}  # those:
    # tests/test_methods.py
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g, requires_grad=True)
    TERMS[name](s, t, torch.tensor([0, 1, 2, 3, 4, 0])).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None
