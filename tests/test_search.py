"""The search engine for real: Ray Tune + OptunaSearch + ASHA on digits, small budgets."""

import dataclasses
import math

import numpy as np

import optuna
import pandas as pd
import pytest

from kdbench.search import run_study
from kdbench.study import find_study, load_study
from kdbench.results import most_at_once, read_table

STUDY = """
name = "{name}"
dataset = "digits"
method = "geometry"
[recipe]
epochs = 6
[search]
samples = {samples}
concurrency = 1
[search.space.geometry]
type = "loguniform"
low = 1.0
high = 1000.0
[search.space.lr]
type = "loguniform"
low = 0.0001
high = 0.3
[asha]
grace_period = 1
reduction_factor = 2
rank = "top1"   # plain ASHA on val top-1 in Ray (the searched fixture of conftest runs the default, pareto)
"""


def _study(tmp_path, samples=6, name="s", epochs=4):
    p = tmp_path / f"{name}.toml"
    p.write_text(STUDY.format(samples=samples, name=name).replace("epochs = 6", f"epochs = {epochs}"))
    return load_study(p)


def test_search_results_folder_asha_and_two_objective_optuna(searched_run):
    """The shared search (`kdbench tune quick`: 5 trials of 3 epochs, two-objective ASHA): ASHA's stops, the
    history, and what Optuna was told agree with trials.csv."""
    out, r = searched_run
    trials = read_table(out / "trials.csv")
    epochs = read_table(out / "epochs.csv")
    assert len(trials) == 5 and r.exit_code == 0
    # ASHA really stops poor trials (a misspelt metric or time_attr would silently stop none).
    assert (trials["status"] == "stopped").sum() >= 1 and (trials["status"] == "completed").sum() >= 1
    assert ((trials["fidelity"] == "full") == (trials["epochs"] == 3)).all()
    assert ((trials["fidelity"] == "full") == (trials["status"] == "completed")).all()
    # Per-epoch history: one row per epoch each trial ran.
    assert epochs.groupby("trial_id").size().sort_index().tolist() == \
        trials.set_index("trial_id")["epochs"].sort_index().tolist()
    # Optuna: two directions; full trials COMPLETE with their values, early-stopped ones PRUNED.
    ot = optuna.load_study(study_name="quick", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(ot.directions) == 2 and ot.metric_names == ["val_top1", "val_geom_corr"]  # as optuna-dashboard shows them
    states = [t.state.name for t in ot.trials]
    assert states.count("COMPLETE") == (trials["status"] == "completed").sum()
    assert states.count("PRUNED") == (trials["status"] == "stopped").sum()
    full = trials[trials["status"] == "completed"]
    got = sorted(tuple(round(v, 6) for v in t.values) for t in ot.trials if t.state.name == "COMPLETE")
    want = sorted((round(a, 6), round(b, 6)) for a, b in zip(full["val_top1"], full["val_geom_corr"]))
    assert got == want
    # The sampled hyperparameters are the ones the trials ran with.
    for name in ("geometry", "momentum"):
        assert sorted(round(t.params[name], 9) for t in ot.trials) == sorted(round(g, 9) for g in trials[name])
    assert trials["momentum"].nunique() == 5


def test_resume_runs_only_the_missing_trials(tmp_path, searched, digits_teacher):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(searched, out)
    before = read_table(out / "trials.csv")
    study = load_study(find_study("quick"))
    # As if the first run had been interrupted after its 5 trials of 7.
    run_study(dataclasses.replace(study, search=dataclasses.replace(study.search, samples=7)), out, resume=True)
    after = read_table(out / "trials.csv")
    assert len(after) == 7 and after["trial_id"].is_unique
    pd.testing.assert_frame_equal(after.head(5)[before.columns], before)
    ot = optuna.load_study(study_name="quick", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(ot.trials) == 7
    from kdbench.study import StudyError

    with pytest.raises(StudyError, match="holds study 'quick', not 'other'"):
        run_study(dataclasses.replace(study, name="other"), out, resume=True)
    assert len(read_table(out / "trials.csv")) == 7


def test_grid_with_asha_records_a_diverged_trial_and_goes_on(tmp_path, ray_session, digits_teacher):
    p = tmp_path / "g.toml"
    p.write_text("""
dataset = "digits"
[recipe]
epochs = 2
[grid]
methods = ["baseline", "geometry"]
concurrency = 1
[grid.values]
lr = [0.05, 1e12]
[asha]
enabled = true
grace_period = 1
""")
    study = load_study(p)
    out = tmp_path / "out"
    run_study(study, out)
    trials = read_table(out / "trials.csv").sort_values(["method", "lr"])
    assert len(trials) == 4
    assert (trials["status"] == "failed").tolist() == [False, True, False, True]  # the others ran on (ASHA may stop one)
    assert trials["failure"].fillna("").str.contains("DivergedError").tolist() == [False, True, False, True]
    assert set(trials["point"]) == {0, 1, 2, 3}
    # Resuming a finished grid runs nothing more.
    run_study(study, out, resume=True)
    assert len(read_table(out / "trials.csv")) == 4


def test_existing_folder_is_not_overwritten(tmp_path, digits_teacher):
    from kdbench.study import StudyError

    out = tmp_path / "out"
    out.mkdir()
    (out / "trials.csv").write_text("precious\n")
    with pytest.raises(StudyError, match="not empty; pass --resume"):
        s = _study(tmp_path)
        run_study(dataclasses.replace(s, search=dataclasses.replace(s.search, samples=1)), out)
    assert (out / "trials.csv").read_text() == "precious\n"


DEATHS = """
name = "ck"
dataset = "digits"
[recipe]
epochs = 12        # long enough that a kill lands mid-run: a retry resumed at the last epoch writes no checkpoint
[grid]
methods = ["geometry"]
seeds = [4, 5]
concurrency = 2
[checkpoint]
every = 0          # checkpoints by time only: a few an epoch here, mid-epoch ones among them
minutes = 0.003
max_failures = 1
"""
METRICS = ("val_top1", "test_top1", "val_geom_corr", "test_geom_corr", "test_cka", "test_knn_top1", "last_test_top1")


def _uninterrupted(study, digits, digits_teacher, seed):
    """The same trial without any interruption, in this process, at the trial's thread count (1)."""
    import torch

    from kdbench.train import TrainConfig, distill

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distill(TrainConfig(study.student, study.methods["geometry"], study.recipe, seed), digits, digits_teacher)
    finally:
        torch.set_num_threads(before)


def _wait_for_checkpoint(root, seed, epoch, not_pid=None, deadline_s=120, mid=False):
    """The first checkpoint of ``seed`` at ``epoch`` or later, written by another process than ``not_pid`` (``mid``:
    one taken inside an epoch)."""
    import time

    from kdbench import checkpoints

    deadline = time.time() + deadline_s
    while time.time() < deadline:
        for (_, s), c in checkpoints.find(str(root)).items():
            if s == seed and c["epoch"] >= epoch and c["pid"] != not_pid and (c["batch"] > 0 or not mid):
                return c
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of seed {seed} at epoch {epoch} under {root}")


def test_a_dead_worker_is_retried_from_its_checkpoint_then_failed_with_the_reason(tmp_path, ray_session, digits,
                                                                                    digits_teacher):
    """Two trials at once, checkpoints by time: seed 4's worker dies once, just after a checkpoint inside an epoch
    (retried from its checkpoint, ends bit for bit as if nothing happened); seed 5's dies twice (max_failures = 1:
    recorded failed, with why)."""
    import os
    import signal
    import threading

    p = tmp_path / "ck.toml"
    p.write_text(DEATHS)
    study, out = load_study(p), tmp_path / "out"
    run = threading.Thread(target=run_study, args=(study, out))
    run.start()
    # Each kill once a checkpoint is on disk: Ray retries from the last one the driver has registered.
    os.kill(_wait_for_checkpoint(out / "ray", 4, 2, mid=True)["pid"], signal.SIGKILL)  # as on OOM or a lost node
    first = _wait_for_checkpoint(out / "ray", 5, 1)["pid"]
    os.kill(first, signal.SIGKILL)
    os.kill(_wait_for_checkpoint(out / "ray", 5, 1, not_pid=first)["pid"], signal.SIGKILL)  # its retry dies too
    run.join(timeout=180)
    rows = read_table(out / "trials.csv").set_index("seed")
    ok, failed = rows.loc[4], rows.loc[5]
    assert ok["status"] == "completed" and ok["resumed_from"] >= 1, ok.to_dict()
    ref = _uninterrupted(study, digits, digits_teacher, 4)
    assert {k: ok[k] for k in METRICS} == {k: ref[k] for k in METRICS}
    history = read_table(out / "epochs.csv")
    assert history[history["trial_id"] == ok["trial_id"]]["epoch"].tolist() == list(range(1, 13))
    assert failed["status"] == "failed" and "(after 1 retries)" in failed["failure"], failed.to_dict()
    assert "Actor" in failed["failure"] or "died" in failed["failure"], failed["failure"]
    # Two at once on the tests' Ray (one declared GPU): the automatic rule gave each half of GPU 0.
    assert {str(ok["gpu_ids"]), str(failed["gpu_ids"])} == {"0"}


def test_resumed_asha_starts_with_the_recorded_curves_and_stops_as_the_uninterrupted_one():
    """Rungs at epochs 2 and 4 (grace 2, factor 2, 8 epochs): the curves an earlier run recorded fill them."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from kdbench.search.schedulers import ResumableASHA

    curves = {"a": {1: 50.0, 2: 90.0, 3: 91.0, 4: 95.0}, "b": {1: 40.0, 2: 80.0}, "c": {2: 70.0, 4: 60.0}}
    asha = ResumableASHA(time_attr="epoch", metric="val_top1", mode="max", max_t=8, grace_period=2,
                         reduction_factor=2, curves=curves)
    rungs = {int(m): dict(r) for m, r in asha._brackets[0]._rungs}
    assert rungs[2] == {"earlier:a": 90.0, "earlier:b": 80.0, "earlier:c": 70.0}
    assert rungs[4] == {"earlier:a": 95.0, "earlier:c": 60.0}
    # A new trial at the epoch-2 rung is compared with them: the median of (90, 80, 70) is 80.
    low, high = Trial("f", stub=True), Trial("f", stub=True)
    for t in (low, high):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, low, {"epoch": 2, "val_top1": 75.0}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, high, {"epoch": 2, "val_top1": 85.0}) == TrialScheduler.CONTINUE


def test_pareto_asha_keeps_the_rung_front_in_order_of_arrival_by_hand():
    """Rung at epoch 2, reduction factor 2: a trial continues when it is in the top ceil(n/2) at the rung."""
    from ray.tune.schedulers import TrialScheduler

    from kdbench.search.schedulers import ParetoASHA

    asha = ParetoASHA(time_attr="epoch", metrics=["val_top1", "val_geom_corr"], modes=["max", "max"], max_t=8,
                      grace_period=2, reduction_factor=2)
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # A alone: kept. B is non-dominated too, but one place of two: A arrived first. C is dominated by both.
    # D dominates everything: first of four, two places.
    assert asha.decide("A", 2, (90.0, 0.80)) == go
    assert asha.decide("B", 2, (85.0, 0.90)) == stop
    assert asha.decide("C", 2, (80.0, 0.70)) == stop
    assert asha.decide("D", 2, (95.0, 0.95)) == go
    assert asha.decide("A", 3, (91.0, 0.81)) == go  # between rungs: nothing to decide
    # A minimised objective is turned: geom_err 0.1 beats 0.3.
    err = ParetoASHA(time_attr="epoch", metrics=["val_top1", "val_geom_err"], modes=["max", "min"], max_t=8,
                     grace_period=2, reduction_factor=2)
    assert err.decide("A", 2, err._vector({"val_top1": 90.0, "val_geom_err": 0.3})) == go
    assert err.decide("B", 2, err._vector({"val_top1": 90.0, "val_geom_err": 0.1})) == go
    assert err.decide("C", 2, err._vector({"val_top1": 90.0, "val_geom_err": 0.2})) == go  # 2nd of 3, 2 places
    assert err.decide("D", 2, err._vector({"val_top1": 90.0, "val_geom_err": 0.25})) == stop  # 3rd of 4, 2 places


def test_rung_order_breaks_ties_within_a_front_by_crowding_distance():
    from kdbench.search.schedulers import crowding_distance, rung_order

    pts = np.array([(1, 5), (2, 4), (2.1, 3.9), (4, 2), (5, 1)], dtype=float)  # one front
    # By hand: extremes infinite; (2, 4): (2.1-1)/4 + (5-3.9)/4 = 0.55; (2.1, 3.9): 2/4 + 2/4 = 1.0;
    # (4, 2): (5-2.1)/4 + (3.9-1)/4 = 1.45.
    assert crowding_distance(pts).tolist() == pytest.approx([math.inf, 0.55, 1.0, 1.45, math.inf])
    assert rung_order(pts) == [0, 4, 3, 2, 1]
    # A dominated point comes after the whole front, whatever its crowding.
    assert rung_order(np.vstack([pts, [(0.5, 0.5)]]))[-1] == 5


def test_pareto_asha_never_keeps_a_trial_while_stopping_one_that_dominates_it():
    """At a rung, the kept set is closed under domination: whatever is kept, its dominators are kept too."""
    from kdbench.search.schedulers import rung_order

    rng = np.random.default_rng(0)
    for _ in range(200):
        pts = rng.integers(0, 6, size=(rng.integers(2, 12), 2)).astype(float)
        kept = set(rung_order(pts)[:math.ceil(len(pts) / 3)])
        for j in kept:
            for i in range(len(pts)):
                if (pts[i] >= pts[j]).all() and (pts[i] > pts[j]).any():
                    assert i in kept


def test_a_rung_asks_in_top_which_answers_as_the_whole_order_does():
    """ParetoASHA asks in_top (crowding only for the rank the cut falls in): the same answer as the position in
    rung_order, for every row and every cut, on point sets with ties, duplicates and several ranks."""
    from kdbench.search.schedulers import in_top, rung_order

    rng = np.random.default_rng(1)
    for _ in range(150):
        pts = rng.integers(0, 5, size=(rng.integers(1, 14), 2)).astype(float)
        order = rung_order(pts)
        for keep in range(1, len(pts) + 1):
            assert [in_top(pts, i, keep) for i in range(len(pts))] == [i in order[:keep] for i in range(len(pts))]


def test_pareto_asha_survives_resume_through_its_recorded_curves():
    from ray.tune.schedulers import TrialScheduler

    from kdbench.search.schedulers import ParetoASHA

    curves = {"a": {2: (90.0, 0.9)}, "b": {2: (80.0, 0.8), 4: (81.0, 0.8)}}
    asha = ParetoASHA(time_attr="epoch", metrics=["val_top1", "val_geom_corr"], modes=["max", "max"], max_t=8,
                      grace_period=2, reduction_factor=2, curves=curves)
    assert dict(asha.rungs)[2] == {"earlier:a": (90.0, 0.9), "earlier:b": (80.0, 0.8)}
    # Third at the rung, two places: behind a, ahead of b only if not dominated by it.
    assert asha.decide("new", 2, (70.0, 0.7)) == TrialScheduler.STOP
    assert asha.decide("new2", 2, (85.0, 0.95)) == TrialScheduler.CONTINUE


PACKED = """
name = "packed"
dataset = "digits"
[recipe]
epochs = 2
[grid]
methods = ["baseline"]
seeds = [0, 1, 2, 3]
concurrency = 4
[resources]
cpus_per_trial = 0.5
gpus_per_trial = 0.25
"""


def test_quarter_gpus_pack_four_trials_on_the_one_declared_gpu_and_more_than_a_node_has_is_refused(tmp_path, ray_session,
                                                                                                 digits_teacher):
    """ray_session declares 1 GPU: 0.25 per trial runs the 4 trials on GPU 0 at once, never more than fit; each
    chose its device from what it was given (torch sees no CUDA here: the CPU). The searches of the other tests
    take the automatic rule (one GPU shared by their trials: automatic_gpus)."""
    from kdbench.study import StudyError

    p = tmp_path / "packed.toml"
    p.write_text(PACKED)
    study, out = load_study(p), tmp_path / "out"
    run_study(study, out)
    rows = read_table(out / "trials.csv").to_dict("records")
    assert len(rows) == 4 and {str(r["gpu_ids"]) for r in rows} == {"0"} and {r["device"] for r in rows} == {"cpu"}
    assert all(r["started_at"] < r["ended_at"] and r["peak_memory_mib"] > 50 for r in rows)
    # All four fit at once: measured, they start within 0.5 s of each other and run ~3 s each (4 at once); >= 3
    # leaves room for a loaded machine's slow worker start, <= 4 is what fits.
    assert 3 <= most_at_once(rows) <= 4, rows
    with pytest.raises(StudyError, match=r"--gpus-per-trial 2: the Ray cluster has at most 1 GPUs on a node"):
        run_study(study, tmp_path / "two", gpus_per_trial=2)
    (tmp_path / "workers.toml").write_text(PACKED.replace("gpus_per_trial = 0.25", "workers_per_trial = 2"))
    workers = load_study(tmp_path / "workers.toml")
    with pytest.raises(StudyError, match=r"--gpus-per-trial 0.5: allowed: whole GPUs with workers_per_trial = 2"):
        run_study(workers, tmp_path / "half", gpus_per_trial=0.5)
    assert not (tmp_path / "two").exists() and not (tmp_path / "half").exists()


def test_automatic_gpus_spread_trials_over_the_gpus_before_packing_them_by_hand():
    """Ray puts a fraction on the first GPU with room (checked by hand on Ray 2.60: 4 tasks of 0.25 on 4 declared GPUs
    all got GPU 0, 4 of 0.5 got 0, 0, 1, 1), so the automatic share is 1/k for k trials a GPU, k as small as the
    GPUs allow; a multi-worker trial's workers get a GPU each."""
    from kdbench.search.resources import automatic_gpus

    assert automatic_gpus(2, 0) == 0.0 and automatic_gpus(2, 1) == 0.5 and automatic_gpus(8, 1) == 0.125
    assert automatic_gpus(32, 1) == 0.125  # at most 8 a GPU: the others wait
    assert automatic_gpus(4, 4) == 1.0 and automatic_gpus(2, 8) == 1.0  # a GPU each, never more automatically
    assert automatic_gpus(8, 2) == 0.25 and automatic_gpus(8, 3) == pytest.approx(1 / 3)  # 3 + 3 + 2 trials
    assert automatic_gpus(4, 1, workers=2) == 1.0 and automatic_gpus(4, 0, workers=2) == 0.0


def test_a_gpu_the_cluster_cannot_give_is_named_by_hand():
    """The rule check_gpus applies to the live nodes (its "at most 1 GPUs" branch runs on the tests' Ray above)."""
    from kdbench.search.resources import gpu_shortfall

    assert gpu_shortfall(0.5, [0, 0], 2) == ("the Ray cluster has no GPU (2 nodes, 2 CPUs); allowed: 0 here (the "
                                             "trials run on CPUs), or a cluster whose nodes have GPUs")
    assert gpu_shortfall(2, [1, 1], 8).startswith("the Ray cluster has at most 1 GPUs on a node (2 nodes, 8 CPUs)")
    assert gpu_shortfall(0.25, [1], 4) is None and gpu_shortfall(2, [0, 2], 4) is None and gpu_shortfall(1, [], 0)


def test_most_at_once_counts_overlapping_spans_by_hand():
    span = lambda a, b: {"started_at": a, "ended_at": b}
    assert most_at_once([span(0, 2), span(1, 3), span(2, 4)]) == 2  # one ends as the third starts
    assert most_at_once([span(0, 10), span(1, 2), span(3, 9), span(4, 5)]) == 3
    assert most_at_once([span(0, 1), span(1, 2)]) == 1 and most_at_once([]) == 0
