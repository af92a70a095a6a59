"""Data-parallel training (issue 32): two gloo workers started here without Ray (Ray Train starts them in a search)
compute what one process computes -- the same student after the first step, the same geometry memory and CRD banks
after an epoch, the same final metrics within float noise -- for kd, geometry and crd, with `sync_bn = true`
(each worker's own BatchNorm statistics, DDP's default, are checked against their own formulation); a measuring
pass spread over the workers gives one process's metrics."""

import dataclasses

import pytest
import torch

from kdbench.methods import METHODS
from kdbench.settings import Recipe
from kdbench.train import TrainConfig, distill

FIRST_STEP = {"train_per_class": 7}  # 70 training images: one step of 64 an epoch
SHORT = {"train_per_class": 40}  # 400: six steps an epoch
METHOD_NAMES = ("kd", "geometry", "crd")


def _jobs():
    one_step = [(FIRST_STEP, TrainConfig("cnn_student", METHODS[m], Recipe(epochs=1, batch_size=64, sync_bn=True), 3))
                for m in METHOD_NAMES]
    two_epochs = [(SHORT, TrainConfig("cnn_student", METHODS[m], Recipe(epochs=2, batch_size=64, sync_bn=True), 3))
                  for m in METHOD_NAMES]
    return one_step + two_epochs + [(SHORT, dataclasses.replace(two_epochs[1][1], recipe=Recipe(epochs=2, batch_size=64)))]


def _run(options, cfg, teacher_blob):
    """One job, in whichever process: the run's student, its state after epoch 1 (where it has two), its metrics."""
    from kdbench.data import load_data
    from kdbench.teacher import load_teacher

    data = load_data("digits", options=options)
    states = []
    run = distill(cfg, data, load_teacher(teacher_blob, data), lambda e: states.append(e.state) if e.state else None,
                  state_when=lambda epoch, within: not within)
    return {"student": run.model.state_dict(), "state": states[0].modules if states else None, "metrics": run.metrics}


def _mid_epoch(rank, teacher_blob):
    """Two workers checkpoint inside epoch 1 (rank 0 asks, at step 8 of 9: where they agree) and resume from rank
    0's state: the workers' reports, and the resumed run's student, metrics and losses beside the whole run's."""
    import torch.distributed as dist

    from kdbench.data import load_data
    from kdbench.teacher import load_teacher

    data = load_data("digits", options={"train_per_class": 60})  # 600 images: 9 steps of 64 an epoch
    teacher = load_teacher(teacher_blob, data)
    cfg = TrainConfig("cnn_student", METHODS["geometry"], Recipe(epochs=2, batch_size=64, sync_bn=True), 3)
    reports = []
    whole = distill(cfg, data, teacher, reports.append, state_when=lambda epoch, within: within and epoch == 1 and rank == 0)
    mid = [e.state for e in reports if not e.row]
    shared = [mid[0]]
    dist.broadcast_object_list(shared, src=0)  # as Train hands every worker rank 0's checkpoint
    resumed = distill(cfg, data, teacher, resume=shared[0])
    return {"reports": [(bool(e.row), e.state is not None) for e in reports], "batch": shared[0].batch,
            "whole": (whole.model.state_dict(), whole.metrics), "resumed": (resumed.model.state_dict(), resumed.metrics),
            "losses": [[h["train_loss"] for h in run.history] for run in (whole, resumed)]}


def _compiled(teacher_blob):
    """The first step of the geometry job, compiled around DDP (aot_eager: dynamo's graphs split at DDP's buckets,
    without inductor's C++ compilation, ~17 s a worker here)."""
    from kdbench.data import load_data
    from kdbench.teacher import load_teacher

    options, cfg = _jobs()[1]
    cfg = dataclasses.replace(cfg, compile=True, recipe=dataclasses.replace(cfg.recipe, compile_backend="aot_eager"))
    data = load_data("digits", options=options)
    from torch._dynamo.utils import counters  # dynamo's count of the graphs it compiled

    before = counters["stats"]["unique_graphs"]
    run = distill(cfg, data, load_teacher(teacher_blob, data))
    return run.model.state_dict(), counters["stats"]["unique_graphs"] - before


