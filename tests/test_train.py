import dataclasses
import math
import statistics

import pytest
import torch

from kdbench.teacher import get_teacher, load_teacher
from kdbench.methods import METHODS
from kdbench.settings import DATASET_DEFAULTS, Recipe, trial_values
from kdbench.records import TrainState
from kdbench.train import DivergedError, TrainConfig, distill, get_lr


def test_get_lr_cosine_step_and_warmup():
    r = Recipe(epochs=10, lr=0.1)
    assert get_lr(0, 100, r, 10) == pytest.approx(0.1)
    assert get_lr(50, 100, r, 10) == pytest.approx(0.05)
    assert get_lr(100, 100, r, 10) == pytest.approx(0.0, abs=1e-12)
    s = dataclasses.replace(r, schedule="step")
    assert [get_lr(k, 100, s, 10) for k in (0, 49, 50, 75)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    w = dataclasses.replace(r, warmup_epochs=1)  # 10 warm-up steps, linear
    assert get_lr(0, 100, w, 10) == pytest.approx(0.01) and get_lr(9, 100, w, 10) == pytest.approx(0.1)


def test_distill_reports_every_epoch_and_final_metrics(digits, digits_teacher):
    rows = []
    cfg = TrainConfig("cnn_student", METHODS["geometry"], Recipe(epochs=3), seed=0, eval_val="every_epoch",
                      eval_test="every_epoch")
    res = distill(cfg, digits, digits_teacher, lambda e: rows.append(e.row))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"loss_ce", "loss_kd", "loss_geometry", "val_top1", "val_geom_corr", "test_cka"} <= set(rows[0])
    assert "val_knn_top1" not in rows[0] and "val_knn_top1" in rows[-1]  # kNN once, at the end
    assert res["last_test_top1"] == rows[-1]["test_top1"] and res.history == rows
    assert res["best_test_top1"] == max(r["test_top1"] for r in rows)
    # The total loss is the weighted sum of the reported terms.
    m = METHODS["geometry"]
    last = rows[-1]
    assert last["train_loss"] == pytest.approx(m.ce * last["loss_ce"] + m.kd * last["loss_kd"]
                                               + m.geometry * last["loss_geometry"], rel=1e-4)
    assert -1 <= last["val_geom_corr"] <= 1 and 0 <= last["val_cka"] <= 1


def test_by_default_distill_evaluates_only_after_the_last_epoch(digits, digits_teacher):
    rows = []
    res = distill(TrainConfig("cnn_student", METHODS["kd"], Recipe(epochs=3), seed=0), digits, digits_teacher,
                  lambda e: rows.append(e.row))
    assert not any(k.startswith(("val_", "test_")) for r in rows[:-1] for k in r)  # evaluation costs time
    assert {"val_top1", "test_top1", "test_geom_corr", "test_knn_top1"} <= set(rows[-1])
    assert "best_test_top1" not in res.metrics  # no best epoch without a test score per epoch
    # Evaluation never changes training: the same run evaluated every epoch ends with the same numbers.
    every = distill(TrainConfig("cnn_student", METHODS["kd"], Recipe(epochs=3), seed=0, eval_val="every_epoch",
                                eval_test="every_epoch"), digits, digits_teacher)
    assert every["test_top1"] == res["test_top1"] and every["val_geom_corr"] == res["val_geom_corr"]


def test_distill_is_reproducible_from_its_seed(digits, digits_teacher):
    cfg = TrainConfig("cnn_student", METHODS["kd"], Recipe(epochs=2), seed=3)
    a, b = distill(cfg, digits, digits_teacher), distill(cfg, digits, digits_teacher)
    assert a["test_top1"] == b["test_top1"] and a["val_geom_corr"] == b["val_geom_corr"]


def test_method_without_teacher_is_refused(digits):
    with pytest.raises(ValueError, match="needs a teacher"):
        distill(TrainConfig("cnn_student", METHODS["kd"], Recipe(epochs=1)), digits)


