"""The measurements behind ``python -m benchmarks``. Each returns lists of per-repeat ratios."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdbench import losses
from kdbench.data import augment, load_data, normalize
from kdbench.geometry import CentroidMemory
from kdbench.models import build_model
from kdbench.teacher import get_teacher
from kdbench.methods import METHODS
from kdbench.settings import DATASET_DEFAULTS, Recipe
from kdbench.train import TrainConfig, distill
from kdbench.results import read_table

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# 1. The data path: kdbench's batched tensor augmentation vs torchvision Dataset + DataLoader


class _PILDataset(torch.utils.data.Dataset):
    """The conventional CIFAR pipeline of the popular KD codebases: PIL images and per-image transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from PIL import Image
        import torchvision.transforms as T

        self.images = [Image.fromarray(img.transpose(1, 2, 0)) for img in images]  # HWC uint8
        self.labels = labels
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def data_path(device: str, repeats: int, n_images: int = 10_000, batches: int = 40) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 100, size=n_images)
    loader = torch.utils.data.DataLoader(_PILDataset(images, labels), batch_size=64, num_workers=2, shuffle=True,
                                         persistent_workers=True, drop_last=True)
    x = torch.from_numpy(images).to(device)
    y = torch.from_numpy(labels).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def conventional():
        for i, (xb, yb) in enumerate(loader):
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if i + 1 == batches:
                break

    def settle():  # let the workers finish prefetching so they do not steal the cores from the next timing
        time.sleep(1.0)

    def kdbench_path():
        perm = torch.randperm(n_images, device=device, generator=gen)
        for i in range(batches):
            idx = perm[i * 64:(i + 1) * 64]
            xb = normalize(augment(x[idx], 4, True, gen), MEAN, STD)
            yb = y[idx]
        return xb, yb

    conventional(), settle(), kdbench_path()  # warm up: worker start-up, first allocations
    ratios, rates = [], []
    for _ in range(repeats):
        t_conv = _timed(conventional, device)
        settle()
        t_kd = _timed(kdbench_path, device)
        ratios.append(t_conv / t_kd)
        rates.append(batches * 64 / t_kd)
    return {"data_path_speedup": ratios, "data_path_images_per_second": rates}


def folder_decode(repeats: int, classes: int = 20, per_class: int = 100, size: int = 64) -> dict:
    """An image folder of ``classes * per_class`` JPEGs (80% train, 20% test): the first decode (a fresh cache,
    the files already in the OS page cache) and the load from kdbench's cache, each repeat."""
    import shutil
    import tempfile
    from pathlib import Path

    from PIL import Image

    from kdbench.images import read_image_folder

    root = Path(tempfile.mkdtemp(prefix="kdbench-folder-bench-"))
    rng = np.random.default_rng(0)
    try:
        for c in range(classes):
            for i in range(per_class):
                split = "train" if i < per_class * 4 // 5 else "test"
                (root / "imgs" / split / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / "imgs" / split / f"c{c:02d}" / f"{i}.jpg", quality=90)
        first, cached, rates = [], [], []
        for r in range(repeats):
            cache = root / f"cache{r}"
            t0 = time.perf_counter()
            read_image_folder(root / "imgs", cache=cache)
            first.append(time.perf_counter() - t0)
            rates.append(classes * per_class / first[-1])
            t0 = time.perf_counter()
            read_image_folder(root / "imgs", cache=cache)
            cached.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"folder_decode_seconds": first, "folder_images_per_second": rates, "folder_cache_load_seconds": cached}


# ---------------------------------------------------------------------------------------------
# 2. The geometry term's cost inside a full distillation step (CIFAR-100 shapes)


