"""Image folders (torchvision's ImageFolder layout) -> uint8 tensors, decoded once and cached.

``PATH/train/<class>/<image>``, ``PATH/test/<class>/...`` and, optionally, ``PATH/val/...``; or ImageNet's
``PATH/train`` and ``PATH/val`` alone, where ``val/`` is the test split (as papers report ImageNet's top-1 on it)
and validation is carved out of ``train/`` (``val_fraction``). Classes
are the folder names (the same in every split). Images are read with Pillow (PNG, JPEG and whatever
else it reads), converted to RGB (grayscale when every image is), resized (shorter side) and
center-cropped to ``image_size``, in parallel threads; the tensors are cached under the kdbench cache,
keyed by the file list, sizes, modification times and ``image_size``, so the next run starts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .state import load_tensors

__all__ = ["read_image_folder", "folder_data", "SUFFIXES"]

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
CACHE_VERSION = 1
GRAY = ("1", "L", "I", "I;16", "F")  # modes that decode to one channel


def _error(msg: str) -> Exception:
    return DataError(msg)


def _listing(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split, (file, label) in a stable order; checks the layout."""
    if not root.is_dir():
        raise _error(f"folder:{root}: no such folder")
    # ImageNet's layout (train/ and val/, no labelled test set): val/ is the test split, as every paper reports it.
    test = "val" if (root / "val").is_dir() and not (root / "test").is_dir() else "test"
    for split in ("train", test):
        if not (root / split).is_dir():
            raise _error(f"folder:{root}: no {split}/ folder; expected {root}/train/<class>/<image> and "
                         f"{root}/test/<class>/<image> (val/ optional), or ImageNet's train/ and val/ (val/ then tests)")
    folder = {"train": "train", "val": "val", "test": test} if test == "test" else {"train": "train", "test": "val"}
    splits = [s for s in ("train", "val", "test") if s in folder and (root / folder[s]).is_dir()]
    per_split = {s: sorted(p.name for p in (root / folder[s]).iterdir() if p.is_dir()) for s in splits}
    classes = per_split["train"]
    files, empty = {}, []
    for s in splits:
        for c in sorted(set(classes) ^ set(per_split[s])):
            where, other = ("train", folder[s]) if c in classes else (folder[s], "train")
            raise _error(f"{root / other}: no folder for class {c!r} (it is in {where}/); every split needs "
                         f"the same class folders")
        files[s] = []
        for label, c in enumerate(classes):
            found = sorted(p for p in (root / folder[s] / c).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            files[s] += [(p, label) for p in found]
            empty += [] if found else [root / folder[s] / c]
    if not any(files.values()):
        raise _error(f"folder:{root}: no images (expected {root}/train/<class>/<image>; read: {', '.join(SUFFIXES)})")
    if empty:
        raise _error(f"{empty[0]}: no images (every class folder needs at least one; read: {', '.join(SUFFIXES)})")
    return classes, files


def _fingerprint(root: Path, files: dict, image_size: int | None) -> str:
    items = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns)
             for s in files for p, _ in files[s] for st in [p.stat()]]
    blob = json.dumps({"v": CACHE_VERSION, "files": items, "image_size": image_size})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _free_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU memory"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "RAM"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _probe(path: Path):
    """(width, height, mode) from the header, or the error that makes the file unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        return f"{type(e).__name__}: {e}"


def _decode(path: Path, mode: str, size: int | None):
    """The image as a (C, H, W) uint8 array, resized (shorter side) and center-cropped to ``size``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
                im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - truncated files fail here, at decoding
        return f"{type(e).__name__}: {e}"
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _bad(root: Path, bad: list, skip: bool) -> None:
    if bad and not skip:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _error(f"{root / path}: unreadable image ({why}){more}; remove it, or pass --skip-bad-images "
                     f"([data] skip_bad_images = true) to leave such files out")


