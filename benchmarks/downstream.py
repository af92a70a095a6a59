"""What the end-of-run measures cost: retrieval (mAP@R, R@1) and clustering (NMI, ARI of k-means) beside kNN.

Two figures: their share of a default digits run (``downstream_share``: the measures on the val and test
splits, over the run's own train seconds; goal <= 0.10), and the seconds they take at CIFAR-100's size on this
device (50,000 reference x 10,000 query features of 512 dimensions, 100 classes: ``downstream_cifar100_*``).
"""

from __future__ import annotations

import time

import torch

from kdbench.data import load_data
from kdbench.downstream import clustering, retrieval
from kdbench.measure import forward_all
from kdbench.teacher import get_teacher
from kdbench.methods import METHODS
from kdbench.settings import DATASET_DEFAULTS
from kdbench.train import TrainConfig, distill


def _measures(f_query, y_query, f_ref, y_ref, classes) -> float:
    t0 = time.perf_counter()
    retrieval(f_query, y_query, f_ref, y_ref)
    clustering(f_query, y_query, classes)
    if f_query.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def downstream_cost(device: str, repeats: int) -> dict:
    data = load_data("digits").to(device)
    recipe = DATASET_DEFAULTS["digits"]["recipe"]
    teacher = get_teacher(data, "cnn_teacher", recipe)[0]
    out = {"downstream_share": [], "downstream_digits_seconds": [], "downstream_cifar100_retrieval_seconds": [],
           "downstream_cifar100_clustering_seconds": []}
    for seed in range(repeats):
        res = distill(TrainConfig("cnn_student", METHODS["geometry"], recipe, seed), data, teacher)
        model = res.model
        ref = forward_all(model, data.train_x, data)[0]
        spent = sum(_measures(forward_all(model, x, data)[0], y, ref, data.train_y, data.num_classes)
                    for x, y in (data.split("val"), data.split("test")))
        out["downstream_digits_seconds"].append(spent)
        out["downstream_share"].append(spent / res["train_seconds"])
    g = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(100, 512, generator=g)
    ref_y, query_y = torch.arange(50_000) % 100, torch.arange(10_000) % 100
    ref = (centres[ref_y] + 2.0 * torch.randn(50_000, 512, generator=g)).to(device)
    query = (centres[query_y] + 2.0 * torch.randn(10_000, 512, generator=g)).to(device)
    ref_y, query_y = ref_y.to(device), query_y.to(device)
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        retrieval(query, query_y, ref, ref_y)
        out["downstream_cifar100_retrieval_seconds"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        clustering(query, query_y, 100)
        out["downstream_cifar100_clustering_seconds"].append(time.perf_counter() - t0)
    return out
