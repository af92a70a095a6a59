"""Console pieces the commands share: the two consoles, one-line errors, shared options, progress bars, live views.

Results go to stdout (``out``); progress, notes and errors to stderr (``err``).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
import time
from enum import Enum
from typing import Annotated, Optional

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

__all__ = ["out", "err", "errors", "Device", "EvalWhen", "device_or_error", "epoch_progress", "LiveView", "summary_table",
           "finished_lines",
           "check_resources", "threads_now", "teacher_with_progress"]

# Piped output gets a wide page, not 80 columns; piped notes and errors are never hard-wrapped (one line stays
# one line in a log that grep reads).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())


def errors(fn):
    """Bad input -> one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .data import DataError
        from .measure import DivergedError
        from .results import ResultsError
        from .study import StudyError
        from .terms import MethodError

        try:
            return fn(*args, **kwargs)
        except (StudyError, DataError, ResultsError, MethodError) as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # '[timm]' is not markup
            raise typer.Exit(2) from None
        except DivergedError as e:  # not bad input: the run itself went wrong; exit 1, still one line
            err.print(f"[red]error:[/red] the run diverged: {escape(str(e))} (a lower lr or term weight may help)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


# Options that several commands share.
DatasetName = Annotated[str, typer.Option("--dataset", help="digits | synthetic | cifar10 | cifar100 | folder:PATH "
                                           "(an image folder: PATH/train/<class>/*, PATH/test/<class>/*)")]
ImageSize = Annotated[Optional[int], typer.Option(help="image folders: resize (shorter side) and center-crop to this")]
SkipBad = Annotated[bool, typer.Option(help="image folders: leave unreadable images out (counted) instead of stopping")]
ValFraction = Annotated[Optional[float], typer.Option(help="share of train held out as val (default: the data set's)")]
Stream = Annotated[Optional[str], typer.Option(help="image folders: auto (stream from disk what would not fit in "
                                                    "memory; the default), true or false")]
Log = Annotated[Optional[str], typer.Option("--log", help="experiment trackers to log to besides the folder, comma-"
                                                          "separated: tensorboard (DIR/tensorboard), mlflow "
                                                          "($MLFLOW_TRACKING_URI, else DIR/mlflow.db), wandb")]


def trackers_value(text: str) -> list:
    """``--log``'s text as the study's ``[logging] trackers``, checked (one line naming the trackers otherwise)."""
    from .trackers import check_trackers

    return list(check_trackers(text, "--log"))


def stream_value(text: str):
    """``--stream``'s text as the study's ``[data] stream`` value: "auto", True or False (else as given, which
    the data check refuses in one line)."""
    return {"auto": "auto", "true": True, "false": False}.get(str(text).strip().lower(), text)


def data_options(dataset: str, image_size, skip_bad_images: bool, val_fraction, stream=None) -> tuple[str, dict]:
    """The data set's canonical name and its checked options (the ones given)."""
    from .data import canonical, check_data

    given = {"image_size": image_size, "skip_bad_images": skip_bad_images or None, "val_fraction": val_fraction,
             "stream": None if stream is None else stream_value(stream)}
    return canonical(dataset), check_data(dataset, {k: v for k, v in given.items() if v is not None})


class EvalWhen(str, Enum):
    end = "end"
    every_epoch = "every_epoch"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def device_or_error(name: str):
    import torch

    from .study import StudyError
    from .train import resolve_device

    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda: CUDA is not available on this machine; allowed here: auto, cpu")
    return resolve_device(name)


def epoch_progress(total: int, label: str):
    """A rich progress bar over epochs whose description shows the latest metrics."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[metrics]}"), console=err, transient=False)
    task = progress.add_task(label, total=total, metrics="")

    def report(epoch):  # a kdbench.records.Epoch
        row = epoch.row
        shown = [f"loss {row['train_loss']:.3f}", f"train {row['train_top1']:.1f}%"]
        if "val_top1" in row:
            shown.append(f"val {row['val_top1']:.2f}%")
        if "val_geom_corr" in row:
            shown.append(f"geom_corr {row['val_geom_corr']:.3f}")
        progress.update(task, advance=1, metrics="  ".join(shown))

    return progress, report


def teacher_with_progress(data, dataset: str, arch: str | None, epochs: int | None, seed: int, retrain: bool = False,
                          flag: str = "--teacher-epochs", checkpoint=None, checkpoint_flag: str = "--teacher-checkpoint"):
    from .study import check_value
    from .teacher import get_teacher
    from .settings import dataset_defaults

    defaults = dataset_defaults(dataset)
    arch = arch or defaults["teacher"]
    recipe = defaults["recipe"]
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=check_value("epochs", epochs, flag))
    if checkpoint:  # no training: read, evaluated once, cached
        teacher, hit = get_teacher(data, arch, recipe, seed, use_cache=not retrain, checkpoint=checkpoint,
                                   option=checkpoint_flag)
    else:
        progress, report = epoch_progress(recipe.epochs, f"teacher {arch}")
        with progress:
            teacher, hit = get_teacher(data, arch, recipe, seed, report=report, use_cache=not retrain)
            if hit:
                progress.update(progress.task_ids[0], visible=False)
    m = teacher.meta
    made = f"read from {checkpoint}, evaluated and cached" if checkpoint else "trained and cached"
    err.print(f"teacher {arch} on {dataset}: {'loaded from cache' if hit else made} "
              f"({m['path']}); test top-1 {m['test_top1']:.2f}%", highlight=False)
    return teacher


def threads_now() -> int:
    import torch

    return torch.get_num_threads()


def summary_table(res: dict, cfg, dataset: str) -> Table:
    t = Table(title=f"{cfg.student} on {dataset} · method {cfg.method.name} · seed {cfg.seed}", show_header=True)
    t.add_column("metric")
    t.add_column("val", justify="right")
    t.add_column("test", justify="right")
    from .metrics import METRICS

    for name, m in METRICS.items():
        v, te = res.get(f"val_{name}"), res.get(f"test_{name}")
        if v is not None or te is not None:  # val_fraction = 0: no val column
            t.add_row(name + (" (last epoch)" if name == "top1" else ""), "" if v is None else m.show(v),
                      "" if te is None else m.show(te))
    if "best_test_top1" in res:
        t.add_row("top1 (best epoch)", "", METRICS["top1"].show(res["best_test_top1"]))
    t.add_row("parameters", "", f"{res['params']:,}")
    t.add_row("train seconds", "", f"{res['train_seconds']:.1f}")
    t.add_row("images / s", "", f"{res['images_per_second']:,.0f}")
    return t


def teacher_table(m: dict, dataset: str) -> Table:
    t = Table(title=f"teacher {m['arch']} on {dataset}")
    for c in ("val top-1 %", "test top-1 %", "best-epoch test top-1 %", "test kNN %", "params", "train s"):
        t.add_column(c, justify="right")
    t.add_row(f"{m['val_top1']:.2f}" if "val_top1" in m else "—", f"{m['test_top1']:.2f}", f"{m['best_test_top1']:.2f}",
              f"{m['test_knn_top1']:.2f}", f"{m['params']:,}", f"{m['train_seconds']:.1f}")
    return t


def check_model_flag(flag: str, name: str | None):
    """A model named on the command line, checked: one line naming the flag otherwise."""
    from .models import check_model
    from .study import StudyError

    try:
        name is None or check_model(name)
    except ValueError as e:
        raise StudyError(f"{flag} {e}") from None


class LiveView:
    """The tune (or confirm) view, re-rendered on every refresh so the clocks move: a header line, the running
    trials (values, epoch k/N, current val objectives, elapsed, node), the best full-fidelity values, the ETA."""

    def __init__(self, name: str, what: str = "trials"):
        self.name, self.what, self.state = name, what, None

    def __rich__(self):
        s = self.state
        if s is None:
            return "starting the trials…"
        now = time.time()
        clock = lambda sec: f"{sec // 3600:.0f}:{sec % 3600 // 60:02.0f}:{sec % 60:02.0f}" if sec >= 3600 else \
            f"{sec // 60:.0f}:{sec % 60:02.0f}"
        head = Table.grid(padding=(0, 2))
        head.add_row(f"[bold]{self.name}[/bold]", f"{sum(s.counts.values())}/{s.total} {self.what}",
                     f"running {s.running}", f"[green]completed {s.counts.get('completed', 0)}[/green]",
                     f"[yellow]stopped early {s.counts.get('stopped', 0)}[/yellow]",
                     f"[red]failed {s.counts.get('failed', 0)}[/red]", clock(now - s.started))
        parts = [head]
        active = sorted(list(s.active.items()), key=lambda kv: kv[1]["started"])
        if active:
            keys = list(dict.fromkeys(k for _, a in active for k in a["values"]))
            t = Table(box=None, padding=(0, 1), header_style="bold dim", pad_edge=False)
            for col in ("trial", *keys, "epoch", "", *(f"val {o}" for o in s.objectives), "elapsed", "node"):
                t.add_column(col, justify="left" if col in ("trial", "", "node") else "right", no_wrap=True)
            for tid, a in active:
                t.add_row(tid, *(_short(a["values"].get(k)) for k in keys), f"{a['epoch']}/{s.max_epochs}",
                          ProgressBar(total=max(1, s.max_epochs), completed=a["epoch"], width=12),
                          *(_short(a["val"].get(o)) for o in s.objectives), clock(now - a["started"]), a["node"] or "—")
            parts.append(t)
        parts.append("  ".join(f"best val {k}: {v:.4g} ({tid})" for k, (v, tid) in s.best.items()) or "no full trial yet")
        left, seconds = s.eta()
        if left:
            eta = f"ETA ≤ {clock(seconds)}" if seconds is not None else "ETA: after the first epoch"
            parts.append(f"[dim]{eta} ({left:,} trial-epochs left at most{', ASHA stops some' if self.what == 'trials' else ''}"
                         f"; {s.epochs_done:,} done)[/dim]")
        return Group(*parts)


def _short(v) -> str:
    """A value for a narrow column: 4 significant digits, text as it is, — for none."""
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def finished_lines(state, printed: int) -> list[str]:
    """One plain line per trial that finished since the first ``printed`` (what a log gets instead of a live view)."""
    fmt = lambda v: "—" if v is None or v != v else f"{v:.4g}"
    return [f"{r['trial_id']} {r['status']} after {r['epochs']} epochs: " +
            "  ".join(f"{k} {fmt(v)}" for k, v in r.items() if k.startswith("val_")) for r in state.finished[printed:]]


def check_resources(concurrency, cpus_per_trial, gpus_per_trial):
    from .study import StudyError

    if concurrency is not None and concurrency < 1:
        raise StudyError(f"--concurrency {concurrency}: allowed: >= 1")
    if cpus_per_trial is not None and cpus_per_trial <= 0:
        raise StudyError(f"--cpus-per-trial {cpus_per_trial}: allowed: > 0")
    from .values import gpus_allowed

    if gpus_per_trial is not None and gpus_allowed(gpus_per_trial):
        raise StudyError(f"--gpus-per-trial {gpus_per_trial}: allowed: {gpus_allowed(gpus_per_trial)}")


def preload_report() -> threading.Thread:
    """Import the final summary's libraries (scipy, matplotlib, Optuna's fANOVA) in a background thread:
    started while a search's last trials leave a core idle, the summary then begins at once."""

    def load():
        import optuna.importance  # noqa: F401
        import scipy.stats  # noqa: F401  (the intervals; kdbench.stats imports it where used)

        from . import plots, report  # noqa: F401

        plots._pyplot()

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread
