"""Data sets as uint8 tensors on the training device, stratified splits, batched augmentation.

Every data set is a :class:`Data`: uint8 images ``[N, C, H, W]`` and int64 labels for the train,
val and test splits, moved once to the training device. Augmentation (random crop with zero
padding, horizontal flip) runs on the whole batch as tensor ops on that device: no PIL, no
DataLoader workers in the hot loop.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import DataError

if TYPE_CHECKING:
    from .stream import StreamData

__all__ = ["Data", "DATASETS", "DATA_OPTIONS", "DataError", "load_data", "check_data", "canonical", "cache_dir", "augment",
           "normalize", "stratified_split", "reference_rows"]


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
    key: str = ""  # non-default options / an image folder's contents: part of the teacher's cache key
    skipped: int = 0  # unreadable images left out (image folders with skip_bad_images)
    streamed = False  # every image decoded, on the device (kdbench.stream: read from disk as it is used)

    # What training and measuring read (a streamed data set answers the same): the device, the image shape, a
    # split's labels and size, one epoch's training batches, a split's images in order.

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(self.train_x.shape[1:])

    def labels(self, split: str) -> torch.Tensor:
        """The int64 labels of split ``train``, ``val`` or ``test``, in the split's order, on the device."""
        return getattr(self, f"{split}_y")

    def size(self, split: str) -> int:
        return len(self.labels(split))

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (images, labels) of split ``train``, ``val`` or ``test``."""
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def train_batches(self, batch_size: int, generator: torch.Generator, skip: int = 0, share: slice = slice(None)):
        """One epoch: ``size("train") // batch_size`` batches (the last partial one dropped) in the order of a
        permutation drawn from ``generator`` when called, each ``(images, labels, indices)``: uint8 ``(B, C, H, W)``
        images augmented on the device (:func:`augment`, same generator), their labels, their rows in the train
        split. Lazy: a batch's draws follow whatever the loop drew from ``generator`` for the batch before.
        ``skip``: the epoch's first batches are left out, drawing nothing (a run resumed mid-epoch). ``share``: a
        data-parallel worker's rows of each batch (:meth:`kdbench.parallel.World.share`), drawn as the whole batch's."""
        n = self.size("train")
        perm = torch.randperm(n, device=self.device, generator=generator)
        return ((augment(self.train_x[idx], self.pad, self.flip, generator)[share], self.train_y[idx][share], idx[share])
                for idx in (perm[i * batch_size:(i + 1) * batch_size] for i in range(skip, n // batch_size)))

    def chunks(self, split: str, batch_size: int = 1000, rows: torch.Tensor | None = None):
        """Split ``split`` in order (or its ``rows``), ``(images, labels)`` of at most ``batch_size``: uint8 images
        on the device, not augmented (what every measuring pass reads)."""
        x, y = self.split(split)
        n = len(y) if rows is None else len(rows)
        for i in range(0, n, batch_size):
            take = slice(i, i + batch_size) if rows is None else rows[i:i + batch_size]
            yield x[take], y[take]

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
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device).view(1, -1, 1, 1)
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


def reference_rows(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor | None:
    """Rows of a split holding at most ``per_class`` images of each class, drawn without replacement from a
    permutation seeded ``seed`` (the same for every trial), sorted; None for ``per_class`` 0 (every row)."""
    if not per_class:
        return None
    y = labels.cpu().numpy()
    order = np.random.default_rng(seed).permutation(len(y))
    ranked = np.empty(len(y), dtype=np.int64)  # each row's place among its class's rows in that order
    for c in np.unique(y):
        members = order[y[order] == c]
        ranked[members] = np.arange(len(members))
    return torch.from_numpy(np.flatnonzero(ranked < per_class)).to(labels.device)


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y.astype(np.int64))


def _stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the 0..1 scale, from the training images only: exact, from each channel's
    256-bin histogram (no float copy of the images: CIFAR's would take 1.2 GB)."""
    v = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        h = np.bincount(np.ascontiguousarray(x[:, c]).reshape(-1), minlength=256)
        m = float(h @ v / h.sum())
        mean.append(m)
        std.append(float(np.sqrt(h @ (v - m) ** 2 / h.sum())))
    return tuple(mean), tuple(std)


