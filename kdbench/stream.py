"""Image folders streamed from disk: read, decoded and augmented in DataLoader worker processes, batch by batch.

A resident data set (:class:`kdbench.data.Data`) holds every decoded image on the training device; ImageNet's
1.28 M JPEGs (~140 GB) do not fit. A :class:`StreamData` answers the same contract -- a split's labels and size,
one epoch's training batches, a split's images in order -- from the files, so that ``distill``, the terms and
the measuring passes do not know which one they read.

Images are decoded with Pillow (every format and mode a folder holds: greyscale, CMYK, PNG among JPEGs) in
``workers`` processes, ``prefetch`` batches ahead, into pinned memory on CUDA and copied without blocking. The
transforms are ImageNet's recipe (torchvision's reference scripts, mdistiller, torchdistill): for training a
random resized crop to ``size`` (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip; for measuring, the shorter
side resized to ``size / 0.875`` (256 for 224) and a centre crop of ``size``. Each training image draws its crop
and flip from its own seed -- the epoch's seed (one draw from the run's generator) plus its position in the
epoch -- so a batch is the same whichever worker decodes it, with any number of workers, and after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

__all__ = ["StreamData", "stream_folder", "crop_box", "EVAL_RESIZE"]

EVAL_RESIZE = 0.875  # measuring: shorter side to size / 0.875, then the centre ``size`` (ImageNet: 256 -> 224)


@dataclass(frozen=True)
class StreamData:
    """An image folder read from disk as it is used (see the module's docstring)."""

    name: str
    root: str
    files: dict  # split -> tuple of paths relative to root, in the split's order
    targets: dict  # split -> int64 labels (CPU until :meth:`to`)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int  # 1: every image greyscale, else 3 (RGB)
    class_names: tuple[str, ...] = ()
    key: str = ""
    skip_bad_images: bool = False
    workers: int = 0  # DataLoader worker processes (0: decode in the training process)
    prefetch: int = 4  # batches each worker decodes ahead
    where: str = "cpu"
    skipped: int = 0
    bad: list = field(default_factory=list, compare=False)  # (path, reason) skipped while streaming, this process

    streamed, pad, flip = True, 0, True  # resident data sets' augmentation, for what reads it; here: random resized crop + flip

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def device(self) -> torch.device:
        return torch.device(self.where)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.channels, self.image_size, self.image_size

    def labels(self, split: str) -> torch.Tensor:
        return self.targets[split]

    def size(self, split: str) -> int:
        return len(self.files[split])

    def to(self, device) -> "StreamData":
        return dataclasses.replace(self, where=str(torch.device(device)),
                                   targets={s: t.to(device) for s, t in self.targets.items()}, bad=[])

    def train_batches(self, batch_size: int, generator: torch.Generator, skip: int = 0, share: slice = slice(None)):
        """One epoch's batches, as :meth:`kdbench.data.Data.train_batches`; the permutation and every image's
        crop and flip come from one seed drawn from ``generator`` when called (one host read an epoch), so a run
        resumed mid-epoch (``skip``) decodes none of the batches it left out and draws the others as before, and a
        data-parallel worker decodes only its ``share`` of each batch."""
        n = self.size("train")
        seed = int(torch.randint(2 ** 62, (1,), device=generator.device, generator=generator))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        batches = [[(perm[i], seed + i) for i in range(b * batch_size, (b + 1) * batch_size)][share]
                   for b in range(skip, n // batch_size)]
        return self._stream("train", batches, train=True)

    def chunks(self, split: str, batch_size: int = 250, rows: torch.Tensor | None = None):
        """Split ``split`` in order (or its ``rows``), ``(images, labels)``, resized and centre-cropped, not
        augmented."""
        rows = list(range(self.size(split))) if rows is None else rows.tolist()
        batches = [[(i, 0) for i in rows[a:a + batch_size]] for a in range(0, len(rows), batch_size)]
        for x, y, _ in self._stream(split, batches, train=False):
            yield x, y

    def _stream(self, split: str, batches: list, train: bool):
        dataset = _Images(self.root, self.files[split], self.targets[split].cpu(), self.channels, self.image_size, train)
        cuda = self.device.type == "cuda"
        workers = min(self.workers, len(batches))  # a process per batch at most: small passes start few
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate, pin_memory=cuda,
            prefetch_factor=self.prefetch if workers else None, persistent_workers=False)
        for x, y, idx, bad in loader:
            if bad:
                self.bad.extend(bad)
                if not self.skip_bad_images:
                    raise DataError(f"{Path(self.root) / bad[0][0]}: unreadable image ({bad[0][1]}); remove it, or pass "
                                    f"--skip-bad-images ([data] skip_bad_images = true) to leave such files out")
            if len(y):
                yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                       idx.to(self.device, non_blocking=True))


class _Images(torch.utils.data.Dataset):
    """What a DataLoader worker reads: item ``(i, seed)`` -> (uint8 (C, H, W) image, label, i) or, for a file that
    cannot be decoded, (None, path, reason)."""

    def __init__(self, root: str, files: tuple, labels: torch.Tensor, channels: int, size: int, train: bool):
        self.root, self.files, self.labels, self.size, self.train = root, files, labels, size, train
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, seed = item
        from PIL import Image

        try:
            with Image.open(os.path.join(self.root, self.files[i])) as im:
                im = im.convert(self.mode)
                im = _train_view(im, self.size, seed) if self.train else _eval_view(im, self.size)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails here, in the worker
            return None, self.files[i], f"{type(e).__name__}: {e}"
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a)), self.labels[i], i


