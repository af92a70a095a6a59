"""The GPU check (``python -m benchmarks --device cuda --quick``): the paper's pair through kdbench's own
training loop, trials packed on one GPU, and a small search end to end. Needs CUDA; nothing here runs on
the CPU machines that run the test suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from kdbench.data import load_data
from kdbench.results import most_at_once, read_table
from kdbench.measure import forward_all
from kdbench.geometry import class_centroids
from kdbench.models import build_model
from kdbench.methods import METHODS
from kdbench.settings import Recipe
from kdbench.train import Teacher, TrainConfig, distill

ROOT = Path(__file__).resolve().parents[1]


def _random_teacher(data, arch: str = "resnet50") -> Teacher:
    """A ResNet-50 with its initial weights: the step costs the same as a trained one's, without hours of training."""
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.in_channels).to(data.train_x.device)
    if data.train_x.is_cuda:
        model = model.to(memory_format=torch.channels_last)
    model = model.eval().requires_grad_(False)
    feats, _ = forward_all(model, data.train_x, data)
    return Teacher(model, class_centroids(feats, data.train_y, data.num_classes), {"arch": arch})


def paper_step(compile: bool, epochs: int = 3, device: str = "cuda", student: str = "resnet18",
               teacher: str = "resnet50") -> dict:
    """Images/s of distill()'s geometry step, ResNet-50 -> ResNet-18, batch 64, bf16, on the 100-class
    synthetic set (CIFAR-100's shapes), from the last epoch (the first ones carry cuDNN's autotuning and,
    with ``compile``, the compilation)."""
    data = load_data("synthetic", device=device)
    cfg = TrainConfig(student, METHODS["geometry"], Recipe(epochs=epochs, batch_size=64), seed=0, compile=compile)
    t0 = time.perf_counter()
    res = distill(cfg, data, _random_teacher(data, teacher))
    last = res.history[-1]
    steps = data.train_x.shape[0] // 64
    return {"images_per_second": steps * 64 / last["epoch_seconds"], "first_epoch_seconds": res.history[0]["epoch_seconds"],
            "wall_seconds": time.perf_counter() - t0, "train_images": int(data.train_x.shape[0]),
            "peak_memory_mib": res["peak_memory_mib"], "autocast": res.precision}


def paper_pair_throughput() -> dict:
    """(a) one trial's images/s, eager and compiled."""
    eager, compiled = paper_step(False), paper_step(True)
    return {"gpu_images_per_second": eager["images_per_second"],
            "gpu_images_per_second_compiled": compiled["images_per_second"],
            "gpu_compile_speedup": compiled["images_per_second"] / eager["images_per_second"],
            "gpu_compile_first_epoch_seconds": compiled["first_epoch_seconds"],
            "gpu_paper_epoch_seconds_cifar": 50_000 / eager["images_per_second"]}  # one CIFAR-100 epoch, eager


_WORKER = """
import json, sys
sys.path.insert(0, {root!r})
from benchmarks.gpu import paper_step
print(json.dumps(paper_step(False, epochs=4)))
"""


def packed_trials(counts=(1, 2, 4, 8)) -> dict:
    """(b) aggregate images/s of k trial processes sharing the GPU at once (what fractional
    ``gpus_per_trial`` does in Ray), and the speedup over one."""
    out = {}
    for k in counts:
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER.format(root=str(ROOT))], stdout=subprocess.PIPE,
                                  text=True) for _ in range(k)]
        runs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        out[f"gpu_packed_{k}_images_per_second"] = sum(r["images_per_second"] for r in runs)
        out[f"gpu_packed_{k}_peak_memory_mib_per_trial"] = [round(r["peak_memory_mib"]) for r in runs]
    for k in counts[1:]:
        out[f"gpu_packed_{k}_speedup"] = out[f"gpu_packed_{k}_images_per_second"] / out["gpu_packed_1_images_per_second"]
    return out


def tune_end_to_end() -> dict:
    """(c) `kdbench tune synthetic-search --samples 4 --gpus-per-trial 0.25`, 2 epochs: exit code and a complete
    results folder."""
    from kdbench.study import find_study

    text = find_study("synthetic-search").read_text()
    text = text.replace("epochs = 10", "epochs = 2").replace("grace_period = 3", "grace_period = 1")
    with tempfile.TemporaryDirectory() as tmp:
        study, out = Path(tmp) / "synthetic-search.toml", Path(tmp) / "run"
        study.write_text(text)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "kdbench.cli", "tune", str(study), "--out", str(out), "--samples", "4",
                            "--concurrency", "4", "--gpus-per-trial", "0.25"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        wanted = ("study.json", "trials.csv", "epochs.csv", "optuna.db", "front.csv", "leaderboard.md", "pareto.png")
        missing = [n for n in wanted if not (out / n).is_file()]
        trials = read_table(out / "trials.csv") if (out / "trials.csv").is_file() else pd.DataFrame()
        meta = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    return {"gpu_tune_exit_code": r.returncode, "gpu_tune_wall_seconds": wall, "gpu_tune_trials": len(trials),
            "gpu_tune_statuses": trials["status"].value_counts().to_dict() if len(trials) else {},
            "gpu_tune_devices": sorted(trials["device"].astype(str).unique()) if len(trials) else [],
            "gpu_tune_gpu_ids": sorted(trials["gpu_ids"].astype(str).unique()) if "gpu_ids" in trials else [],
            "gpu_tune_most_at_once": most_at_once(trials.to_dict("records")) if "started_at" in trials else 0,
            "gpu_tune_peak_memory_mib": float(trials["peak_memory_mib"].max()) if "peak_memory_mib" in trials else None,
            "gpu_tune_missing_files": missing, "gpu_tune_ended": bool(meta.get("ended")),
            "gpu_tune_timings": meta.get("timings", {}), "gpu_tune_stderr_tail": r.stderr[-1500:] if r.returncode else ""}
