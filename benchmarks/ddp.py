"""The cost of data-parallel training on the CPU: one epoch of two gloo workers (DDP, each one thread, half the
global batch) against one process at one thread and the whole batch, interleaved repeat by repeat.

    python -m benchmarks --only ddp

``ddp_step_ratio`` = the two workers' training time for the epoch ÷ the one process's, at equal global batch
(``train_seconds`` of rank 0's row: no start-up, no evaluation). Two workers on two cores would ideally take
half the time; what is above 0.5 is the all-reduces (DDP's gradient buckets, the geometry memory's class sums),
the duplicated augmentation draws and the processes competing for memory bandwidth. The workers are started
here without Ray (as the equivalence tests start them); a search starts them through Ray Train.

``ddp_measure_ratio`` = the same for one measuring pass of the trained student (kNN's reference set over the
training split, then every metric on test), spread over the workers as a multi-worker trial measures: each
forwards its half and both compute the metrics from the gathered features.
"""

from __future__ import annotations

import tempfile

import torch

__all__ = ["ddp_cost"]

STUDENT, METHOD, BATCH = "resnet20", "geometry", 64


def _epoch_seconds(sync_bn: bool = False) -> tuple[float, float]:
    """One epoch of the synthetic set in this process (or in each worker of its process group), then one measuring
    pass of the student: rank 0's times."""
    import time

    from kdbench.measure import evaluate, reference, teacher_views
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.teacher import get_teacher
    from kdbench.train import TrainConfig, distill
    from kdbench.data import load_data

    data = load_data("synthetic")
    teacher, _ = get_teacher(data, "cnn_teacher", Recipe(epochs=1, batch_size=BATCH))
    run = distill(TrainConfig(STUDENT, METHODS[METHOD], Recipe(epochs=1, batch_size=BATCH, sync_bn=sync_bn), 0), data,
                  teacher)
    views = teacher_views(teacher.model, data, spread=True)
    start = time.perf_counter()
    evaluate(run.model, data, "test", views["test"], knn=reference(run.model, data, spread=True), spread=True)
    return run["train_seconds"], time.perf_counter() - start


def _worker(rank: int, size: int, init: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        seconds = _epoch_seconds()
        if rank == 0:
            torch.save(seconds, f"{out}/seconds.pt")
    finally:
        dist.destroy_process_group()


def ddp_cost(repeats: int) -> dict:
    """``ddp_step_ratio``: per repeat, two workers' epoch ÷ one process's (see the module's docstring)."""
    ratios, single, double, measure = [], [], [], []
    torch.set_num_threads(1)
    _epoch_seconds()  # the teacher, trained once and cached, out of every timing
    for _ in range(repeats):
        one = _epoch_seconds()
        with tempfile.TemporaryDirectory() as out:
            torch.multiprocessing.start_processes(_worker, args=(2, f"file://{out}/group", out), nprocs=2,
                                                  start_method="spawn")
            two = torch.load(f"{out}/seconds.pt")
        single.append(one[0])
        double.append(two[0])
        ratios.append(two[0] / one[0])
        measure.append(two[1] / one[1])
    return {"ddp_step_ratio": ratios, "ddp_measure_ratio": measure, "ddp_one_process_epoch_seconds": single,
            "ddp_two_workers_epoch_seconds": double,
            "ddp_setup": f"{STUDENT} on synthetic (4,200 images, 3x32x32), {METHOD}, global batch {BATCH}, one thread "
                         f"a process, gloo"}
