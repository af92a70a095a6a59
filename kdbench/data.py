"""Data sets as uint8 tensors on the training device, stratified splits, batched augmentation.

Every data set is a :class:`Data`: uint8 images ``[N, C, H, W]`` and int64 labels for the train,
val and test splits, moved once to the training device. Augmentation (random crop with zero
padding, horizontal flip) runs on the whole batch as tensor ops on that device: no PIL, no
DataLoader workers in the hot loop.
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["Data", "DATASETS", "DataError", "load_data", "augment", "normalize", "stratified_split"]


class DataError(ValueError):
    """Bad data-set input: unknown name, missing or malformed archive."""


@dataclass(frozen=True)
class Data:
    """One data set, split and resident on a device."""

    name: str
    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    pad: int  # random-crop padding in pixels (0: no crop)
    flip: bool  # random horizontal flip
    class_names: tuple[str, ...] = ()

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (images, labels) of split ``train``, ``val`` or ``test``."""
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def to(self, device: torch.device | str) -> "Data":
        moved = {k: getattr(self, k).to(device) for k in
                 ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return Data(**{**self.__dict__, **moved})


# ---------------------------------------------------------------------------------------------
# Batched augmentation and normalisation (run on the training device)


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip, per image.

    Equivalent to torchvision's ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()`` applied
    to each image independently, but done for the whole batch with one gather: each output pixel
    reads ``padded[b, c, (dy_b + i) * W' + dx_b + j']`` of the flattened padded image, with ``j'``
    mirrored for the flipped images.
    """
    b, c, h, w = x.shape  # (B, C, H, W) uint8
    dev = x.device
    if pad == 0 and not flip:
        return x
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=dev, generator=generator)
    else:
        dy = dx = torch.zeros((b, 1, 1), dtype=torch.long, device=dev)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    if flip:
        mirror = torch.rand((b, 1, 1), device=dev, generator=generator) < 0.5
        cols = torch.where(mirror, cols.flip(2), cols)  # (B or 1, 1, W)
    wp = w + 2 * pad
    rows = torch.arange(h, device=dev).view(1, h, 1)
    index = ((dy + rows) * wp + dx + cols).view(b, 1, h * w).expand(b, c, h * w)  # (B, C, H*W), a view over C
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: str):
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 standardised per channel: ``(x / 255 - mean) / std`` in one fused op."""
    scale, shift = _affine(tuple(mean), tuple(std), str(x.device))
    return torch.addcmul(shift, x.float(), scale)


# ---------------------------------------------------------------------------------------------
# Splits


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices per class into parts of the given fractions (the rest goes to the first part).

    Returns one sorted index array per fraction; every class is spread over the parts in the same
    proportions, and the result depends only on ``labels``, ``fractions`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        counts = [int(round(f * len(idx))) for f in fractions[1:]]
        first = len(idx) - sum(counts)
        bounds = np.cumsum([0, first, *counts])
        for k in range(len(fractions)):
            parts[k].append(idx[bounds[k]:bounds[k + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))


def _stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale, from the training images only."""
    f = x.astype(np.float64) / 255.0
    return tuple(f.mean(axis=(0, 2, 3)).tolist()), tuple(f.std(axis=(0, 2, 3)).tolist())


def _make(name, x_train, y_train, x_test, y_test, val_fraction, seed, num_classes, pad, flip, names=()):
    """Carve a stratified val split out of train; standardise with train statistics."""
    tr, va = stratified_split(y_train, (1 - val_fraction, val_fraction), seed)
    mean, std = _stats(x_train[tr])
    (trx, try_), (vax, vay), (tex, tey) = (_tensors(x_train[tr], y_train[tr]),
                                           _tensors(x_train[va], y_train[va]), _tensors(x_test, y_test))
    return Data(name, trx, try_, vax, vay, tex, tey, num_classes, mean, std, pad, flip, tuple(names))


# ---------------------------------------------------------------------------------------------
# The data sets


def _digits(root: Path, seed: int, download: bool) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
    y = d.target.astype(np.int64)
    rest, test = stratified_split(y, (0.8, 0.2), seed + 1)
    # A mirrored digit is another glyph: crop jitter of one pixel only, no flip.
    return _make("digits", x[rest], y[rest], x[test], y[test], 0.125, seed, 10, pad=1, flip=False,
                 names=[str(i) for i in range(10)])


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and plain containers, and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR python-pickle batch ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python-pickle file (expected a dict)")
    return obj


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    data = np.asarray(d.get("data", ()), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or label_key not in d:
        raise DataError(f"{path}: expected 'data' of shape (N, 3072) and '{label_key}'")
    return data.reshape(-1, 3, 32, 32), np.asarray(d[label_key], dtype=np.int64)


def _cifar(root: Path, seed: int, download: bool, fine: bool) -> Data:
    """CIFAR-10/100 from the standard python-pickle archives under ``root``."""
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    name = "cifar100" if fine else "cifar10"
    if not folder.is_dir() and download:
        import torchvision

        cls = torchvision.datasets.CIFAR100 if fine else torchvision.datasets.CIFAR10
        try:
            cls(str(root), download=True)
        except Exception as e:  # no internet, disk full, ...: say so in one line
            raise DataError(f"--data-root {root}: could not download {name} ({e})") from None
    if not folder.is_dir():
        raise DataError(f"--data-root {root}: no {folder.name}/ folder; put the python version of "
                        f"{name.upper()} there (https://www.cs.toronto.edu/~kriz/cifar.html, "
                        f"'{folder.name}' once unpacked) or pass --download where the internet is reachable")
    if fine:
        train_files, test_files, key = ["train"], ["test"], "fine_labels"
        meta, names_key = folder / "meta", "fine_label_names"
    else:
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
        meta, names_key = folder / "batches.meta", "label_names"
    for f in train_files + test_files:
        if not (folder / f).is_file():
            raise DataError(f"--data-root {root}: {folder.name}/{f} is missing")
    xs, ys = zip(*(_cifar_batch(folder / f, key) for f in train_files))
    x_test, y_test = _cifar_batch(folder / test_files[0], key)
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    num_classes = 100 if fine else 10
    if y_train.min() < 0 or max(y_train.max(), y_test.max()) >= num_classes:
        raise DataError(f"{folder}: labels outside 0..{num_classes - 1}")
    names = _unpickle(meta).get(names_key, ()) if meta.is_file() else ()
    return _make(name, x_train, y_train, x_test, y_test, 0.1, seed, num_classes, pad=4, flip=True,
                 names=names)


def synthetic_images(n_per_class: int, seed: int, num_classes: int = 100, superclasses: int = 20):
    """Procedural 3x32x32 images whose class geometry is known by construction.

    Each superclass has a smooth random prototype; each class adds a smaller smooth pattern of its
    own, so classes of one superclass are closer to each other than to the rest. Each image is its
    class pattern, randomly shifted, with pixel noise. Deterministic from ``seed``.
    Returns uint8 images (N, 3, 32, 32), labels (N,) and the superclass of each class (C,).
    """
    g = torch.Generator().manual_seed(seed)

    def smooth(n: int, scale: float) -> torch.Tensor:  # low-frequency pattern: 8x8 noise upsampled
        z = torch.randn(n, 3, 8, 8, generator=g) * scale
        return torch.nn.functional.interpolate(z, size=(32, 32), mode="bicubic", align_corners=False)

    coarse = torch.arange(num_classes) % superclasses  # (C,)
    proto = smooth(superclasses, 1.0)[coarse] + smooth(num_classes, 0.35)  # (C, 3, 32, 32)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = proto[y]
    shifts = torch.randint(-3, 4, (len(y), 2), generator=g)
    x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(x, shifts)])
    x = x + 0.9 * torch.randn(x.shape, generator=g)
    x = ((x.clamp(-2.5, 2.5) + 2.5) * (255 / 5)).round().to(torch.uint8)
    return x.numpy(), y.numpy(), coarse.numpy()


def _synthetic(root: Path, seed: int, download: bool) -> Data:
    """100 classes in 20 superclasses, 60 images a class (42 train, 6 val, 12 test); images fixed, split from seed."""
    x, y, _ = synthetic_images(60, seed=1234)
    rest, test = stratified_split(y, (0.8, 0.2), seed + 1)
    return _make("synthetic", x[rest], y[rest], x[test], y[test], 0.125, seed, 100, pad=4, flip=True,
                 names=[f"class{i}" for i in range(100)])


DATASETS = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": lambda root, seed, download: _cifar(root, seed, download, fine=False),
    "cifar100": lambda root, seed, download: _cifar(root, seed, download, fine=True),
}


def load_data(name: str, root: str | Path = "data", seed: int = 0, download: bool = False,
              device: torch.device | str = "cpu") -> Data:
    """Load a data set by name, split with ``seed`` (fixed across trials), moved to ``device``.

    Args:
        name: one of ``DATASETS``.
        root: folder holding the CIFAR archives (ignored by ``digits`` and ``synthetic``).
        seed: seed of the stratified train/val(/test) split.
        download: fetch CIFAR with torchvision when the archive is missing.
        device: where the tensors live for training.
    """
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is unknown; allowed: {', '.join(DATASETS)}")
    return DATASETS[name](Path(root).expanduser(), seed, download).to(device)
