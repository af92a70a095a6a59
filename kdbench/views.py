"""What tune, confirm and compare print: a study's run with its live view (or plain lines in a log), and the
comparison of results folders. The commands in cli.py parse and validate; these render."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.live import Live

from .console import LiveView, epoch_progress, err, finished_lines, out, preload_report

__all__ = ["tune_one", "show_progress", "live_view", "compare_folders", "publish_report"]


def tune_one(s, again: str, folder: Path, resume: bool, address, data_root, download, gpus_per_trial, storage,
             verbose, command_started: float):
    """One study's tune: header, teacher, live view, the run, its summary and comparison (``again``: the command
    that continues it)."""
    from .search import run_study

    view = LiveView(s.name)
    teacher_progress, preloading = {}, []

    def header():  # once the data set is in place: a bad data set or teacher file stays one line
        if "header" not in teacher_progress:
            teacher_progress["header"] = True
            err.print(f"study {s.name} ({s.path or 'from the command line'}): {s.trial_count()} trials, "
                      f"{'grid' if s.is_grid else s.search.sampler + ' sampler'}, concurrency {s.concurrency}"
                      f"{', ASHA' if s.asha.enabled else ''} → {folder}", highlight=False)

    def on_teacher(row):
        header()
        if "bar" not in teacher_progress:
            teacher_progress["bar"], teacher_progress["report"] = epoch_progress(s.teacher_recipe.epochs, f"teacher {s.teacher}")
            teacher_progress["bar"].start()
        teacher_progress["report"](row)

    def on_teacher_ready(meta, hit):
        header()
        if "bar" in teacher_progress:
            teacher_progress["bar"].stop()
        made = f"read from {meta['checkpoint']}, evaluated and cached" if meta.get("checkpoint") else "trained and cached"
        err.print(f"teacher {meta['arch']}: {'from cache' if hit else made}, test top-1 "
                  f"{meta['test_top1']:.2f}%", highlight=False)

    live, printed = live_view(view), [0]

    def on_update(state):
        view.state = state
        show_progress(live, state, printed)
        if not preloading and state.running < s.concurrency and sum(state.counts.values()) + state.running >= state.total:
            preloading.append(preload_report())  # the last trials run, a core idles: load the summary's libraries

    def teacher_ready(meta, hit):  # the live view starts once data and teacher are in place
        on_teacher_ready(meta, hit)
        if err.is_terminal:
            live.start()

    try:
        summary = run_study(s, folder, resume=resume, address=address,
                            data_root=str(data_root) if data_root else None, download=download,
                            gpus_per_trial=gpus_per_trial, storage=storage, verbose=verbose, on_update=on_update,
                            on_teacher=on_teacher, on_teacher_ready=teacher_ready)
    finally:
        live.stop()
    err.print(f"\n{summary['trials']} trials in {summary['seconds']:.0f} s → {summary['out']}")
    if "confirm" in summary:
        c = summary["confirm"]
        rounds = f", then racing: {c['rounds']} rounds in all" if s.confirm.until_settled else ""
        err.print(f"confirmation: {c['added']} runs added ({c['planned']} planned: {len(c['candidates'])} configurations "
                  f"× {s.confirm.seeds} fresh seeds{rounds}) in {c['seconds']:.0f} s", highlight=False, soft_wrap=True)
    complete = summary["trials"] == s.trial_count()
    if not complete:
        err.print(f"[yellow]interrupted after {summary['trials']} of {s.trial_count()} trials[/yellow]; continue with: "
                  f"{again}", highlight=False)
    t0 = time.time()
    compare_folders([Path(summary["out"])], ("config",), None, "table", False, top=10, save=complete)
    if not complete:
        raise typer.Exit(130)
    publish_report(Path(summary["out"]))
    from .results import read_study, write_json

    # Where the wall time went (the speed benchmark reads it): the run's phases, the report, and when
    # the command itself began (after Python's start and the imports) and ended.
    meta = read_study(Path(summary["out"]))
    write_json(Path(summary["out"]) / "study.json", meta | {"timings": summary.get("timings", {}) | {
        "report": time.time() - t0, "command_started": command_started, "command_ended": time.time()}})


def publish_report(folder: Path) -> None:
    """A search or confirmation has ended and written its report: the trackers the folder logs to get it."""
    from .results import read_study
    from .trackers import publish

    meta = read_study(folder)
    publish(meta["study"].get("trackers", ()), folder.resolve(), meta["name"], lambda line: err.print(line, highlight=False))


def live_view(view) -> Live:
    """The live view on stderr: redrawn 4 times a second at most, by rich's own thread."""
    return Live(view, console=err, refresh_per_second=4, transient=False)


def show_progress(live, state, printed: list) -> None:
    """A terminal: nothing (the live view redraws itself). A log: one plain line per trial that finished since the
    last call, nothing redrawn."""
    if err.is_terminal:
        return
    for line in finished_lines(state, printed[0]):
        err.print(line, highlight=False, soft_wrap=True)
    printed[0] = len(state.finished)


def compare_folders(folders, by, plot, fmt, val, top: int | None = None, save: bool = False, interval: str = "t"):
    from . import plots, report
    from .results import ResultsError

    problems = []
    loaded = report.load_folders(folders, skip=problems.append,
                                 warn=lambda msg: err.print(f"[yellow]warning:[/yellow] {msg}", highlight=False))
    if not loaded and len(problems) == 1:  # one folder, one line
        raise ResultsError(problems[0])
    for msg in problems:
        err.print(f"[yellow]skipped:[/yellow] {msg}", highlight=False, soft_wrap=True)
    if not loaded:
        raise ResultsError(f"{', '.join(map(str, folders))}: nothing readable")
    df = report.trials_frame(loaded)
    split = "val" if val else "test"
    if df.empty:
        err.print(f"{', '.join(f.name for f in loaded)}: no finished trials yet")
        return
    lb = report.leaderboard(df, loaded, by, split, interval)
    fr = report.front(df, report.objectives_of(loaded), split, searched=report.searched_of(loaded), interval=interval)
    # fANOVA costs seconds: only where it is shown (json, the table) or saved
    imp, note = report.importances(loaded[0]) if len(loaded) == 1 and (fmt in ("json", "table") or save) else (None, "")
    front_ids = list(fr.rows["config_id"]) if len(fr.rows) else []
    geo = plots.geometry_summary(loaded, df, front_ids) if fmt in ("json", "table") else {}
    if fmt == "json":
        sys.stdout.write(report.to_json(lb, fr, imp, geo) + "\n")
    elif fmt == "csv":
        sys.stdout.write(lb.to_csv(index=False))
    elif fmt == "md":
        sys.stdout.write(report.to_markdown(lb, by, split, interval))
    elif fmt == "table":
        shown = lb if top is None else lb.head(top)
        more = f" (top {top} of {len(lb)}; all: kdbench compare DIR)" if top is not None and len(lb) > top else ""
        out.print(report.leaderboard_table(shown, by, split, f"Leaderboard — {', '.join(f.name for f in loaded)}{more}",
                                           interval))
        out.print(report.front_table(fr, f"Pareto front on configuration means: {len(fr.rows)} of {len(fr.points)} "
                                         f"configurations ({'validation' if fr.on == 'val' else fr.on} {' vs '.join(fr.objectives)})"))
        for line in report.unsettled_lines(fr):
            out.print(line, highlight=False, soft_wrap=True)
        for name, items in geo["moved_pairs"].items():
            out.print(_moved_table(name, items))
        for name, rows in geo["payoff"].items():
            out.print(_payoff_table(name, rows))
        counts = df["status"].value_counts().to_dict()
        out.print("trials: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)
        if note and "no optuna.db" not in note:
            out.print(note, highlight=False, soft_wrap=True)
    if plot is not None:
        from .plots import plot_front

        plot_front(df, fr, loaded, plot)
        err.print(f"wrote {plot}")
    if save:
        written = report.save_summary(loaded[0], lb, fr, df, by, imp)
        written += plots.save_plots(loaded[0].path, front_ids)
        err.print(f"wrote {', '.join(written)} in {loaded[0].path}")


def _moved_table(name: str, items: list[dict]):
    from rich.table import Table

    split = items[0]["split"] if items else "test"
    t = Table(title=f"Class pairs moved most from the teacher's geometry — {name}",
              caption=f"centroid-similarity on {split}: the teacher's value → the student's mean ± std over its seeds")
    t.add_column("configuration")
    for i in range(max(len(x["pairs"]) for x in items)):
        t.add_column(f"#{i + 1}")
    for x in items:
        sd = (lambda p: f" ± {p['std']:.2f}") if x["runs"] > 1 else (lambda p: "")
        t.add_row(x["config"], *(f"{p['a']} – {p['b']}: {p['teacher']:.2f} → {p['student']:.2f}{sd(p)}" for p in x["pairs"]))
    return t


def _payoff_table(name: str, rows: list[dict]):
    from rich.table import Table

    t = Table(title=f"Does keeping the geometry pay off? Spearman ρ of geom_corr with each measure — {name}",
              caption=f"across runs ({rows[0]['split']} split); [95 % bootstrap interval over runs]; in top-1 bands: "
                      f"the run-weighted ρ inside {rows[0]['band_width']:g}-point bands of top-1 (bands of 4+ runs), "
                      f"where accuracy cannot explain it")
    for h in ("measure", "runs", "ρ overall", "ρ in top-1 bands", "runs in bands"):
        t.add_column(h, justify="left" if h == "measure" else "right")
    fmt = lambda v, ci: "—" if v != v else f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
    for r in rows:
        t.add_row(r["measure"], str(r["runs"]), fmt(r["rho"], r["rho_ci"]), fmt(r["rho_in_band"], r["rho_in_band_ci"]),
                  str(r["band_runs"]))
    return t
