"""The streamed data path (kdbench/stream.py): which JPEG decoder, and what a streamed epoch costs against the
resident one, on a folder of ImageNet-sized JPEGs written here.

    python -m benchmarks --only stream

Figures, each measured interleaved repeat by repeat in one process:
- ``stream_decode_torchvision_vs_pil``: images/s of torchvision.io.decode_jpeg (libjpeg-turbo, tensors out) over
  Pillow's ``Image.open().convert("RGB")`` on the same files, one process, decode only; and
  ``stream_decode_torchcodec_vs_pil`` the same for TorchCodec's ``decode_jpeg`` where TorchCodec is installed;
- ``stream_epoch_images_per_second``: a streamed training epoch (read, decode, random resized crop to 224, flip,
  collate) through ``StreamData.train_batches`` with every core as a DataLoader worker;
- ``stream_vs_resident_epoch``: that epoch's time over the resident path's (the same images decoded once to
  224 x 224 and kept in memory, augmented on the device) -- what streaming costs where the data would fit;
- ``stream_vs_imagefolder_w1`` / ``_w2``: images/s of a streamed epoch over torchvision's ``ImageFolder`` + PIL
  + ``DataLoader`` with the same transforms (RandomResizedCrop 224, flip, uint8 tensors), batch and workers;
- ``stream_epoch_rss_growth_mib``: how much the training process's resident memory grew over a streamed epoch
  (flat: it holds batches, not the data set).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["stream_costs"]


def _write_folder(root: Path, n: int = 256, classes: int = 8, seed: int = 0) -> Path:
    """``n`` JPEGs of ImageNet's median size (500 x 375 or 375 x 500), smooth colour fields with noise, so they
    compress as photographs do (~40-70 KB each at quality 90), in ImageNet's layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            c = i % classes
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            w, h = (500, 375) if i % 3 else (375, 500)
            base = rng.normal(size=(h // 25 + 1, w // 25 + 1, 3))
            field = np.kron(base, np.ones((25, 25, 1)))[:h, :w]
            a = np.clip(128 + 40 * field + rng.normal(scale=12, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / split / f"c{c}" / f"{i}.JPEG", quality=90)
    return root


def _decode_pil(files):
    from PIL import Image

    for f in files:
        with Image.open(f) as im:
            np.asarray(im.convert("RGB"))


def _decode_torchvision(files):
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated since 0.29 in favour of TorchCodec
        for f in files:
            decode_jpeg(read_file(str(f)), mode=ImageReadMode.RGB)


def _decode_torchcodec(files):
    from torchcodec.decoders import decode_jpeg

    for f in files:
        decode_jpeg(str(f), mode="RGB")


def _imagefolder_epoch(root: Path, workers: int, seed: int) -> int:
    """torchvision's way: ImageFolder + PIL transforms + DataLoader, one epoch; the images it yielded."""
    from torchvision import datasets, transforms

    t = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "train"), transform=t), batch_size=64,
                                         shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if workers else None)
    return sum(len(y) for _, y in loader)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def stream_costs(repeats: int = 3) -> dict:
    from kdbench.data import Data, load_data

    with tempfile.TemporaryDirectory(prefix="kdbench-stream-") as d:
        root = _write_folder(Path(d))
        files = sorted((root / "train").rglob("*.JPEG"))
        streamed = load_data(f"folder:{root}", options={"stream": True, "image_size": 224, "val_fraction": 0.0,
                                                        "loader_workers": os.cpu_count() or 1})
        x = torch.cat([c for c, _ in streamed.chunks("train", 64)])  # the same images decoded once (224 x 224)
        y = streamed.labels("train")
        resident = Data("resident", x, y, x[:0], y[:0], x[:0], y[:0], streamed.num_classes, streamed.mean, streamed.std,
                        pad=28, flip=True)
        try:
            import torchcodec  # noqa: F401 - optional: measured where installed
            codec = True
        except ImportError:
            codec = False
        _decode_pil(files[:8]), _decode_torchvision(files[:8])  # libraries loaded, files in the page cache
        if codec:
            _decode_torchcodec(files[:8])
        ratio, ratio_codec, per_second, versus, against, growth = [], [], [], [], {1: [], 2: []}, []
        for r in range(repeats):
            t0 = time.perf_counter()
            _decode_pil(files)
            pil = time.perf_counter() - t0
            t0 = time.perf_counter()
            _decode_torchvision(files)
            tv = time.perf_counter() - t0
            ratio.append(pil / tv)
            if codec:
                t0 = time.perf_counter()
                _decode_torchcodec(files)
                ratio_codec.append(pil / (time.perf_counter() - t0))
            g = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            seen = sum(len(b[1]) for b in streamed.train_batches(64, g))
            stream = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in resident.train_batches(64, g):
                pass
            kept = time.perf_counter() - t0
            per_second.append(seen / stream)
            versus.append(stream / kept)
            for w in (1, 2):
                d_w = dataclasses.replace(streamed, workers=w)
                t0 = time.perf_counter()
                ours = sum(len(b[1]) for b in d_w.train_batches(64, torch.Generator().manual_seed(r)))
                ours = ours / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                theirs = _imagefolder_epoch(root, w, r) / (time.perf_counter() - t0)
                against[w].append(ours / theirs)
            before = _rss_mib()
            for _ in streamed.train_batches(64, torch.Generator().manual_seed(r)):
                pass
            growth.append(_rss_mib() - before)
        return {"stream_decode_torchvision_vs_pil": ratio, "stream_epoch_images_per_second": per_second,
                **({"stream_decode_torchcodec_vs_pil": ratio_codec} if codec else {}),
                "stream_vs_resident_epoch": versus, "stream_vs_imagefolder_w1": against[1],
                "stream_vs_imagefolder_w2": against[2], "stream_epoch_rss_growth_mib": growth, "stream_images": len(files),
                "stream_workers": os.cpu_count() or 1}