def read_image_folder(root: str | Path, image_size: int | None = None, skip_bad_images: bool = False,
                device: torch.device | str = "cpu", budget: int | None = None, cache: Path | None = None,
                log=None) -> dict:
    """Decode (or load from the cache) an image folder.

    Args:
        root: the folder holding ``train/`` and ``test/`` (and optionally ``val/``).
        image_size: side of the square images after resizing and center-cropping; required when the
            images differ in size.
        skip_bad_images: leave unreadable files out (counted in ``bad``) instead of stopping.
        device: where the tensors will live: the memory budget is half of that device's free memory.
        budget: the budget in bytes instead (tests).
        cache: the cache folder (None: no cache).
        log: called with one line of news (decoded or loaded, how fast).

    Returns ``{"splits": {split: (x uint8 (N, C, H, W), y int64 (N,))}, "classes": [...],
    "bad": [(relative path, reason)], "key": fingerprint}``.
    """
    root = Path(root).expanduser().resolve()
    classes, files = _listing(root)
    key = _fingerprint(root, files, image_size)
    path = cache / "folders" / f"{root.name}-{key}.pt" if cache is not None else None
    if path is not None and path.is_file():
        t0 = time.perf_counter()
        blob = load_tensors(path)
        _bad(root, blob["bad"], skip_bad_images)
        if log:
            log(f"folder:{root}: {sum(len(y) for _, y in blob['splits'].values()):,} images loaded from the cache "
                f"in {time.perf_counter() - t0:.1f} s")
        return {**blob, "splits": {s: tuple(v) for s, v in blob["splits"].items()}}

    t0 = time.perf_counter()
    flat = [(s, p, y) for s in files for p, y in files[s]]
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        heads = list(pool.map(_probe, [p for _, p, _ in flat]))
    bad = [(str(p.relative_to(root)), h) for (_, p, _), h in zip(flat, heads) if isinstance(h, str)]
    _bad(root, bad, skip_bad_images)
    good = [(f, h) for f, h in zip(flat, heads) if not isinstance(h, str)]
    if not good:
        raise _error(f"folder:{root}: none of its {len(flat)} images could be read")
    mode = "L" if all(h[2] in GRAY for _, h in good) else "RGB"
    channels = 1 if mode == "L" else 3
    sizes = {h[:2] for _, h in good}
    if image_size is None and len(sizes) > 1:
        (a, ha), (b, hb) = next((x, y) for x in good for y in good if x[1][:2] != y[1][:2])
        raise _error(f"folder:{root}: images differ in size ({a[1].relative_to(root)} is {ha[0]}x{ha[1]}, "
                     f"{b[1].relative_to(root)} is {hb[0]}x{hb[1]}); set image_size ([data] image_size or "
                     f"--image-size) to resize and center-crop them all")
    w, h = (image_size, image_size) if image_size else next(iter(sizes))
    need = len(good) * channels * w * h
    free, what = _free_memory(torch.device(device))
    limit = budget if budget is not None else free // 2
    if need > limit:
        fits = int((limit / (len(good) * channels)) ** 0.5)
        hint = f"set image_size = {fits} or smaller" if fits >= 1 else "use fewer images"
        raise _error(f"folder:{root}: {len(good):,} images of {channels}x{h}x{w} take {_gib(need)} decoded, over "
                     f"the budget of {_gib(limit)} (half the free {what}); {hint} ([data] image_size or --image-size)")

    # Decoded straight into one array (no second copy); ``good`` is in split order, so each split is a slice.
    x_all, failed = np.empty((len(good), channels, h, w), dtype=np.uint8), {}
    with _progress(len(good), f"decoding {root.name}") as advance, ThreadPoolExecutor(workers) as pool:
        for i, a in enumerate(pool.map(lambda f: _decode(f[0][1], mode, image_size), good)):
            if isinstance(a, str):
                failed[i] = a
            else:
                x_all[i] = a
            advance()
    bad += [(str(good[i][0][1].relative_to(root)), why) for i, why in failed.items()]
    _bad(root, bad, skip_bad_images)
    splits, split_of = {}, np.array([f[0][0] for f in good])
    keep = np.ones(len(good), dtype=bool)
    keep[list(failed)] = False
    for s in files:
        rows = np.flatnonzero((split_of == s) & keep)
        if not len(rows):
            raise _error(f"{root / s}: no readable images")
        whole = len(rows) == rows[-1] - rows[0] + 1
        x = x_all[rows[0]:rows[-1] + 1] if whole else x_all[rows]  # a view when nothing was left out
        splits[s] = (torch.from_numpy(x), torch.tensor([good[i][0][2] for i in rows], dtype=torch.int64))
    seconds = time.perf_counter() - t0
    out = {"splits": splits, "classes": classes, "bad": bad, "key": key,
           "decode_seconds": seconds}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**out, "splits": {s: list(v) for s, v in splits.items()}}, tmp)
        os.replace(tmp, path)
    if log:
        n = sum(len(y) for _, y in splits.values())
        log(f"folder:{root}: {n:,} images decoded in {seconds:.1f} s ({n / seconds:,.0f} images/s)"
            + (f", {len(bad)} unreadable left out" if bad else "") + (f"; cached in {path}" if path else ""))
    return out


def folder_data(path: str, seed: int, options: dict, device):
    """An image folder (see :mod:`kdbench.images`): decoded on the device (crop padding scales with the image,
    32 px -> 4), or streamed from disk (:mod:`kdbench.stream`) as ``[data] stream`` says: ``auto`` streams
    where the decoded images would take over half the device's free memory."""
    from .data import _make, cache_dir
    from .stream import stream_folder

    root = Path(path).expanduser()
    if "val_fraction" in options and (root / "val").is_dir() and (root / "test").is_dir():
        raise _error(f"folder:{path}: has a val/ folder; val_fraction applies only without one")
    stream = options.get("stream", "auto")
    if stream == "auto":
        root = root.resolve()
        _, files = _listing(root)
        n = sum(len(f) for f in files.values())
        first = next(p for f in files.values() for p, _ in f)
        head = _probe(first)
        side = options.get("image_size") or (max(head[:2]) if not isinstance(head, str) else 224)
        need, (free, what) = n * 3 * side * side, _free_memory(torch.device(device))
        stream = need > free // 2
        if stream:
            _news(f"folder:{root}: {n:,} images of 3x{side}x{side} would take {_gib(need)} decoded, over half the free "
                  f"{what} ({_gib(free // 2)}): streamed from disk ([data] stream = true or false chooses)")
    if stream:
        return stream_folder(path, seed, options)
    f = read_image_folder(path, options.get("image_size"), options.get("skip_bad_images", False), device, cache=cache_dir(),
                    log=_news)
    (x, y), (tx, ty) = (t.numpy() for t in f["splits"]["train"]), (t.numpy() for t in f["splits"]["test"])
    val = tuple(t.numpy() for t in f["splits"]["val"]) if "val" in f["splits"] else None
    d = _make(f"folder:{path}", x, y, tx, ty, seed, len(f["classes"]), f["classes"], options, val=val,
              val_fraction=0.1, pad=max(1, round(x.shape[-1] / 8)), flip=True)
    key = hashlib.sha256(f"{f['key']}{d.key}".encode()).hexdigest()[:16]
    return dataclasses.replace(d, key=key, skipped=len(f["bad"]))


def _news(line: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(line)


class _progress:
    """A transient progress bar on stderr (nothing when stderr is not a terminal)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.bar = total, what, None

    def __enter__(self):
        import sys

        if sys.stderr.isatty() and self.total > 200:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.what, total=self.total)
        return self._advance

    def _advance(self):
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
