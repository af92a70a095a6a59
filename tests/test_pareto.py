import numpy as np
import pytest

from kdbench.pareto import hypervolume_2d, knee_index, pareto_mask


def _brute_force(p):
    keep = []
    for i in range(len(p)):
        dominated = any(np.all(p[j] >= p[i]) and np.any(p[j] > p[i]) for j in range(len(p)) if j != i)
        keep.append(not dominated)
    return np.array(keep)


@pytest.mark.parametrize("seed", range(20))
def test_pareto_mask_equals_brute_force_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 6, size=(40, 2)).astype(float)  # coarse grid: many ties and duplicates
    p = np.vstack([p, p[:5]])
    assert (pareto_mask(p) == _brute_force(p)).all()


def test_hypervolume_hand_worked():
    # Staircase (3,1), (2,2), (1,3) above reference (0,0): 3*1 + 2*1 + 1*1 = 6.
    pts = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0], [1.5, 1.5]])  # the last one is dominated
    assert hypervolume_2d(pts, (0.0, 0.0)) == pytest.approx(6.0)
    # Reference (1.5, 0.5): only x > 1.5 and y > 0.5 count: (3-1.5)*(1-0.5) + (2-1.5)*(2-1) = 1.25.
    assert hypervolume_2d(pts, (1.5, 0.5)) == pytest.approx(1.25)
    assert hypervolume_2d(pts, (5.0, 5.0)) == 0.0


def test_hypervolume_equals_grid_count_on_random_points():
    rng = np.random.default_rng(3)
    pts = rng.integers(1, 10, size=(12, 2)).astype(float)
    cells = sum(1 for x in range(10) for y in range(10)
                if any(px >= x + 1 and py >= y + 1 for px, py in pts))  # unit cells dominated
    assert hypervolume_2d(pts, (0.0, 0.0)) == pytest.approx(cells)


def test_knee_is_on_the_front_and_balanced():
    pts = np.array([[10.0, 0.0], [9.0, 9.0], [0.0, 10.0]])
    assert knee_index(pts) == 1
    rng = np.random.default_rng(0)
    p = rng.random((30, 2))
    front = p[pareto_mask(p)]
    k = knee_index(front)
    assert 0 <= k < len(front)