def _train_view(im, size: int, seed: int):
    """torchvision's RandomResizedCrop(size) (PIL: crop, then bilinear resize) and a horizontal flip, drawn from
    ``seed`` alone."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    left, top, cw, ch = crop_box(*im.size, rng)
    im = im.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    return im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def crop_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random resized crop, as torchvision's ``RandomResizedCrop.get_params``
    draws it: area 8-100 % of the image's, aspect ratio log-uniform in [3/4, 4/3]; after ten misses, the centre
    crop of the nearest allowed ratio."""
    area, log_ratio = w * h, (np.log(3 / 4), np.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = np.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    ratio = w / h
    cw, ch = (w, int(round(w / (3 / 4)))) if ratio < 3 / 4 else (int(round(h * 4 / 3)), h) if ratio > 4 / 3 else (w, h)
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _eval_view(im, size: int):
    """The shorter side resized to ``size / 0.875``, then the centre ``size`` x ``size``."""
    from PIL import Image

    w, h = im.size
    short = int(size / EVAL_RESIZE)
    nw, nh = (short, max(short, int(short * h / w))) if w <= h else (max(short, int(short * w / h)), short)
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    return im.crop((left, top, left + size, top + size))


def _collate(items: list):
    good = [t for t in items if t[0] is not None]
    bad = [(t[1], t[2]) for t in items if t[0] is None]
    if not good:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), bad
    x = torch.stack([t[0] for t in good])
    return x, torch.stack([t[1] for t in good]), torch.tensor([t[2] for t in good]), bad


def stream_folder(path: str, seed: int, options: dict) -> StreamData:
    """An image folder (``train/``, ``test/``, optional ``val/``; see :mod:`kdbench.images`) to stream: listed and
    checked now (an empty class, a class missing from a split, no images: one line), nothing decoded but the
    sample the per-channel statistics come from (``[data] mean``/``std`` where given)."""
    from .data import stratified_split
    from .images import GRAY, _fingerprint, _listing, _probe

    root = Path(path).expanduser().resolve()
    if ("mean" in options) != ("std" in options):
        raise DataError(f"folder:{path}: [data] {'mean' if 'mean' in options else 'std'} without "
                        f"{'std' if 'mean' in options else 'mean'}; allowed: both (per channel) or neither")
    classes, listed = _listing(root)
    size = options.get("image_size", 224)
    rel = {s: tuple(str(p.relative_to(root)) for p, _ in listed[s]) for s in listed}
    labels = {s: np.array([y for _, y in listed[s]], dtype=np.int64) for s in listed}
    if "val" not in rel:
        tr, va = stratified_split(labels["train"], (1 - options.get("val_fraction", 0.1), options.get("val_fraction", 0.1)), seed)
        rel["val"], labels["val"] = tuple(rel["train"][i] for i in va), labels["train"][va]
        rel["train"], labels["train"] = tuple(rel["train"][i] for i in tr), labels["train"][tr]
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(rel["train"]), size=min(len(rel["train"]), 64), replace=False)
    modes = [_probe(root / rel["train"][i]) for i in sample]
    channels = 1 if all(not isinstance(m, str) and m[2] in GRAY for m in modes) else 3
    workers = options.get("loader_workers", min(8, os.cpu_count() or 1))
    key = hashlib.sha256(f"{_fingerprint(root, listed, size)}{json.dumps(options, sort_keys=True)}stream".encode()).hexdigest()[:16]
    d = StreamData(f"folder:{root}", str(root), rel, {s: torch.from_numpy(v) for s, v in labels.items()}, len(classes),
                   (0.5,) * channels, (0.25,) * channels, size, channels, tuple(classes), key,
                   options.get("skip_bad_images", False), workers)
    if "mean" in options:
        if len(options["mean"]) != channels or len(options["std"]) != channels:
            raise DataError(f"folder:{path}: [data] mean and std need {channels} values (the images' channels)")
        return dataclasses.replace(d, mean=tuple(options["mean"]), std=tuple(options["std"]))
    return dataclasses.replace(d, **_statistics(d, seed))


def _statistics(d: StreamData, seed: int, n: int = 2000) -> dict:
    """Per-channel mean and std on the 0..1 scale, from a seeded sample of ``n`` training images as measured."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(d.size("train"), size=min(n, d.size("train")), replace=False))
    sample = dataclasses.replace(d, files={"sample": tuple(d.files["train"][i] for i in pick)},
                                 targets={"sample": d.targets["train"][pick]}, skip_bad_images=True)
    total = torch.zeros(3, d.channels, dtype=torch.float64)  # count, sum, sum of squares per channel
    for x, _ in sample.chunks("sample", 250):
        v = x.double().div_(255).transpose(0, 1).reshape(d.channels, -1)
        total += torch.stack([torch.full((d.channels,), float(v.shape[1]), dtype=torch.float64), v.sum(1), (v * v).sum(1)])
    count, s, s2 = total
    mean = s / count
    return {"mean": tuple(mean.tolist()), "std": tuple((s2 / count - mean ** 2).clamp_min(0).sqrt().tolist())}