def _step_fn(student, teacher, opt, memory, t_centroids, x, y, temperature=4.0, geometry_weight=0.0):
    """One distillation step as distill() takes it: teacher forward under inference mode, student
    forward and backward, optimiser step; KD (+ geometry) on top of CE."""

    def step():
        with torch.inference_mode():
            _, t_logits = teacher(x)
        t_logits = t_logits.clone()
        feat, logits = student(x)
        loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * losses.kd(logits, t_logits, temperature)
        if geometry_weight:
            loss = loss + geometry_weight * losses.geometry(memory(feat, y), t_centroids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def geometry_overhead(device: str, repeats: int, steps: int = 1) -> dict:
    """Many short interleaved repeats (5 per requested repeat): the noise of a shared machine averages out
    in the median instead of landing on one side of a long timing."""
    repeats *= 5
    torch.manual_seed(0)
    student = build_model("resnet8x4", 100, 3).to(device)
    teacher = build_model("resnet32x4", 100, 3).to(device).eval()
    x = torch.randn(64, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (64,), device=device)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    memory = CentroidMemory(100, student.feature_dim, 0.9).to(device)
    memory.fill(torch.randn(1000, student.feature_dim, device=device), torch.arange(1000, device=device) % 100)
    t_centroids = torch.randn(100, teacher.feature_dim, device=device)
    kd_step = _step_fn(student, teacher, opt, memory, t_centroids, x, y)
    geo_step = _step_fn(student, teacher, opt, memory, t_centroids, x, y, geometry_weight=100.0)
    kd_step(), geo_step()  # warm up
    ratios = []
    for _ in range(repeats):
        t_kd = _timed(lambda: [kd_step() for _ in range(steps)], device)
        t_geo = _timed(lambda: [geo_step() for _ in range(steps)], device)
        ratios.append(t_geo / t_kd)
    return {"geometry_overhead": ratios}


# ---------------------------------------------------------------------------------------------
# 3. distill() against a minimal plain-PyTorch loop on the digits models (per-step overhead dominates)


def _plain_epoch(data, teacher_model, seed: int, recipe: Recipe):
    """The smallest loop that trains the same student with the same data, augmentation and KD loss."""
    torch.manual_seed(seed)
    student = build_model("cnn_student", data.num_classes, data.in_channels).to(data.train_x.device)
    opt = torch.optim.SGD(student.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                          weight_decay=recipe.weight_decay)
    gen = torch.Generator(device=data.train_x.device).manual_seed(seed)
    n, bs = data.train_x.shape[0], recipe.batch_size

    def epoch():
        perm = torch.randperm(n, device=data.train_x.device, generator=gen)
        for i in range(n // bs):
            idx = perm[i * bs:(i + 1) * bs]
            x = normalize(augment(data.train_x[idx], data.pad, data.flip, gen), data.mean, data.std)
            y = data.train_y[idx]
            with torch.inference_mode():
                _, t_logits = teacher_model(x)
            t_logits = t_logits.clone()
            _, logits = student(x)
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * losses.kd(logits, t_logits, 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def step_overhead(device: str, repeats: int) -> dict:
    """A whole distill() run of the digits default recipe (30 epochs, KD, evaluation as by default: val and
    test after the last epoch) against the plain loop for as many epochs: ``step_overhead`` on its training
    time, ``step_overhead_with_eval`` on its wall time (set-up, evaluation, geometry and kNN metrics)."""
    data = load_data("digits", device=device)
    recipe = DATASET_DEFAULTS["digits"]["recipe"]
    epochs = recipe.epochs
    teacher, _ = get_teacher(data, "cnn_teacher", recipe)
    cfg = TrainConfig("cnn_student", METHODS["kd"], recipe, seed=0)
    plain = _plain_epoch(data, teacher.model, 0, recipe)
    plain(), distill(dataclasses.replace(cfg, recipe=dataclasses.replace(recipe, epochs=1)), data, teacher)  # warm up
    train_ratios, wall_ratios = [], []
    for _ in range(repeats):
        t_plain = _timed(lambda: [plain() for _ in range(epochs)], device)
        t0 = time.perf_counter()
        res = distill(cfg, data, teacher)
        _sync(device)
        wall = time.perf_counter() - t0
        train_ratios.append(res["train_seconds"] / t_plain)
        wall_ratios.append(wall / t_plain)
    return {"step_overhead": train_ratios, "step_overhead_with_eval": wall_ratios}


# ---------------------------------------------------------------------------------------------
# 4. Ray overhead and peak memory of `kdbench tune` on the default study


def _tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 2**20


def _run_tune(args: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak tree RSS (MiB) of one `kdbench tune` subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kdbench.cli", "tune", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_mib(proc.pid))
            time.sleep(0.25)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    if rc != 0:
        raise RuntimeError(f"kdbench tune {' '.join(args)} exited {rc}")
    return time.perf_counter() - t0, peak[0]


def ray_overhead(quick: bool) -> dict:
    """The default study as a user runs it (24 trials), in a subprocess: Python start-up, Ray start and
    stop, the teacher step and the final summary all count against kdbench."""

    samples = 24
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "kdbench.cli", "teacher", "--dataset", "digits"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # cached before timing
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        launched = time.time()
        wall, peak = _run_tune(["digits", "--samples", str(samples), "--out", str(out)], env)
        trials = read_table(out / "trials.csv")
        meta = json.loads((out / "study.json").read_text())
    from kdbench.study import study_from_dict

    concurrency, t = study_from_dict(meta["study"]).concurrency, meta["timings"]  # the record, of any schema
    busy = trials["seconds"].sum() / concurrency
    # Where the wall time went: the command's own phases (study.json's timings), Python's start and the
    # imports before the command ran, and the exit after it; "trials" is the busy time the ratio divides by.
    breakdown = {"python_start_and_imports": t["command_started"] - launched, "ray_start": t["ray_start"],
                 "teacher_step": t["teacher"], "ray_stop": t["ray_stop"], "final_summary": t["report"],
                 "exit": launched + wall - t["command_ended"], "trials_busy": busy}
    for stage in ("search", "confirm"):
        if stage in t:
            busy_stage = trials.loc[trials["stage"] == stage, "seconds"].sum() / concurrency
            breakdown |= {f"{stage}_to_first_trial": t[stage]["to_first_trial"], f"{stage}_tail": t[stage]["tail"],
                          f"{stage}_fit_minus_busy": t[stage]["seconds"] - busy_stage}
    return {"ray_overhead": wall / busy, "peak_memory_mib": peak, "ray_overhead_trials": len(trials),
            "tune_wall_seconds": wall, "ray_overhead_breakdown_seconds": breakdown}


# ---------------------------------------------------------------------------------------------
# 5. ASHA + TPE against random search without early stopping (digits default study)


def search_comparison(seeds=(0, 1, 2, 3, 4), data_options: dict | None = None, study_name: str = "digits",
                      samples: int | None = None, epochs: int | None = None) -> dict:
    """Per seed, a study's search (the default one; its confirmation left out) three ways, same number of
    samples: TPE + top-1 ASHA (as bundled), TPE + multi-objective ASHA (``[asha] rank = "pareto"``) and
    random search without early stopping. Hypervolume of each run's full-fidelity (val_top1,
    val_geom_corr) points against one reference per seed: the component-wise worst full-fidelity
    point of the three runs; budget: trial-epochs spent. ``data_options``: the study's ``[data]`` (e.g. a
    larger ``val_fraction``, for finer rung decisions)."""
    import numpy as np

    from kdbench.pareto import hypervolume_2d
    from kdbench.search import _init_ray, run_study
    from kdbench.study import find_study, load_study

    base = load_study(find_study(study_name))
    base = dataclasses.replace(base, confirm=None, data_options={**base.data_options, **(data_options or {})},
                               search=dataclasses.replace(base.search, samples=samples or base.search.samples))
    if epochs:  # a shorter recipe (and ASHA's first rung within it)
        base = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, epochs=epochs),
                                   asha=dataclasses.replace(base.asha, grace_period=min(base.asha.grace_period, epochs)))
    variants = (("asha_tpe", {"asha": dataclasses.replace(base.asha, rank="top1")}),
                ("moasha_tpe", {"asha": dataclasses.replace(base.asha, rank="pareto")}),
                ("random", {"search": dataclasses.replace(base.search, sampler="random"),
                            "asha": dataclasses.replace(base.asha, enabled=False)}))
    _init_ray(None, verbose=False)
    out = {"search_hv_ratio": [], "search_budget_ratio": [], "search_hv_ratio_pareto": [],
           "search_budget_ratio_pareto": [], "search_runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs = {}
            for label, changes in variants:
                study = dataclasses.replace(base, seed=seed, name=f"{label}-{seed}", **changes)
                folder = Path(tmp) / study.name
                run_study(study, folder)
                runs[label] = read_table(folder / "trials.csv")
            points = {k: t[t["fidelity"] == "full"][["val_top1", "val_geom_corr"]].to_numpy() for k, t in runs.items()}
            reference = tuple(np.vstack(list(points.values())).min(0) - 1e-9)
            hv = {k: hypervolume_2d(p, reference) for k, p in points.items()}
            spent = {k: int(t["epochs"].sum()) for k, t in runs.items()}
            for label, suffix in (("asha_tpe", ""), ("moasha_tpe", "_pareto")):
                out[f"search_hv_ratio{suffix}"].append(hv[label] / max(hv["random"], 1e-12))
                out[f"search_budget_ratio{suffix}"].append(spent[label] / spent["random"])
            out["search_runs"].append({"seed": seed, "study": study_name, "samples": base.search.samples,
                                       "epochs": base.recipe.epochs, "data_options": base.data_options, "reference": list(reference),
                                       **{f"{k}_hv": v for k, v in hv.items()},
                                       **{f"{k}_trial_epochs": v for k, v in spent.items()},
                                       **{f"{k}_full_trials": len(p) for k, p in points.items()}})
    return out


# ---------------------------------------------------------------------------------------------
# Per-method cost: a training epoch of each preset through distill(), relative to KD, on the
# ResNet-32x4 -> ResNet-8x4 pair at batch 64 (100 classes, 32x32), interleaved repeat by repeat


def method_cost(device: str, repeats: int, images: int = 256) -> dict:
    """``images_per_second(kd) / images_per_second(method)`` of one training epoch (distill's own timing, which
    leaves evaluation out), for every preset: the extra cost of each method's terms, teacher maps and parts."""
    from kdbench.data import load_data
    from kdbench.geometry import class_centroids
    from kdbench.measure import forward_all
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.train import Teacher, TrainConfig, distill

    data = load_data("synthetic", options={"val_fraction": 0.0, "train_per_class": max(1, images // 100),
                                           "test_per_class": 1}).to(device)
    torch.manual_seed(0)
    t_model = build_model("resnet32x4", 100, 3).to(device).eval()
    teacher = Teacher(t_model, class_centroids(forward_all(t_model, data.train_x, data)[0], data.train_y, 100), {})
    recipe = Recipe(epochs=1, batch_size=64)
    ips = lambda m: distill(TrainConfig("resnet8x4", METHODS[m], recipe), data, teacher)["images_per_second"]
    names = [m for m in METHODS if m != "kd"]
    ips("kd")  # warm up
    out = {f"method_cost_{m}": [] for m in names}
    for _ in range(repeats):
        for m in names:
            kd = ips("kd")
            out[f"method_cost_{m}"].append(kd / ips(m))
    return out


def compile_check(device: str) -> dict:
    """The digits default recipe (30 epochs, the geometry method, seed 0) eager and ``[recipe] compile = true``:
    the compiled run's final metrics against the eager one's, its compilation time (kept out of its
    train_seconds) and its images/s; then its state after epoch 15, resumed eagerly, against the compiled run."""
    data = load_data("digits", device=device)
    recipe = DATASET_DEFAULTS["digits"]["recipe"]
    teacher, _ = get_teacher(data, "cnn_teacher", recipe)
    runs, states = {}, {}
    for compiled in (False, True):
        cfg = TrainConfig("cnn_student", METHODS["geometry"], dataclasses.replace(recipe, compile=compiled), seed=0)
        keep = (lambda e: states.update({e.row["epoch"]: e.state})) if compiled else None
        runs[compiled] = distill(cfg, data, teacher, keep, state_when=(lambda e, within: e == 15 and not within) if compiled else None)
    eager_cfg = TrainConfig("cnn_student", METHODS["geometry"], recipe, seed=0)
    resumed = distill(eager_cfg, data, teacher, resume=states[15])
    e, c = runs[False], runs[True]
    keys = ("test_top1", "test_geom_corr", "test_cka", "test_knn_top1", "train_loss")
    return {**{f"compile_minus_eager_{k}": c[k] - e[k] for k in keys},
            **{f"compile_resumed_eager_minus_compiled_{k}": resumed[k] - c[k] for k in keys},
            "compile_seconds": c["compile_seconds"], "compile_images_per_second_ratio":
            c["images_per_second"] / e["images_per_second"]}
