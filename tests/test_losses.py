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
