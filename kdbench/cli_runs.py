"""The ``kdbench`` commands of single runs, without a search: train, teacher, evaluate, rerun (registered on
cli.py's app, whose conventions they share: thin commands that parse, call the library and render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .console import (DatasetName, Device, EvalWhen, ImageSize, Log, SkipBad, Stream, ValFraction, check_model_flag,
                      data_options, device_or_error, epoch_progress, err, errors, out, summary_table, teacher_table,
                      teacher_with_progress, threads_now, trackers_value)
from .methods import METHODS
from .values import keys_help

__all__ = ["train", "teacher", "evaluate", "rerun"]
PRESETS = ", ".join(METHODS)


@errors
def train(
    dataset: DatasetName = "digits",
    method: Annotated[str, typer.Option(help=f"a preset: {PRESETS}")] = "geometry",
    student: Annotated[Optional[str], typer.Option(help="student model (default: the data set's)")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="teacher model (default: the data set's)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="student epochs (default: the data set's recipe)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="batch size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (SGD, Nesterov momentum 0.9)")] = None,
    seed: Annotated[int, typer.Option(help="training seed of the student")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY=VALUE, repeatable, e.g. --set geometry=10 "
                    f"--set temperature=4. {keys_help()}")] = None,
    teacher_epochs: Annotated[Optional[int], typer.Option(help="teacher epochs (default: the data set's recipe)")] = None,
    teacher_checkpoint: Annotated[Optional[Path], typer.Option(help="the teacher's weights (a state_dict file): no "
                                                               "teacher training")] = None,
    image_size: ImageSize = None,
    skip_bad_images: SkipBad = False,
    val_fraction: ValFraction = None,
    stream: Stream = None,
    data_root: Annotated[Path, typer.Option(help="folder holding cifar-100-python/ or cifar-10-batches-py/")] = Path("data"),
    download: Annotated[bool, typer.Option(help="download CIFAR into --data-root if missing")] = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present")] = Device.auto,
    compile: Annotated[bool, typer.Option(help="torch.compile the student")] = False,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (a run is bit-reproducible only at the same count)")] = None,
    eval_test: Annotated[EvalWhen, typer.Option(help="evaluate test at the end, or every epoch (the paper's "
                                                "best-epoch top-1)")] = "end",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="write result.json, epochs.csv and student.pt here")] = None,
    log: Log = None,
):
    """Distill one student (training or loading the teacher first) and print its metrics."""
    from . import results
    from .data import load_data
    from .plots import save_plots
    from .study import StudyError, apply_overrides, parse_sets
    from .settings import dataset_defaults, trial_values
    from .terms import check_method
    from .trackers import Run, check_clients, open_trackers
    from .train import TrainConfig, distill

    # Validate everything before any work (and before anything is written).
    dataset, options = data_options(dataset, image_size, skip_bad_images, val_fraction, stream)
    if method not in METHODS:
        raise StudyError(f"--method {method!r} is unknown; allowed: {', '.join(METHODS)}")
    defaults = dataset_defaults(dataset)
    for flag, name in (("--student", student), ("--teacher", teacher)):
        check_model_flag(flag, name)
    values = parse_sets(set_ or [])
    values |= {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("precision", precision))
               if v is not None}
    m, recipe = apply_overrides(METHODS[method], defaults["recipe"], values, "--set")
    if out_dir is not None and (out_dir / "result.json").exists():
        raise StudyError(f"--out {out_dir}: already holds a result.json; choose another folder")
    trackers = trackers_value(log) if log else []
    if trackers and out_dir is None:
        raise StudyError(f"--log {log}: needs --out DIR (the trackers' files go there)")
    check_clients(trackers, "--log")
    if threads is not None:
        if threads < 1:
            raise StudyError(f"--threads {threads}: allowed: >= 1")
        import torch

        torch.set_num_threads(threads)
    dev = device_or_error(device.value)

    data = load_data(dataset, data_root, 0, download, dev, options)
    # Every method is measured against the teacher (geometry, CKA), baseline included, as in `tune`.
    t = teacher_with_progress(data, dataset, teacher, teacher_epochs, 0, checkpoint=teacher_checkpoint)
    cfg = TrainConfig(student or defaults["student"], m, recipe, seed, compile, eval_test=EvalWhen(eval_test).value)
    check_method(m, cfg.student, t, data)  # before the progress bar: a method these models cannot run is one line
    progress, show = epoch_progress(recipe.epochs, f"{cfg.student} · {m.name}")
    # one tracker run, named as its student, method and seed (MLflow: in the experiment of the data set)
    tracked = Run(f"{cfg.student}-{m.name}-seed{seed}", trial_values(m, recipe), {"seed": seed, "method": m.name,
                                                                                 "dataset": dataset, "stage": "train"})
    logs = open_trackers(trackers, out_dir, f"kdbench-train-{dataset}", lambda line: err.print(line, highlight=False),
                         parent=False) if trackers else []

    def report(epoch):
        show(epoch)
        for tr in logs:
            tr.epoch(tracked, epoch.row)

    with progress:
        res = distill(cfg, data, t, report)
    for tr in logs:
        tr.end(tracked, res.metrics, "completed")
        tr.close()
    out.print(summary_table(res.metrics, cfg, dataset))
    if out_dir is not None:
        written = results.write_train_run(out_dir, res, cfg, data, dataset, options, t.meta, str(dev), threads_now())
        written += save_plots(out_dir)
        err.print(f"wrote {', '.join(written)} in {out_dir}")


@errors
def teacher(
    dataset: DatasetName = "digits",
    arch: Annotated[Optional[str], typer.Option(help="teacher model (default: the data set's)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="epochs (default: the data set's recipe)")] = None,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    checkpoint: Annotated[Optional[Path], typer.Option(help="read the weights from this state_dict file (evaluated "
                                                       "once and cached) instead of training")] = None,
    image_size: ImageSize = None,
    skip_bad_images: SkipBad = False,
    val_fraction: ValFraction = None,
    stream: Stream = None,
    data_root: Annotated[Path, typer.Option(help="folder holding the CIFAR archives")] = Path("data"),
    download: Annotated[bool, typer.Option(help="download CIFAR into --data-root if missing")] = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present")] = Device.auto,
    retrain: Annotated[bool, typer.Option(help="train even if cached (and replace the cache entry)")] = False,
):
    """Train a teacher, or read it from --checkpoint (either is cached: $KDBENCH_CACHE or ~/.cache/kdbench), and print it."""
    from .data import load_data

    dataset, options = data_options(dataset, image_size, skip_bad_images, val_fraction, stream)
    check_model_flag("--arch", arch)
    dev = device_or_error(device.value)
    data = load_data(dataset, data_root, 0, download, dev, options)
    t = teacher_with_progress(data, dataset, arch, epochs, seed, retrain, flag="--epochs", checkpoint=checkpoint,
                              checkpoint_flag="--checkpoint")
    out.print(teacher_table(t.meta, dataset))


@errors
def evaluate(
    files: Annotated[Optional[list[Path]], typer.Argument(help="student files: kdbench's student.pt, RepDistiller or "
                                                               "mdistiller checkpoints, or plain state_dicts")] = None,
    student: Annotated[Optional[str], typer.Option(help="the students' architecture (a zoo name, tv:NAME or timm:NAME)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="results folder: new, or an evaluate folder to add to")] = None,
    dataset: DatasetName = "digits",
    teacher: Annotated[Optional[str], typer.Option(help="teacher model (default: the data set's)")] = None,
    teacher_checkpoint: Annotated[Optional[Path], typer.Option(help="the teacher's weights (default: the cached or "
                                                               "trained teacher, as train has it)")] = None,
    label: Annotated[str, typer.Option(help="the method's name in compare; files with one label are its seeds")] = "evaluated",
    image_size: ImageSize = None,
    skip_bad_images: SkipBad = False,
    val_fraction: ValFraction = None,
    stream: Stream = None,
    data_root: Annotated[Path, typer.Option(help="folder holding cifar-100-python/ or cifar-10-batches-py/")] = Path("data"),
    device: Annotated[Device, typer.Option(help="auto: CUDA when present")] = Device.auto,
):
    """Measure students trained anywhere against a teacher (no training): every metric per file, as rows compare ranks."""
    from .evaluate import check_students, evaluate_students
    from .data import load_data

    from .data import DataError

    dataset, options = data_options(dataset, image_size, skip_bad_images, val_fraction, stream)
    for flag, v, allowed in (("--student", student, "the students' architecture"), ("--out", out_dir, "a results folder")):
        if v is None:
            raise DataError(f"{flag}: missing; allowed: {allowed}")
    check_model_flag("--student", student)
    check_model_flag("--teacher", teacher)
    if not files:
        raise DataError("--student: no student files given; allowed: kdbench evaluate FILE [FILE ...] --student ARCH")
    dev = device_or_error(device.value)
    data = load_data(dataset, data_root, 0, False, dev, options)
    check_students(student, list(files), data, out_dir)  # before the teacher is read or trained
    t = teacher_with_progress(data, dataset, teacher, None, 0, checkpoint=teacher_checkpoint)
    tm = t.meta
    study = {"dataset": dataset, "split_seed": 0, "teacher": tm["arch"], "teacher_recipe": tm.get("recipe"),
             "teacher_seed": tm.get("seed"), "student": student, "recipe": {"epochs": None},
             "data_options": options, "teacher_checkpoint": tm.get("checkpoint") or ""}
    rows = evaluate_students(out_dir, data, t, student, list(files or ()), label, study, str(dev))
    for r in rows:
        out.print(f"{Path(r['file']).name}: test top-1 {r['test_top1']:.2f}%  geom_corr {r.get('test_geom_corr', float('nan')):.3f}"
                  f"  cka {r.get('test_cka', float('nan')):.3f}  kNN {r['test_knn_top1']:.2f}%", highlight=False)
    err.print(f"{len(rows)} students measured ({len(files) - len(rows)} already there) → {out_dir}; "
              f"kdbench compare {out_dir}", highlight=False)


@errors
def rerun(
    folder: Annotated[Path, typer.Argument(help="results folder of `kdbench tune`")],
    trial_id: Annotated[str, typer.Argument(help="the trial_id of a row of its trials.csv")],
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: the trial's recorded count)")] = None,
    device: Annotated[Optional[Device], typer.Option(help="default: the trial's recorded device, where present")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="folder holding the CIFAR archives")] = None,
):
    """Train one recorded trial again (its configuration, seed, threads and device); print recorded vs rerun metrics.

    On the same machine the differences are zero, bit for bit."""
    from .rerun import rerun_trial
    from .study import StudyError

    if threads is not None and threads < 1:
        raise StudyError(f"--threads {threads}: allowed: >= 1")
    res = rerun_trial(folder, trial_id, threads, device.value if device else None,
                      str(data_root) if data_root else None)
    t = Table(title=f"{folder} · trial {trial_id} · config {res['trial'].get('config_id', '?')} · seed "
                    f"{int(res['trial']['seed'])} · {res['epochs']} epochs · {res['threads']} thread(s) on {res['device']}")
    for c in ("metric", "recorded", "rerun", "difference"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for k, v in res["recorded"].items():
        w = res["rerun"][k]
        t.add_row(k, f"{v:.6g}", f"{w:.6g}", f"{w - v:+.3g}" if w != v else "0")
    out.print(t)
    same = all(res["rerun"][k] == v for k, v in res["recorded"].items())
    rec = res["trial"]
    where = f"recorded on {rec.get('host', 'an unrecorded host')} with {rec.get('threads', '?')} thread(s)"
    out.print("identical to the recorded trial, bit for bit" if same else
              f"differs from the recorded trial ({where}): another machine, thread count or library version "
              f"changes the last digits, and training amplifies them", highlight=False)