def test_nan_loss_raises_diverged(digits, digits_teacher):
    cfg = TrainConfig("cnn_student", METHODS["baseline"], Recipe(epochs=3, lr=1e12), seed=0)
    with pytest.raises(DivergedError, match="epoch"):
        distill(cfg, digits, digits_teacher)


def test_teacher_cache_round_trip(digits, digits_teacher):
    again, hit = get_teacher(digits, "cnn_teacher", DATASET_DEFAULTS["digits"]["recipe"])
    assert hit
    loaded = load_teacher(digits_teacher.meta["path"], digits)
    for k, v in digits_teacher.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k])
    assert torch.allclose(loaded.centroids, digits_teacher.centroids)
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.slow
def test_digits_acceptance_teacher_accuracy_and_geometry_gain(digits, digits_teacher):
    """Issue 2's acceptance: teacher >= 97 % test top-1; over 3 seeds the geometry student keeps
    the teacher's geometry better than the baseline student, by more than the seed std. At half the default
    recipe's epochs (the cosine schedule over 15), for the suite's time; measured on seeds 0-2, the gain in
    test geom_corr over its largest seed std: 0.106 / 0.029 at 15 epochs, 0.119 / 0.053 at the default 30."""
    assert digits_teacher.meta["test_top1"] >= 97.0
    recipe = dataclasses.replace(DATASET_DEFAULTS["digits"]["recipe"], epochs=15)
    runs = {name: [distill(TrainConfig("cnn_student", METHODS[name], recipe, seed), digits, digits_teacher)
                   for seed in (0, 1, 2)] for name in ("baseline", "geometry")}
    corr = {name: [r["test_geom_corr"] for r in rs] for name, rs in runs.items()}
    # bf16 autocast (on the CPU here: the code a GPU runs) ends within 2 points of fp32 on the same seed (measured,
    # seeds 0-2: within 0.6 at 30 epochs, 1.1 at 16 (seed 0 at 15: 1.11); at 8 they have not converged: up to 2.8 apart).
    bf16 = distill(TrainConfig("cnn_student", METHODS["geometry"], dataclasses.replace(recipe, precision="bf16"), 0),
                   digits, digits_teacher)
    fp32 = runs["geometry"][0]
    assert bf16.precision == "bf16" and fp32.precision == "fp32" and math.isfinite(bf16["loss_geometry"])
    assert abs(bf16["test_top1"] - fp32["test_top1"]) <= 2.0 and bf16["train_loss"] != fp32["train_loss"]
    gain = statistics.mean(corr["geometry"]) - statistics.mean(corr["baseline"])
    spread = max(statistics.stdev(corr["geometry"]), statistics.stdev(corr["baseline"]))
    print(f"geom_corr baseline {corr['baseline']} geometry {corr['geometry']}")
    assert gain > spread and not math.isnan(gain)


@pytest.mark.parametrize("name", ["baseline", "kd", "feature", "geometry", "geometry_only", "rkd", "sp", "cc", "dkd"])
def test_every_method_trains_on_digits(name, digits, digits_teacher):
    """(The methods of tests/test_methods.py train there, and resume.)"""
    res = distill(TrainConfig("cnn_student", METHODS[name], Recipe(epochs=2), seed=0), digits, digits_teacher)
    terms = METHODS[name].terms
    assert all(math.isfinite(res[f"loss_{t}"]) for t in terms)
    assert res["test_top1"] > 10.0  # above chance after two epochs


def test_every_method_trains_on_synthetic(synthetic):
    data = synthetic
    assert data.train_x.shape[1:] == (3, 32, 32) and data.num_classes == 100
    # Real shapes, fewer images and a small teacher: this checks that every method runs, not how well.
    data = dataclasses.replace(data, train_x=data.train_x[::16], train_y=data.train_y[::16],
                               val_x=data.val_x[::8], val_y=data.val_y[::8], test_x=data.test_x[::8], test_y=data.test_y[::8])
    teacher, _ = get_teacher(data, "cnn_student", Recipe(epochs=1))
    for name, method in METHODS.items():
        res = distill(TrainConfig("cnn_student", method, Recipe(epochs=1), seed=0), data, teacher)
        assert math.isfinite(res["train_loss"]) and -1 <= res["test_geom_corr"] <= 1, name


