import numpy as np
import pytest
import torch

from kdbench.geometry import (CentroidMemory, class_centroids, geom_err, geometry_corr, knn_top1, linear_cka,
                              similarity_matrix)


def test_class_centroids_means_and_empty_class():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    c = class_centroids(f, y, 4)
    assert torch.allclose(c, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0], [0.0, 0.0]]))


def test_similarity_matrix_is_pairwise_cosine():
    x = torch.randn(6, 5, dtype=torch.float64)
    s = similarity_matrix(x)
    for i in range(6):
        for j in range(6):
            expected = (x[i] @ x[j]) / (x[i].norm() * x[j].norm())
            assert s[i, j].item() == pytest.approx(expected.item(), abs=1e-10)


def test_geometry_corr_equals_numpy_pearson_on_upper_triangle():
    a, b = torch.randn(8, 3), torch.randn(8, 7)
    sa, sb = similarity_matrix(a), similarity_matrix(b)
    iu = np.triu_indices(8, k=1)
    expected = np.corrcoef(sa.numpy()[iu], sb.numpy()[iu])[0, 1]
    assert geometry_corr(sa, sb) == pytest.approx(expected, abs=1e-5)
    assert geometry_corr(sa, sa) == pytest.approx(1.0, abs=1e-9)
    # Collapsed student features (all zero): a zero similarity matrix keeps no geometry, 0 (not NaN), and
    # is as far from the teacher's as zero is (relative error 1).
    collapsed = similarity_matrix(torch.zeros(8, 3))
    assert geometry_corr(collapsed, sb) == 0.0 and geom_err(collapsed, sb) == pytest.approx(1.0)


def test_geom_err_hand_case():
    s_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s_s = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    # ||S_s - S_t||_F = sqrt(2), ||S_t||_F = sqrt(2)
    assert geom_err(s_s, s_t) == pytest.approx(1.0)


def _cka_hsic(x, y):
    """Second formulation: CKA from Gram matrices, tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return (hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))).item()


def test_linear_cka_matches_gram_formulation_and_invariances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 8, generator=g), torch.randn(50, 5, generator=g)
    y = y + x[:, :5]  # some shared structure
    assert linear_cka(x, y) == pytest.approx(_cka_hsic(x, y), abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x @ q * 3.7 + 2.0, y) == pytest.approx(linear_cka(x, y), abs=1e-6)  # rotation, scale, shift
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-9)


def test_knn_top1_hand_case():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ref_y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    q_y = torch.tensor([0, 1, 1])  # the third query is wrong by construction
    assert knn_top1(ref, ref_y, q, q_y, num_classes=2, k=2) == pytest.approx(200 / 3)


def test_centroid_memory_follows_the_ema_rule_and_scales_gradient():
    m = 0.75
    mem = CentroidMemory(3, 2, m)
    mem.fill(torch.tensor([[1.0, 1.0], [3.0, 3.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]))  # class 2 empty
    assert torch.allclose(mem.bank, torch.tensor([[2.0, 2.0], [0.0, 2.0], [0.0, 0.0]]))
    f = torch.tensor([[6.0, 2.0], [4.0, 0.0]], requires_grad=True)
    mu = mem(f, torch.tensor([0, 2]))
    # class 0: present and filled -> m * M + (1 - m) * batch mean; class 1: absent -> M; class 2: first mean.
    assert torch.allclose(mu, torch.tensor([[0.75 * 2 + 0.25 * 6, 0.75 * 2 + 0.25 * 2], [0.0, 2.0], [4.0, 0.0]]))
    assert torch.allclose(mem.bank, mu.detach())
    assert mem.filled.tolist() == [True, True, True]
    mu[0].sum().backward()
    assert torch.allclose(f.grad[0], torch.full((2,), 1 - m)) and torch.all(f.grad[1] == 0)


def test_bounded_metrics_stay_in_range_for_identical_inputs():
    """A correlation never leaves [-1, 1] and CKA never leaves [0, 1], whatever the rounding."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = torch.randn(10, 7, generator=g)
        s = similarity_matrix(c)
        assert -1.0 <= geometry_corr(s, s.clone()) <= 1.0 and geometry_corr(s, s) == pytest.approx(1.0)
        assert -1.0 <= geometry_corr(s, -s) <= 1.0
        f = torch.randn(30, 5, generator=g)
        assert 0.0 <= linear_cka(f, f.clone()) <= 1.0 and linear_cka(f, f) == pytest.approx(1.0)
