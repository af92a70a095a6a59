import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdbench.data import DataError, _digits_arrays, augment, load_data, normalize, stratified_split, synthetic_images


def test_stratified_split_is_deterministic_disjoint_and_proportional():
    y = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    a, b, c = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    assert len(np.intersect1d(a, b)) == 0 and len(np.intersect1d(a, c)) == 0 and len(np.intersect1d(b, c)) == 0
    assert len(a) + len(b) + len(c) == len(y)
    for k in range(5):
        n = (y == k).sum()
        assert (y[b] == k).sum() == round(0.2 * n) and (y[c] == k).sum() == round(0.2 * n)
    again = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    assert all((u == v).all() for u, v in zip((a, b, c), again))
    other = stratified_split(y, (0.6, 0.2, 0.2), seed=4)
    assert not (other[1] == b).all()


def _crop_flip_by_hand(img, dy, dx, mirror, pad):
    p = F.pad(img, (pad, pad, pad, pad))
    h, w = img.shape[1:]
    out = p[:, dy:dy + h, dx:dx + w]
    return out.flip(2) if mirror else out


def test_augment_equals_per_image_crop_and_flip():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    pad = 2
    g1 = torch.Generator().manual_seed(5)
    got = augment(x, pad, True, g1)
    g2 = torch.Generator().manual_seed(5)  # replay the same random draws
    dy = torch.randint(0, 2 * pad + 1, (16, 1, 1, 1), generator=g2).flatten()
    dx = torch.randint(0, 2 * pad + 1, (16, 1, 1, 1), generator=g2).flatten()
    mirror = (torch.rand((16, 1, 1, 1), generator=g2) < 0.5).flatten()
    for i in range(16):
        assert torch.equal(got[i], _crop_flip_by_hand(x[i], int(dy[i]), int(dx[i]), bool(mirror[i]), pad))
    assert got.dtype == torch.uint8 and mirror.any() and not mirror.all()


def test_augment_without_crop_only_flips_and_identity_without_either():
    x = torch.randint(0, 256, (32, 1, 4, 4), dtype=torch.uint8)
    out = augment(x, 0, True, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert (same | flipped).all() and flipped.any()
    assert torch.equal(augment(x, 0, False), x)


def test_normalize_uses_mean_and_std_on_the_unit_scale():
    x = torch.full((1, 2, 1, 1), 51, dtype=torch.uint8)  # 0.2
    out = normalize(x, (0.1, 0.2), (0.5, 0.25))
    assert out.flatten().tolist() == pytest.approx([0.2, 0.0], abs=1e-6)


def test_digits_splits_are_stratified_uint8_and_cover_every_image():
    d = load_data("digits")
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (1, 8, 8)
    assert len(d.train_x) + len(d.val_x) + len(d.test_x) == 1797
    for split in ("train", "val", "test"):
        counts = torch.bincount(d.split(split)[1], minlength=10).float()
        assert counts.min() / counts.max() > 0.8
    assert d.train_x.max() == 255


def test_digits_are_read_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    images, y = _digits_arrays()
    ref = load_digits()
    assert np.array_equal(images, ref.images) and np.array_equal(y, ref.target) and y.dtype == np.int64
    d = load_data("digits")  # every image, once, in some split (the scaling 0..16 -> 0..255 is exact for 16)
    x = torch.cat([d.train_x, d.val_x, d.test_x]).reshape(-1, 64).double()
    expect = torch.tensor(np.round(ref.data * 255 / 16))
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, expect.tolist()))


def test_synthetic_is_deterministic_and_has_superclass_geometry():
    x1, y1, coarse = synthetic_images(4, seed=7)
    x2, _, _ = synthetic_images(4, seed=7)
    assert np.array_equal(x1, x2) and x1.shape == (400, 3, 32, 32) and x1.dtype == np.uint8
    assert len(np.unique(coarse)) == 20
    # Class means: classes of one superclass are closer than classes of different superclasses.
    means = torch.tensor(x1.reshape(100, 4, -1).mean(1), dtype=torch.float64)
    d = torch.cdist(means, means)
    same = torch.tensor(coarse)[:, None] == torch.tensor(coarse)[None, :]
    off = ~torch.eye(100, dtype=torch.bool)
    assert d[same & off].mean() < d[~same].mean()


def _write_cifar100(root, n_train=40, n_test=20):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = [i % 100 for i in range(n)]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [i % 20 for i in labels],
                         "filenames": [f"{i}.png" for i in range(n)], "batch_label": name}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, f)
    return data


def test_cifar100_reads_the_python_pickle_format(tmp_path):
    test_rows = _write_cifar100(tmp_path, n_train=400, n_test=20)
    d = load_data("cifar100", tmp_path)
    assert d.num_classes == 100 and d.test_x.shape == (20, 3, 32, 32)
    assert len(d.train_x) + len(d.val_x) == 400
    # Channel-major rows: the first 1024 bytes are the red plane, row-major.
    assert torch.equal(d.test_x[0, 0].flatten(), torch.tensor(test_rows[0, :1024]))
    assert torch.equal(d.test_x[0, 2].flatten(), torch.tensor(test_rows[0, 2048:]))
    assert d.class_names[3] == "c3"


def test_cifar_missing_archive_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        load_data("cifar100", tmp_path)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    _write_cifar100(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        load_data("cifar100", tmp_path)


def test_unknown_dataset_names_the_allowed_ones():
    with pytest.raises(DataError, match="digits, synthetic, cifar10, cifar100"):
        load_data("mnist")