@pytest.mark.parametrize("name, precision", [("geometry", "auto"), ("geometry", "bf16")])
def test_resume_from_a_state_ends_exactly_like_the_uninterrupted_run(name, precision, digits, digits_teacher):
    """Everything a continuation needs is in the state: weights, extras, memory, optimiser, RNGs, history, and
    mid-epoch the epoch's permutation, running sums and augmentation draws; in bf16 autocast (on the CPU here: the
    code a GPU runs) as in fp32. (Trainable parts: tests/test_methods.py; streamed data: tests/test_stream.py.)"""
    cfg = TrainConfig("cnn_student", METHODS[name], Recipe(epochs=4, precision=precision), seed=1, eval_test="every_epoch")
    states, rows = {}, []

    def keep(e):
        if e.row:
            rows.append(e.row)
        if e.state is not None:
            states[e.state.epoch, e.state.batch] = e.state

    full = distill(cfg, digits, digits_teacher, keep, state_when=lambda epoch, within: not within or epoch == 3)
    steps = len(digits.labels("train")) // cfg.recipe.batch_size
    # every epoch's end but the last; every step of epoch 3 but its last (its end is the epoch's state)
    assert sorted(states) == [(1, 0), (2, 0), *((2, b) for b in range(1, steps)), (3, 0)]
    import io

    for at in ((2, 0), (2, steps // 2)):
        buf = io.BytesIO()  # through a file, as a checkpoint travels
        torch.save(states[at].state_dict(), buf)
        buf.seek(0)
        resumed_rows = []
        again = distill(cfg, digits, digits_teacher, lambda e: resumed_rows.append(e.row),
                        resume=TrainState.from_state_dict(torch.load(buf, weights_only=True)))
        assert [r["epoch"] for r in resumed_rows] == [3, 4], at
        for k in ("test_top1", "val_geom_corr", "test_cka", "train_loss", "best_test_top1", "val_knn_top1"):
            assert again[k] == full[k], (at, k)
        assert [r["test_top1"] for r in again.history] == [r["test_top1"] for r in rows]
        assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in rows]
        for a, b in zip(again.model.state_dict().values(), full.model.state_dict().values()):
            assert torch.equal(a, b), at
    assert full.precision == {"auto": "fp32", "bf16": "bf16"}[precision]  # auto on the CPU: fp32


def test_bf16_on_a_cuda_device_without_it_is_refused_in_one_line(monkeypatch):
    """No GPU here: the two CUDA queries resolve_precision makes are answered as an old GPU (a V100) would."""
    from kdbench.measure import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    cuda = torch.device("cuda")
    with pytest.raises(ValueError, match=r"^precision = bf16: Tesla V100-SXM2-16GB has no bf16; allowed here: fp32, auto$"):
        resolve_precision("bf16", cuda)
    assert (resolve_precision("fp32", cuda), resolve_precision("auto", torch.device("cpu"))) == ("fp32", "fp32")
    assert resolve_precision("auto", cuda) == "fp32"  # auto: bf16 only where the GPU has it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == resolve_precision("bf16", cuda) == "bf16"


def test_channels_last_on_the_cpu_changes_no_metric_beyond_float_noise(digits, digits_teacher):
    """The layout GPUs train in, on the CPU: the student's convolutions are channels_last, and two epochs end
    within float noise of the contiguous run (measured: top-1 equal, geom_corr 6e-3 apart, train loss 1e-4 apart
    relative at one thread, 2.4e-3 at two: the noise two epochs of SGD grow from a different summation order).
    One thread, as under xdist: at two, the noise alone moved top-1 by 1.1 points in a plain `pytest` run."""
    torch.set_num_threads(1)  # the autouse fixture puts the count back
    runs = {cl: distill(TrainConfig("cnn_student", METHODS["geometry"], Recipe(epochs=2, channels_last=cl), seed=0),
                        digits, digits_teacher) for cl in (False, True)}
    conv = lambda r: next(m.weight for m in r.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv(runs[True]).is_contiguous(memory_format=torch.channels_last) and not \
        conv(runs[False]).is_contiguous(memory_format=torch.channels_last)
    a, b = runs[False], runs[True]
    assert abs(a["test_top1"] - b["test_top1"]) <= 1.0 and abs(a["test_geom_corr"] - b["test_geom_corr"]) <= 0.02
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-2)
    assert "channels_last" not in trial_values(METHODS["geometry"], Recipe(channels_last=True))  # how, not what


def test_a_compiled_student_trains_as_the_eager_one_and_its_state_resumes_eagerly(digits, digits_teacher):
    """torch.compile through the loop's one code path (dynamo's graph capture, AOT autograd's joint graph), with the
    aot_eager backend: inductor's code generation costs 9-25 s of compilation on this CPU, so the suite leaves it
    to `python -m benchmarks --only compile` (measured there: 1.4 points of top-1 after 30 epochs, float order).
    The compiled run ends where the eager one does (measured: equal; the tolerance allows float reordering), its
    compilation kept out of train_seconds; its state (no `_orig_mod.` prefix) resumes in an eager run exactly."""
    recipe = Recipe(epochs=2)
    eager = distill(TrainConfig("cnn_student", METHODS["geometry"], recipe, seed=0), digits, digits_teacher)
    states = {}
    cfg = TrainConfig("cnn_student", METHODS["geometry"], dataclasses.replace(recipe, compile=True, compile_backend="aot_eager"), 0)
    compiled = distill(cfg, digits, digits_teacher, lambda e: states.update({e.row["epoch"]: e.state}),
                       state_when=lambda e, within: e == 1 and not within)
    keys = ("test_top1", "test_geom_corr", "test_cka", "test_knn_top1", "train_loss")
    assert {k: compiled[k] for k in keys} == pytest.approx({k: eager[k] for k in keys}, rel=1e-5, abs=1e-6)
    assert compiled["compile_seconds"] > 0 and eager["compile_seconds"] == 0
    assert not any(k.startswith("_orig_mod") for k in states[1].modules["student"])
    resumed = distill(TrainConfig("cnn_student", METHODS["geometry"], recipe, seed=0), digits, digits_teacher, resume=states[1])
    assert {k: resumed[k] for k in keys} == pytest.approx({k: compiled[k] for k in keys}, rel=1e-5, abs=1e-6)
    assert "compile_backend" not in trial_values(METHODS["geometry"], cfg.recipe)  # how a run computes, not what


def test_a_downstream_objective_is_measured_at_every_evaluated_epoch_and_only_then(digits, digits_teacher):
    """`objectives = ["top1", "map_at_r"]`: a search's scheduler compares val mAP@R at its rungs, so the final
    measures run at every evaluated epoch; otherwise only at the last (they cost a pass over the train split)."""
    from kdbench.study import parse_study

    study = parse_study({"dataset": "digits", "search": {"objectives": ["top1", "map_at_r"],
                                                          "space": {"geometry": {"low": 1.0, "high": 10.0}}}}, None)
    assert study.objectives == ("top1", "map_at_r")
    rows = {}
    for every in (True, False):
        cfg = TrainConfig("cnn_student", METHODS["geometry"], Recipe(epochs=2), 0, eval_val="every_epoch",
                          final_every_epoch=every)
        rows[every] = distill(cfg, digits, digits_teacher).history
    assert all(0 <= h["val_map_at_r"] <= 1 and "val_nmi" in h for h in rows[True])
    assert "val_map_at_r" not in rows[False][0] and rows[False][1]["val_map_at_r"] == rows[True][1]["val_map_at_r"]
