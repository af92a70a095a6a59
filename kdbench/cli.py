"""The ``kdbench`` command: thin commands over the library (parse, call, render)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .cli_runs import evaluate, rerun, teacher, train
from .console import (ImageSize, LiveView, Log, Stream, ValFraction, check_resources, err, errors, out, stream_value,
                      trackers_value)
from .methods import METHODS
from .metrics import METRICS
from .settings import SAMPLERS, StudyKey
from .values import keys_help
from .views import compare_folders, live_view, publish_report, show_progress, tune_one

# rich_markup_mode None: help is plain text ("[pairs]", "[METHOD.]KEY" are words, not markup); the lists in it come
# from the registries (presets, --set keys, metrics, samplers), so they cannot fall behind them.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, rich_markup_mode=None,
                  help="Benchmark knowledge-distillation methods on accuracy and feature-space geometry.")
PRESETS, OBJECTIVES = ", ".join(METHODS), ", ".join(METRICS)
# Results go to stdout, progress, notes and errors to stderr. Piped output gets a wide page, not 80 columns.
for command in (train, teacher):  # single runs (kdbench/cli_runs.py), first in the help as before
    app.command()(command)


@app.command()
@errors
def studies():
    """List the bundled studies, one line each."""
    from .pairs import load_studies
    from .study import bundled_studies

    rows = [("study", "kind", "trials", "data set", "teacher → student", "description")]
    for name, path in bundled_studies().items():
        ss = load_studies(path)
        s = ss[0]
        pairs = f"{len(ss)} pairs" if len(ss) > 1 else f"{s.teacher} → {s.student}"
        rows.append((name, "grid" if s.is_grid else f"search/{s.search.sampler}", str(sum(x.trial_count() for x in ss)),
                     s.dataset, pairs, s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5]
        out.print(f"[bold]{line}[/bold]" if i == 0 else line, soft_wrap=True, highlight=False)


@app.command()
@errors
def tune(
    study: Annotated[Optional[str], typer.Argument(help="study file or bundled study name (default: digits; none "
                                                       "with --dataset: its defaults and the default search; none with "
                                                       "--resume: the folder's study)")] = None,
    space: Annotated[Optional[list[str]], typer.Option(help="KEY=DIST:LOW:HIGH[:when=M,...] (uniform, loguniform, int), "
                                                       "KEY=categorical:A,B or KEY=off: one axis of the search")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="[METHOD.]KEY=VALUE: a recipe field, or a term "
                                                      "weight or hyperparameter (of the study's method by default). "
                                                      f"{keys_help()}")] = None,
    # Each option marked StudyKey sets that key of the study's table (kdbench.flags applies it): a new flag for a
    # study key is one option here.
    dataset: Annotated[Optional[str], typer.Option(help="digits | synthetic | cifar10 | cifar100 | folder:PATH"),
                       StudyKey("dataset")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="teacher model"), StudyKey("teacher")] = None,
    student: Annotated[Optional[str], typer.Option(help="student model"), StudyKey("student")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="student epochs (the full fidelity)"), StudyKey("recipe.epochs")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32"),
                         StudyKey("recipe.precision")] = None,
    samples: Annotated[Optional[int], typer.Option(help="number of trials (searches)"), StudyKey("search.samples")] = None,
    sampler: Annotated[Optional[str], typer.Option(help=" | ".join(SAMPLERS)), StudyKey("search.sampler")] = None,
    objectives: Annotated[Optional[str], typer.Option(help=f"two of {OBJECTIVES}, e.g. top1,geom_corr"),
                          StudyKey("search.objectives", lambda v: [o.strip() for o in v.split(",")])] = None,
    no_asha: Annotated[bool, typer.Option("--no-asha", help="no early stopping: every trial runs every epoch"),
                       StudyKey("asha.enabled", lambda v: not v)] = False,
    image_size: Annotated[ImageSize, StudyKey("data.image_size")] = None,
    stream: Annotated[Stream, StudyKey("data.stream", stream_value)] = None,
    log: Annotated[Log, StudyKey("logging.trackers", trackers_value)] = None,
    val_fraction: Annotated[ValFraction, StudyKey("data.val_fraction")] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="trials running at once"), StudyKey("search.concurrency")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="results folder (default results/<study>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the interrupted run in --out")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (e.g. auto); default: a fresh local Ray")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="folder holding the CIFAR archives")] = None,
    download: Annotated[bool, typer.Option(help="download CIFAR into --data-root if missing")] = False,
    gpus_per_trial: Annotated[Optional[float], typer.Option(help="GPUs per trial; fractions share a GPU")] = None,
    cpus_per_trial: Annotated[Optional[float], typer.Option(help="CPUs per trial"), StudyKey("resources.cpus_per_trial")] = None,
    workers_per_trial: Annotated[Optional[int], typer.Option(help="data-parallel workers per trial (Ray Train, DDP); "
                                                             "CPUs and GPUs are then per worker"),
                                 StudyKey("resources.workers_per_trial")] = None,
    storage: Annotated[Optional[str], typer.Option(help="where trials keep checkpoints: a shared folder or a URI "
                                                   "(s3://...); default: DIR/ray")] = None,
    teacher_checkpoint: Annotated[Optional[Path], typer.Option(help="the teacher's weights (a state_dict file) "
                                                               "instead of the study's teacher"),
                                  StudyKey("teacher_checkpoint", lambda p: str(p.expanduser().resolve()))] = None,
    verbose: Annotated[bool, typer.Option(help="show Ray's and Optuna's logs")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="print the resolved study (space, trial-epochs, resources) and "
                                                      "exit: no data, no teacher, nothing written")] = False,
):
    """Search (or enumerate) a study's trials with Ray Tune + Optuna + ASHA; write a results folder.

    A study with [pairs] runs one study per teacher-student pair, each into DIR/<teacher>-<student>. Flags
    override the study; the folder's study.json records the study that ran, so --resume needs no flags again.
    """
    command_started = time.time()
    from .flags import Flags, study_source
    from .pairs import load_studies, pair_name, plan_lines, teacher_text
    from .study import StudyError

    check_resources(concurrency, cpus_per_trial, gpus_per_trial)
    flags = Flags.of(tune, locals())
    if resume and out_dir is None:
        raise StudyError("--resume needs --out DIR (the folder of the run to continue)")
    path, raw = study_source(study, flags, out_dir if resume else None)
    studies = load_studies(path, flags, raw)
    if plan:
        for line in plan_lines(studies):
            out.print(line, highlight=False, soft_wrap=True)
        return
    for s in (s for s in studies if s.teacher_looked_for):  # an ImageNet teacher is days of training: say so first
        err.print(f"note: {s.name}: teacher {s.teacher}: {teacher_text(s)}", highlight=False, soft_wrap=True)
    base = out_dir or Path("results") / f"{Path(studies[0].path).stem if len(studies) > 1 else studies[0].name}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    folders = [base] if len(studies) == 1 else [base / pair_name(s.teacher, s.student) for s in studies]
    if storage is not None:  # before anything is printed or written
        from .checkpoints import resolve_storage

        resolve_storage(storage, base)
    started_ray = False
    if len(studies) > 1:  # one Ray instance for every pair (each would start and stop its own)
        from .search import init_ray

        started_ray = init_ray(address, verbose)
    again = f"kdbench tune {study + ' ' if len(studies) > 1 else ''}--out {base} --resume"  # study.json has the rest
    try:
        for s, folder in zip(studies, folders):
            go_on = resume and (len(studies) == 1 or (folder / "study.json").exists())  # pairs: the ones begun resume
            tune_one(s, again, folder, go_on, address, data_root, download, gpus_per_trial, storage, verbose,
                     command_started)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


@app.command()
@errors
def confirm(
    folder: Annotated[Path, typer.Argument(help="results folder of a finished search")],
    seeds: Annotated[int, typer.Option(help="fresh seeds per configuration (never a seed the search used)")] = 3,
    top: Annotated[int, typer.Option(help="search configurations to confirm: the validation front first, knee first")] = 3,
    with_: Annotated[str, typer.Option("--with", help="reference presets to run too (comma-separated), or none")] = "baseline,kd",
    concurrency: Annotated[Optional[int], typer.Option(help="trials running at once (default: the study's)")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (e.g. auto); default: a fresh local Ray")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="folder holding the CIFAR archives")] = None,
    gpus_per_trial: Annotated[Optional[float], typer.Option(help="GPUs per trial; fractions share a GPU")] = None,
    cpus_per_trial: Annotated[Optional[float], typer.Option(help="CPUs per trial")] = None,
    storage: Annotated[Optional[str], typer.Option(help="where trials keep checkpoints (default: the search's)")] = None,
    verbose: Annotated[bool, typer.Option(help="show Ray's logs")] = False,
    until_settled: Annotated[bool, typer.Option("--until-settled", help="then add seeds in rounds to the configurations "
                                                "whose front membership the seeds do not settle yet")] = False,
    max_seeds: Annotated[int, typer.Option(help="with --until-settled: the most seeds a configuration gets")] = 8,
    min_seeds: Annotated[Optional[int], typer.Option(help="with --until-settled: the seeds every configuration gets "
                                                          "first (default: --seeds)")] = None,
    log: Log = None,
):
    """Retrain a search's best configurations and reference presets on fresh seeds, in the same folder.

    The runs are appended to trials.csv with stage = confirm; `compare` then reports each
    configuration over its confirmation seeds, with 95% intervals. Running it again adds nothing;
    after an interruption it runs only the missing (configuration, seed) pairs.
    """
    from .results import read_study
    from .study import StudyError, check_confirm, study_from_dict

    presets = () if with_.strip().lower() == "none" else tuple(m.strip() for m in with_.split(",") if m.strip())
    meta = read_study(folder)
    if meta.get("kind") != "search":
        raise StudyError(f"{folder}: holds a {meta.get('kind', 'single')} run, not a search; a grid needs no "
                         f"confirmation (its seeds are already there); allowed: the folder of a search")
    try:
        methods = study_from_dict(meta["study"]).methods
    except (KeyError, TypeError, ValueError) as e:
        raise StudyError(f"{folder / 'study.json'}: not a study this version of kdbench reads ({e!r})") from None
    names = ("--min-seeds" if min_seeds is not None else "--seeds", "--top", "--max-seeds", "--with")
    c = check_confirm(min_seeds if min_seeds is not None else seeds, top, presets, methods, "", until_settled, max_seeds, names)
    check_resources(concurrency, cpus_per_trial, gpus_per_trial)
    if storage is not None:
        from .checkpoints import resolve_storage

        resolve_storage(storage, folder)

    from .search import run_confirm

    view = LiveView(meta.get("name", folder.name), "confirm")

    def on_plan(picked, todo):
        names = ", ".join(f"{p['config_id']} {p['method']} [{p['from']}]" for p in picked)
        err.print(f"confirm {folder}: {len(picked)} configurations ({names}) × {c.seeds} seeds; {len(todo)} runs to go",
                  highlight=False, markup=False)

    live, printed = live_view(view), [0]

    def on_update(state):
        view.state = state
        if err.is_terminal and not live.is_started:
            live.start()
        show_progress(live, state, printed)

    try:
        summary = run_confirm(folder, c, concurrency=concurrency, cpus_per_trial=cpus_per_trial,
                              gpus_per_trial=gpus_per_trial, address=address,
                              data_root=str(data_root) if data_root else None, storage=storage, verbose=verbose,
                              trackers=tuple(trackers_value(log)) if log else (), on_update=on_update, on_plan=on_plan)
    finally:
        live.stop()
    rounds = f" over {summary['rounds']} rounds" if c.until_settled else ""
    err.print(f"{summary['added']} runs added ({summary['planned']} planned first{rounds}) in {summary['seconds']:.0f} s "
              f"→ {folder}")
    # summary files and pictures written again only when runs were added (a rerun adding nothing changes nothing)
    compare_folders([folder], ("config",), None, "table", False, top=10, save=summary["added"] > 0)
    if summary["added"]:
        publish_report(folder)


@app.command()
@errors
def compare(
    folders: Annotated[Optional[list[Path]], typer.Argument(help="results folders (default: the most recent under results/)")] = None,
    by: Annotated[str, typer.Option(help="config (seeds of one configuration together), or columns (comma-separated), "
                                         "e.g. method or method,geometry")] = "config",
    plot: Annotated[Optional[Path], typer.Option(help="write the accuracy-vs-geometry plot (PNG) here")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | md | csv | json")] = "table",
    val: Annotated[bool, typer.Option("--val", help="use validation metrics instead of test")] = False,
    save: Annotated[bool, typer.Option(help="also write leaderboard.md, front.csv and pareto.png into the (single) folder")] = False,
    interval: Annotated[str, typer.Option(help="95% interval of a configuration's mean: t (Student-t, covers 95% at "
                                               "3 seeds) | bootstrap (percentile; too narrow at few seeds)")] = "t",
):
    """Leaderboard (mean ± std, 95% interval, P(improvement) over seeds), the Pareto front with P(on front), importances.

    Configurations are ranked on their means over seeds; the front is decided on validation means, with
    its stability after `confirm`."""
    from .results import ResultsError, find_latest
    from .stats import INTERVALS

    if fmt not in ("table", "md", "csv", "json"):
        raise ResultsError(f"--format {fmt!r}: allowed: table, md, csv, json")
    if interval not in INTERVALS:
        raise ResultsError(f"--interval {interval!r}: allowed: {', '.join(INTERVALS)}")
    if not folders:
        latest = find_latest("results")
        if latest is None:
            raise ResultsError("results/: no results folder found; run `kdbench tune` first or name a folder")
        folders = [latest]
    if save and len(folders) != 1:
        raise ResultsError(f"--save: writes into one results folder; got {len(folders)}")
    compare_folders(folders, tuple(c.strip() for c in by.split(",") if c.strip()), plot, fmt, val, save=save, interval=interval)


for command in (evaluate, rerun):
    app.command()(command)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