def _make(name, x_train, y_train, x_test, y_test, seed, num_classes, names, options: dict, val=None, **defaults):
    """Carve a stratified val split out of train (unless ``val`` is given); standardise with train statistics.

    ``defaults``: the data set's ``val_fraction``, ``pad`` and ``flip``, which ``options`` override."""
    o = {**defaults, **{k: v for k, v in options.items() if k in defaults}}
    if val is None:
        tr, va = stratified_split(y_train, (1 - o["val_fraction"], o["val_fraction"]), seed)
        x_train, y_train, val = x_train[tr], y_train[tr], (x_train[va], y_train[va])
    # The first k images of each class of a split: a quick run of a big recipe (a smoke test, not a result).
    first = lambda y, k: np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in np.unique(y)]))
    if "train_per_class" in options:
        keep = first(y_train, options["train_per_class"])
        x_train, y_train = x_train[keep], y_train[keep]
    if "test_per_class" in options:
        keep = first(y_test, options["test_per_class"])
        x_test, y_test = x_test[keep], y_test[keep]
    mean, std = _stats(x_train)
    (trx, try_), (vax, vay), (tex, tey) = (_tensors(x_train, y_train), _tensors(*val), _tensors(x_test, y_test))
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16] if options else ""
    return Data(name, trx, try_, vax, vay, tex, tey, num_classes, mean, std, o["pad"], o["flip"], tuple(names), key)


# ---------------------------------------------------------------------------------------------
# The data sets


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits' (N, 8, 8) float images (0..16) and int64 labels, read from the CSV file scikit-learn
    ships (what ``sklearn.datasets.load_digits`` reads) without importing scikit-learn: that import
    alone costs 1.5 s at every start of a command."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():  # another scikit-learn layout: ask it
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target.astype(np.int64)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(root: Path, seed: int, download: bool, options: dict) -> Data:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); no download."""
    images, y = _digits_arrays()
    x = np.round(images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 0..16 -> 0..255
    rest, test = stratified_split(y, (0.8, 0.2), seed + 1)
    # A mirrored digit is another glyph: crop jitter of one pixel only, no flip.
    return _make("digits", x[rest], y[rest], x[test], y[test], seed, 10, [str(i) for i in range(10)], options,
                 val_fraction=0.125, pad=1, flip=False)


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


def _cifar(root: Path, seed: int, download: bool, options: dict, fine: bool) -> Data:
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
    return _make(name, x_train, y_train, x_test, y_test, seed, num_classes, names, options,
                 val_fraction=0.1, pad=4, flip=True)


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


def _synthetic(root: Path, seed: int, download: bool, options: dict) -> Data:
    """100 classes in 20 superclasses, 60 images a class (42 train, 6 val, 12 test); images fixed, split from seed."""
    x, y, _ = synthetic_images(60, seed=1234)
    rest, test = stratified_split(y, (0.8, 0.2), seed + 1)
    return _make("synthetic", x[rest], y[rest], x[test], y[test], seed, 100, [f"class{i}" for i in range(100)],
                 options, val_fraction=0.125, pad=4, flip=True)


DATASETS = {
    "digits": _digits,
    "synthetic": _synthetic,
    "cifar10": lambda root, seed, download, options: _cifar(root, seed, download, options, fine=False),
    "cifar100": lambda root, seed, download, options: _cifar(root, seed, download, options, fine=True),
}

# [data] options of a study (and --image-size, --val-fraction, --skip-bad-images): name -> (check, allowed)
DATA_OPTIONS = {
    "val_fraction": (lambda v: isinstance(v, float) and 0 <= v < 1,
                     "a number >= 0 and < 1 (0: train on the whole training split, no validation; grids only)"),
    "pad": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0 (0: no random crop)"),
    "flip": (lambda v: isinstance(v, bool), "true or false"),
    "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 4, "an integer >= 4 (pixels)"),
    "skip_bad_images": (lambda v: isinstance(v, bool), "true or false"),
    "stream": (lambda v: v in (True, False, "auto"),
               '"auto" (stream from disk where the decoded images would not fit), true or false'),
    "loader_workers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                       "an integer >= 0 (DataLoader worker processes decoding a streamed folder; 0: in the training process)"),
    "mean": (lambda v: isinstance(v, list) and v and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in v),
             "a list of per-channel means on the 0..1 scale (a streamed folder; e.g. ImageNet's [0.485, 0.456, 0.406])"),
    "std": (lambda v: isinstance(v, list) and v and all(isinstance(x, (int, float)) and 0 < x <= 1 for x in v),
            "a list of per-channel standard deviations on the 0..1 scale (a streamed folder; e.g. [0.229, 0.224, 0.225])"),
    "train_per_class": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                        "an integer >= 1 (train on the first N images of each class)"),
    "test_per_class": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                       "an integer >= 1 (test on the first N images of each class)"),
}
FOLDER_ONLY = ("image_size", "skip_bad_images", "stream", "loader_workers", "mean", "std")


def check_data(name: str, options: dict | None = None, where: str = "--dataset") -> dict:
    """Validate a data-set name (one of ``DATASETS`` or ``folder:PATH``) and its options; return the options."""
    options = dict(options or {})
    is_folder = name.startswith("folder:")
    if not (name in DATASETS or (is_folder and name[len("folder:"):].strip())):
        raise DataError(f"{where} {name!r} is unknown; allowed: {', '.join(DATASETS)}, folder:PATH (an image folder "
                        f"with train/<class>/ and test/<class>/)")
    for key, value in options.items():
        if key not in DATA_OPTIONS:
            raise DataError(f"{where}: data option {key!r} is unknown; allowed: {', '.join(DATA_OPTIONS)}")
        if isinstance(value, int) and not isinstance(value, bool) and key == "val_fraction":
            value = options[key] = float(value)
        ok, allowed = DATA_OPTIONS[key]
        if not ok(value):
            raise DataError(f"{where}: {key} = {value!r}; allowed: {allowed}")
        if key in FOLDER_ONLY and not is_folder:
            raise DataError(f"{where}: {key} = {value!r}; allowed only for image folders (dataset = \"folder:PATH\")")
    return options


def canonical(name: str) -> str:
    """A data set's name as results record it: an image folder's path made absolute."""
    if name.startswith("folder:"):
        return f"folder:{Path(name[len('folder:'):]).expanduser().resolve()}"
    return name


def cache_dir() -> Path:
    """``$KDBENCH_CACHE``, else ``$XDG_CACHE_HOME/kdbench``, else ``~/.cache/kdbench``."""
    if os.environ.get("KDBENCH_CACHE"):
        return Path(os.environ["KDBENCH_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "kdbench"


def load_data(name: str, root: str | Path = "data", seed: int = 0, download: bool = False,
              device: torch.device | str = "cpu", options: dict | None = None) -> "Data | StreamData":
    """Load a data set by name, split with ``seed`` (fixed across trials), moved to ``device``.

    Args:
        name: one of ``DATASETS``, or ``folder:PATH`` (an image folder, see :mod:`kdbench.images`).
        root: folder holding the CIFAR archives (ignored by the others).
        seed: seed of the stratified train/val(/test) split.
        download: fetch CIFAR with torchvision when the archive is missing.
        device: where the tensors live for training.
        options: ``DATA_OPTIONS`` (a study's ``[data]``): val_fraction, pad, flip; for folders also
            image_size, skip_bad_images, and stream (a :class:`kdbench.stream.StreamData`) with its options.
    """
    options = check_data(name, options)
    if name.startswith("folder:"):
        from .images import folder_data

        return folder_data(name[len("folder:"):], seed, options, torch.device(device)).to(device)
    return DATASETS[name](Path(root).expanduser(), seed, download, options).to(device)