def _measured(teacher_blob, spread):
    """Every metric of a fixed student (seeded, untrained) on val (179 images) and test (359), kNN included, with
    the teacher's views: each worker measuring its share of every pass (``spread``), or one process."""
    from kdbench.data import load_data
    from kdbench.measure import evaluate, reference, teacher_views
    from kdbench.models import build_model
    from kdbench.teacher import load_teacher

    data = load_data("digits", options=SHORT)
    views = teacher_views(load_teacher(teacher_blob, data).model, data, spread=spread)
    torch.manual_seed(11)
    model = build_model("cnn_student", 10, 1)
    ref = reference(model, data, spread=spread)
    return {k: v for split in ("val", "test") for k, v in evaluate(model, data, split, views[split], knn=ref, spread=spread).items()}


def _worker(rank, size, init, teacher_blob, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    try:
        torch.save([_run(o, cfg, teacher_blob) for o, cfg in _jobs()] + [_measured(teacher_blob, True), _compiled(teacher_blob),
                                                                          _mid_epoch(rank, teacher_blob)], f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, digits_teacher):
    """Every job on two gloo workers (spawned once: ~5 s of start-up), and in this process at one thread."""
    out = tmp_path_factory.mktemp("ddp")
    blob = digits_teacher.blob()
    torch.multiprocessing.start_processes(_worker, args=(2, f"file://{out}/group", blob, str(out)), nprocs=2,
                                          start_method="spawn")
    ranks = [torch.load(out / f"{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    return ranks, [_run(o, cfg, blob) for o, cfg in _jobs()] + [_measured(blob, False)]


def _close(a: dict, b: dict, rtol: float, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol) for k in a)


@pytest.mark.parametrize("job", range(3), ids=METHOD_NAMES)
def test_two_workers_take_the_first_step_one_process_takes(two_workers, job):
    """Global batch 64 = 2 x 32: the student after one step equals one process's at batch 64 (float tolerance
    1e-5 relative: the sums are reduced in another order), and both workers hold the very same one."""
    (rank0, rank1), single = two_workers
    assert all(torch.equal(rank0[job]["student"][k], rank1[job]["student"][k]) for k in rank0[job]["student"])
    assert _close(rank0[job]["student"], single[job]["student"], rtol=1e-5, atol=1e-6)
    # and the step moved it: the check is not comparing two initial students
    from kdbench.models import build_model

    torch.manual_seed(3)
    start = build_model("cnn_student", 10, 1).state_dict()
    assert not _close(start, single[job]["student"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("job", range(3, 6), ids=METHOD_NAMES)
def test_two_workers_keep_the_memory_one_process_keeps_and_end_with_its_metrics(two_workers, job):
    """After an epoch the geometry memory and CRD's banks (the extras) equal one process's on both workers; after
    two epochs rank 0's metrics are one process's within float noise grown over 12 steps (top-1 within 1 point,
    geometry correlation within 0.01, training loss 1e-3 relative)."""
    (rank0, rank1), single = two_workers
    for name in single[job]["state"]:
        assert _close(rank0[job]["state"][name], single[job]["state"][name], rtol=1e-4, atol=1e-5), name
        assert _close(rank0[job]["state"][name], rank1[job]["state"][name], rtol=0, atol=0), name
    a, b = rank0[job]["metrics"], single[job]["metrics"]
    assert abs(a["test_top1"] - b["test_top1"]) <= 1.0 and abs(a["test_geom_corr"] - b["test_geom_corr"]) <= 0.01
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    measured = {k: v for k, v in a.items() if k.startswith(("val_", "test_", "last_"))}
    assert len(measured) >= 15  # and every worker measures them, the same
    assert {k: rank1[job]["metrics"][k] for k in measured} == pytest.approx(measured, rel=0, abs=0, nan_ok=True)


def test_two_workers_measure_their_shares_and_get_one_process_metrics(two_workers):
    """A measuring pass spread over two workers (179 and 359 images: unequal shares travel padded): every metric,
    kNN, retrieval and clustering included, is one process's, on both workers alike (features within float noise:
    the batches differ)."""
    (rank0, rank1), single = two_workers
    a, b = rank0[7], single[7]
    assert {"test_knn_top1", "test_cka", "test_geom_corr"} <= a.keys() and rank1[7] == pytest.approx(a, rel=0, abs=0, nan_ok=True)
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5, nan_ok=True)


def test_each_workers_own_batchnorm_statistics_train_as_ddp_gives_them(two_workers):
    """Without sync_bn each worker normalises with its half-batch's statistics: a different student from one
    process's (the statistics differ: the workers do train on different halves), that learns as well."""
    (rank0, _), single = two_workers
    own, synced = rank0[6], rank0[4]
    assert not _close(own["student"], synced["student"], rtol=1e-4, atol=1e-5)
    assert own["metrics"]["test_top1"] >= single[4]["metrics"]["test_top1"] - 10


def test_a_workers_share_of_an_epoch_is_its_rows_of_the_one_process_batches(digits):
    """Every worker draws the whole epoch (order, crops, flips) from the same generator and keeps its contiguous
    rows of each global batch: the two shares of a batch, side by side, are one process's batch."""
    from kdbench.parallel import World

    whole = list(digits.train_batches(64, torch.Generator().manual_seed(5)))
    halves = [list(digits.train_batches(64, torch.Generator().manual_seed(5), share=World(r, 2).share(64))) for r in (0, 1)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == digits.size("train") // 64
    for b, (x, y, i) in enumerate(whole):
        (x0, y0, i0), (x1, y1, i1) = halves[0][b], halves[1][b]
        assert len(y0) == len(y1) == 32
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([i0, i1]), i)


def test_workers_checkpoint_together_inside_an_epoch_and_resume_exactly(two_workers):
    """Rank 0's clock asks for a state inside epoch 1; the workers agree at step 8 and both report (rank 0 with the
    state, rank 1 without: Train's reports are a barrier); resumed from it on two workers, the run ends with the
    whole run's student and metrics bit for bit, its losses within float noise (rank 0 resumes with every worker's
    sums so far)."""
    (rank0, rank1), _ = two_workers
    r0, r1 = rank0[-1], rank1[-1]
    assert r0["reports"] == [(False, True), (True, False), (True, False)]  # mid-epoch, epoch 1, epoch 2
    assert r1["reports"] == [(False, False), (True, False), (True, False)]
    assert r0["batch"] == 8
    for r in (r0, r1):
        (whole, _), (resumed, _) = r["whole"], r["resumed"]
        assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    (_, a), (_, b) = r0["whole"], r0["resumed"]
    measured = [k for k in a if k.startswith(("val_", "test_", "last_")) or k == "train_top1"]
    assert len(measured) >= 20 and {k: a[k] for k in measured} == pytest.approx({k: b[k] for k in measured}, rel=0, abs=0, nan_ok=True)
    whole_losses, resumed_losses = r0["losses"]  # epoch 1's: the one resumed in its middle
    assert resumed_losses == pytest.approx(whole_losses, rel=1e-6)


def test_two_compiled_workers_take_the_eager_workers_first_step(two_workers):
    """`compile = true` with workers: torch.compile around DDP gives the eager workers' student after the first step
    (1e-5 relative), the same on both workers. (By hand with inductor, 2 epochs on two gloo workers: weights within
    1.2e-4, the same test top-1, the loss within 3e-7 relative; 17 s of compilation a worker.)"""
    (rank0, rank1), _ = two_workers
    (compiled, graphs), eager = rank0[-2], rank0[1]["student"]
    assert graphs > 0 and rank1[-2][1] > 0  # dynamo did compile the step
    assert all(torch.equal(compiled[k], rank1[-2][0][k]) for k in compiled)
    assert _close(compiled, eager, rtol=1e-5, atol=1e-6)
