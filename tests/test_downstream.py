"""Retrieval and clustering measures against hand-worked cases and a plain loop."""

import numpy as np
import pytest
import torch

from kdbench.downstream import ari, clustering, kmeans, nmi, payoff, retrieval, spearman, within_bands


def test_map_at_r_and_r_at_1_by_hand():
    """Reference: two of class 0 at angles 0 and 10 degrees, one of class 1 at 90. A class-0 query at 5 degrees
    has R = 2 and both nearest are class 0: AP@R = 1. A class-0 query at 80 degrees sees class 1 first, then
    the 10-degree one: AP@R = (0 + 1/2) / 2 = 0.25; its R@1 is 0."""
    deg = lambda a: torch.tensor([[np.cos(np.radians(a)), np.sin(np.radians(a))]], dtype=torch.float32)
    ref = torch.cat([deg(0), deg(10), deg(90)])
    ref_y = torch.tensor([0, 0, 1])
    q, q_y = torch.cat([deg(5), deg(80)]), torch.tensor([0, 0])
    got = retrieval(q, q_y, ref * 3.0, ref_y)  # the scale of the features changes nothing (cosine)
    assert got["map_at_r"] == pytest.approx((1.0 + 0.25) / 2) and got["r_at_1"] == pytest.approx(0.5)


def test_retrieval_matches_a_plain_loop_and_ignores_the_chunking():
    g = torch.Generator().manual_seed(0)
    ref, ref_y = torch.randn(60, 5, generator=g), torch.randint(0, 4, (60,), generator=g)
    q, q_y = torch.randn(23, 5, generator=g), torch.randint(0, 4, (23,), generator=g)
    aps, hits = [], []
    r_n, q_n = ref / ref.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    for i in range(len(q)):
        order = np.argsort(-(r_n @ q_n[i]).numpy(), kind="stable")
        rel = (ref_y.numpy()[order] == q_y[i].item()).astype(float)
        r = int((ref_y == q_y[i]).sum())
        aps.append(sum(rel[:k + 1].sum() / (k + 1) * rel[k] for k in range(r)) / r)
        hits.append(rel[0])
    for chunk in (4, 512):
        got = retrieval(q, q_y, ref, ref_y, chunk=chunk)
        assert got["map_at_r"] == pytest.approx(np.mean(aps), abs=1e-6) and got["r_at_1"] == pytest.approx(np.mean(hits))


def test_clustering_is_one_for_separated_classes_and_about_zero_for_noise():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4) * 10
    y = torch.arange(4).repeat_interleave(25)
    apart = centres[y] + 0.1 * torch.randn(100, 4, generator=g)
    assert clustering(apart, y, 4) == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    noise = clustering(torch.randn(100, 4, generator=g), y, 4)
    assert noise["ari"] < 0.1 and noise["nmi"] < 0.2


def test_nmi_and_ari_of_two_classes_in_one_cluster_by_hand():
    """Four classes of 25, three places (classes 2 and 3 share one), three clusters: k-means finds the places.
    NMI (arithmetic): I = H(clusters) = ln 4 - ln(2) / 2, H(classes) = ln 4, so 2 I / (H + H) = 0.857143; ARI from
    the pair counts: sum C(n_ij, 2) = 1200, classes 1200, clusters 1825, C(100, 2) = 4950."""
    g = torch.Generator().manual_seed(2)
    y = torch.arange(4).repeat_interleave(25)
    places = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [0, 0, 10.0]])
    got = clustering(places[y] + 0.1 * torch.randn(100, 3, generator=g), y, 3)
    h_c = np.log(4) - np.log(2) / 2
    expected = 1200 * 1825 / 4950
    assert got["nmi"] == pytest.approx(2 * h_c / (np.log(4) + h_c), abs=1e-9)
    assert got["ari"] == pytest.approx((1200 - expected) / ((1200 + 1825) / 2 - expected), abs=1e-9)


def test_nmi_and_ari_equal_scikit_learns_on_fixed_labelings():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    g = np.random.default_rng(5)
    cases = [(g.integers(0, 7, 200), g.integers(0, 5, 200)), (np.repeat(np.arange(4), 25), np.repeat(np.arange(4), 25)[::-1]),
             (np.zeros(10, int), np.zeros(10, int)), (np.arange(10), np.zeros(10, int)), (g.integers(0, 3, 50), np.arange(50))]
    for a, b in cases:
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)
        assert ari(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-12)


def test_kmeans_finds_separated_clusters_and_reaches_scikit_learns_inertia_on_blobs():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(4)
    centres = torch.randn(8, 16, generator=g) * 3
    y = torch.arange(8).repeat_interleave(40)
    x = centres[y] + torch.randn(320, 16, generator=g)
    found = kmeans(x, 8, seed=0)
    assert ari(y.numpy(), found.numpy()) == pytest.approx(1.0) and torch.equal(found, kmeans(x, 8, seed=0))
    ours = float(((x.double() - torch.stack([x[found == c].double().mean(0) for c in range(8)])[found]) ** 2).sum())
    ref = KMeans(8, n_init=4, random_state=0).fit(x.double().numpy()).inertia_
    assert ours <= ref * 1.0001  # the same optimum here (well separated)
    noisy = torch.randn(300, 5, generator=g)
    mine = kmeans(noisy, 6, seed=1)
    inertia = float(((noisy.double() - torch.stack([noisy[mine == c].double().mean(0) for c in range(6)])[mine]) ** 2).sum())
    assert inertia <= KMeans(6, n_init=4, random_state=1).fit(noisy.double().numpy()).inertia_ * 1.05


def test_spearman_equals_scipys_and_the_band_rho_is_the_weighted_mean_of_the_bands():
    from scipy.stats import spearmanr

    g = np.random.default_rng(3)
    x, y = g.random(30), g.random(30)
    y[:5] = y[5]  # ties: average ranks
    assert spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert np.isnan(spearman(x, np.ones(30))) and np.isnan(spearman(x[:2], y[:2]))
    # Bands [96, 97) and [97, 98): 5 and 4 runs; a band of 2 (at 98) is left out.
    top1 = np.array([96.1, 96.2, 96.5, 96.7, 96.9, 97.0, 97.3, 97.5, 97.8, 98.2, 98.4])
    xs, ys = g.random(11), g.random(11)
    rho, n = within_bands(xs, ys, top1)
    assert n == 9 and rho == pytest.approx((5 * spearmanr(xs[:5], ys[:5])[0] + 4 * spearmanr(xs[5:9], ys[5:9])[0]) / 9)


def test_payoff_sees_a_planted_relation_inside_bands_and_none_in_noise():
    """A measure that follows geom_corr within every top-1 band: rho near 1 overall and in bands, intervals that
    hold it; independent noise: an interval around 0. A monotone transform of geom_corr changes nothing (ranks)."""
    import pandas as pd

    g = np.random.default_rng(0)
    n = 40
    corr = g.random(n)
    top1 = 95 + 4 * g.random(n)
    runs = pd.DataFrame({"test_geom_corr": corr, "test_top1": top1, "test_map_at_r": corr + 0.01 * g.random(n),
                         "test_nmi": g.random(n)})
    got = {r["measure"]: r for r in payoff(runs, resamples=500)}
    assert set(got) == {"map_at_r", "nmi"} and got["map_at_r"]["runs"] == n
    m = got["map_at_r"]
    assert m["rho"] > 0.95 and m["rho_in_band"] > 0.95 and m["rho_ci"][0] <= m["rho"] <= m["rho_ci"][1]
    assert got["nmi"]["rho_ci"][0] < 0 < got["nmi"]["rho_ci"][1]
    warped = payoff(runs.assign(test_geom_corr=np.exp(5 * corr)), resamples=500)
    assert [w["rho"] for w in warped] == pytest.approx([got[w["measure"]]["rho"] for w in warped])
    assert payoff(runs.head(11)) == []  # too few runs: no answer
