"""Where a run's curves go besides its folder: the experiment trackers researchers already watch.

``--log tensorboard,mlflow,wandb`` on ``tune``, ``confirm`` and ``train`` (``[logging] trackers`` in a study, recorded
in study.json, so a resume and a confirmation log where the search logged). A trial is one tracker run:

- **TensorBoard**: ``DIR/tensorboard/<trial_id>``: every epoch's row (losses, val and test metrics, lr, throughput)
  as scalars at ``step = epoch``; when the trial ends, its values (method, seed, stage, status and the searched values)
  against its final metrics (``final/<metric>``) in the hparams view, one session per trial.
- **MLflow**: one parent run per results folder (tag ``kdbench.folder``) in the experiment named after the study,
  one nested run per trial: params = the trial's values, tags = trial_id, config_id, seed, stage, method, status;
  metrics per epoch at ``step = epoch``, ``final/<metric>`` when it ends. When the search (or a confirmation, whose
  runs join the same parent) ends, the parent gets the leaderboard, the front, the pictures and the tables as
  artifacts. The store: ``MLFLOW_TRACKING_URI``, else ``sqlite:///DIR/mlflow.db`` with the artifacts in
  ``DIR/mlartifacts``.
- **W&B**: one run per trial in ``WANDB_PROJECT`` (default ``kdbench``), grouped by the study, config = its values
  and tags, metrics per epoch against ``epoch``, the final metrics in its summary; files under ``DIR/wandb``
  (``WANDB_MODE=offline`` keeps them there, for ``wandb sync`` later).

A trial resumed from an earlier run's checkpoint (``tune --resume`` after a kill) continues that trial's tracker
runs rather than starting new ones, each epoch logged once: MLflow's run (found by its ``kdbench.lineage`` tag, the
id of the chain's first trial) gets the epochs it lacks; W&B's run id is derived from the lineage (``resume="allow"``)
and ``DIR/wandb/kdbench-epochs.json`` records the epochs each run has logged (an offline run cannot be asked; W&B
writes its offline file every second, so an epoch logged in the second before a kill -9 may be missing there); the
killed trial's TensorBoard folder is replaced by the resumed trial's, which holds every epoch. A trial killed before
its first checkpoint reruns from scratch as a new trial (epochs.csv never held its rows): at the resume its runs go
(its TensorBoard folder, its MLflow run, its offline W&B run; an online W&B run stays, crashed). A trial's tracker runs
end before its trials.csv row is written: a kill in between reruns the trial, and its runs are ended then.

Written on the driver by the search's results writer from the rows it writes to epochs.csv and trials.csv, so they
always agree and a cluster search logs once. Not Ray's logger callbacks: ``TBXLoggerCallback``,
``MLflowLoggerCallback`` and ``WandbLoggerCallback`` see Tune's results, not kdbench's rows (they log every key Tune
carries at ``step = training_iteration``, which counts mid-epoch checkpoint reports), and they start a new run for a
resumed trial, with no parent run and no hparams summary of kdbench's values; TensorBoard's writes into the trial's
Ray folder, removed when the trials finish. A tracker that fails (a server gone, a full disk) is one warning line;
the search goes on and its folder loses nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .values import StudyError

__all__ = ["TRACKERS", "Run", "check_trackers", "check_clients", "open_trackers", "publish"]

# name -> (the client module it needs, the extra that installs it); TensorBoard's writer comes with ray[tune]
TRACKERS = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# what the parent MLflow run gets when a search or confirmation ends (those the folder has)
ARTIFACTS = ("leaderboard.md", "front.csv", "trials.csv", "epochs.csv", "study.json", "pareto.png", "curves.png",
             "geometry.png", "slices.png", "importances.csv")


def check_trackers(names, where: str) -> tuple[str, ...]:
    """``names`` (a list, or a comma-separated string) as a tuple of known trackers; else one line naming them."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for n in names:
        if n not in TRACKERS:
            raise StudyError(f"{where} = {n!r}; allowed: {', '.join(TRACKERS)} (comma-separated)")
    return tuple(dict.fromkeys(n for n in names if n))


def check_clients(names, where: str) -> None:
    """Each tracker's client is installed (one line naming the extra otherwise) and W&B has credentials unless it
    logs offline: checked before any data or teacher is loaded, and so W&B never prompts in the middle of a search."""
    for n in names:
        module, extra = TRACKERS[n]
        if importlib.util.find_spec(module) is None:
            raise StudyError(f"{where}: {n} needs its client, which is not installed; allowed: pip install 'kdbench[{extra}]'")
    if "wandb" in names and os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled"):
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        try:
            logged_in = netrc.netrc().authenticators(host) is not None
        except (OSError, netrc.NetrcParseError):
            logged_in = False
        if not (logged_in or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")):
            raise StudyError(f"{where}: wandb has no credentials for {host}; allowed: `wandb login`, WANDB_API_KEY, or "
                             f"WANDB_MODE=offline (runs kept under the results folder for `wandb sync`)")


@dataclass(frozen=True)
class Run:
    """One tracker run: a trial of a search, or a ``kdbench train`` run."""

    id: str  # the trial id (trials.csv's), or the train run's name
    values: dict  # what defines it: trials.csv's value columns
    tags: dict  # config_id, seed, stage, method (what a tracker filters by)
    lineage: str = ""  # the id of the first trial of a chain of resumes (its tracker runs continue); id when empty
    previous: str = ""  # the trial a resumed one continues ('' for a new one)
    shown: tuple = ()  # the values that tell its study's trials apart (the searched ones; every value when empty)

    @property
    def key(self) -> str:
        return self.lineage or self.id


def open_trackers(names, out: Path, name: str, warn, parent: bool = True) -> list:
    """The trackers ``names`` asks for, for results folder ``out`` of study ``name``; ``warn(line)`` says when one
    fails. ``parent``: MLflow nests the runs under the folder's parent run (a search); else they stand alone."""
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    return [kinds[n](Path(out), name, warn, parent) for n in names]


def publish(names, out: Path, name: str, warn) -> None:
    """A search or confirmation has ended and its report is written: MLflow's parent run gets it as artifacts."""
    for t in open_trackers([n for n in names if n == "mlflow"], out, name, warn):
        t.publish()


def discard(trackers, keep: set) -> None:
    """A resumed folder: every tracker run that is not a finished trial's nor a continued one's (``keep``: their trial
    ids and lineages) was a trial's killed before its first checkpoint, rerun from scratch: it goes."""
    for t in trackers:
        t._guard(t._discard, keep)


def numbers(row: dict) -> dict:
    """The finite numbers of a row (what the trackers plot)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


@dataclass
class _Tracker:
    """What every tracker shares: one warning and no more logging when it fails; the runs it has open."""

    out: Path
    study: str
    warn: object
    parent: bool = True
    failed: bool = False
    runs: dict = field(default_factory=dict)  # Run.id -> the tracker's handle

    label = ""

    def _guard(self, fn, *args):
        if self.failed:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- a tracker never stops a search: its server gone, its disk full, its bug
            self.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:160]
            self.warn(f"warning: {self.label} logging stopped ({type(e).__name__}: {first}); the run goes on")
            return None

    def epoch(self, run: Run, row: dict) -> None:
        """One epochs.csv row of ``run`` (a resumed trial's earlier epochs come first, again)."""
        self._guard(self._epoch, run, row)

    def end(self, run: Run, metrics: dict, status: str) -> None:
        """``run`` has ended (``status``: completed, stopped, failed) with its final ``metrics``."""
        self._guard(self._end, run, metrics, status)

    def close(self) -> None:
        """The run or search is over: what is still open is released (each tracker's ``_close``)."""
        self._guard(self._close)


class TensorBoard(_Tracker):
    """One event-file folder per trial under ``out/tensorboard`` (see the module's docstring)."""

    label = "TensorBoard"

    def _writer(self, run: Run):
        if run.id not in self.runs:
            from tensorboardX import SummaryWriter

            if run.previous:  # the resumed trial writes every epoch again: the killed one's folder goes
                shutil.rmtree(self.out / "tensorboard" / run.previous, ignore_errors=True)
            self.runs[run.id] = SummaryWriter(logdir=str(self.out / "tensorboard" / run.id), flush_secs=5)
        return self.runs[run.id]

    def _epoch(self, run: Run, row: dict) -> None:
        w = self._writer(run)
        for k, v in numbers(row).items():
            if k != "epoch":
                w.add_scalar(k, v, int(row["epoch"]))

    def _end(self, run: Run, metrics: dict, status: str) -> None:
        from tensorboardX.summary import hparams

        values = {k: run.values[k] for k in run.shown or run.values if k in run.values}  # a readable hparams table
        hp = {k: v for k, v in {**values, **run.tags, "status": status}.items()
              if isinstance(v, (str, int, float, bool)) and v == v and k != "config_id"}
        final = {f"final/{k}": v for k, v in numbers(metrics).items()}
        w = self._writer(run)
        # the hparams session in the trial's own folder (tensorboardX's add_hparams would make it a second run)
        for summary in hparams(hp, final):
            w.file_writer.add_summary(summary)
        for k, v in final.items():
            w.add_scalar(k, v, 0)
        w.close()
        self.runs.pop(run.id, None)

    def _close(self) -> None:
        for w in self.runs.values():
            w.close()
        self.runs.clear()

    def _discard(self, keep: set) -> None:
        root = self.out / "tensorboard"
        for d in root.iterdir() if root.is_dir() else ():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


class MLflow(_Tracker):
    """A parent run per results folder, a nested run per trial (see the module's docstring)."""

    label = "MLflow"
    client = experiment = parent_id = None

    def _open(self):
        if self.client is None:
            import logging

            from mlflow.tracking import MlflowClient

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's "creating tables" lines
            for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                         ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
                os.environ.setdefault(k, v)  # a server gone costs the search seconds, not minutes of retries
            remote = os.environ.get("MLFLOW_TRACKING_URI")
            self.out.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(remote or f"sqlite:///{self.out / 'mlflow.db'}")
            found = client.get_experiment_by_name(self.study)
            self.experiment = found.experiment_id if found else client.create_experiment(
                self.study, artifact_location=None if remote else (self.out / "mlartifacts").as_uri())
            self.client = client
            if self.parent:
                mine = client.search_runs([self.experiment], _filter({"kdbench.folder": str(self.out), "kdbench.role": "folder"}))
                self.parent_id = mine[0].info.run_id if mine else client.create_run(
                    self.experiment, run_name=self.out.name,
                    tags={"kdbench.folder": str(self.out), "kdbench.role": "folder", "study": self.study}).info.run_id
        return self.client

    def _run(self, run: Run) -> list:
        """``[run id, the last epoch it holds]``, continuing the run of ``run``'s lineage or starting one."""
        if run.id in self.runs:
            return self.runs[run.id]
        from mlflow.entities import Param

        client = self._open()
        tags = {"trial_id": run.id, "kdbench.lineage": run.key, **{k: str(v) for k, v in run.tags.items()}}
        earlier = client.search_runs([self.experiment], _filter({"kdbench.lineage": run.key} | (
            {"mlflow.parentRunId": self.parent_id} if self.parent_id else {}))) if run.previous else []
        if earlier:  # the killed trial's: it goes on under this trial's id, from the epochs it lacks
            rid = earlier[0].info.run_id
            client.update_run(rid, status="RUNNING", name=run.id)
            for k, v in tags.items():
                client.set_tag(rid, k, v)
            keys = list(earlier[0].data.metrics)
            held = max((m.step for m in client.get_metric_history(rid, keys[0])), default=0) if keys else 0
        else:
            rid = client.create_run(self.experiment, run_name=run.id, tags=tags | (
                {"mlflow.parentRunId": self.parent_id} if self.parent_id else {})).info.run_id
            client.log_batch(rid, params=[Param(k, str(v)) for k, v in run.values.items()])
            held = 0
        self.runs[run.id] = [rid, held]
        return self.runs[run.id]

    def _epoch(self, run: Run, row: dict) -> None:
        from mlflow.entities import Metric

        handle, epoch = self._run(run), int(row["epoch"])
        if epoch > handle[1]:
            now = int(time.time() * 1000)
            self.client.log_batch(handle[0], metrics=[Metric(k, v, now, epoch) for k, v in numbers(row).items() if k != "epoch"])
            handle[1] = epoch

    def _end(self, run: Run, metrics: dict, status: str) -> None:
        from mlflow.entities import Metric

        rid, held = self._run(run)
        now = int(time.time() * 1000)
        self.client.log_batch(rid, metrics=[Metric(f"final/{k}", v, now, held) for k, v in numbers(metrics).items()])
        self.client.set_tag(rid, "status", status)
        self.client.set_terminated(rid, "FAILED" if status == "failed" else "FINISHED")
        self.runs.pop(run.id, None)

    def _close(self) -> None:  # an open run's trial was interrupted: it stays RUNNING, and a resume continues it
        self.runs.clear()

    def _discard(self, keep: set) -> None:
        if not self.parent or not (os.environ.get("MLFLOW_TRACKING_URI") or (self.out / "mlflow.db").is_file()):
            return  # nothing logged here yet
        client = self._open()
        for r in client.search_runs([self.experiment], _filter({"mlflow.parentRunId": self.parent_id}) +
                                    " and attributes.status = 'RUNNING'"):
            if not {r.data.tags.get("trial_id"), r.data.tags.get("kdbench.lineage")} & keep:
                client.delete_run(r.info.run_id)

    def publish(self) -> None:
        def go():
            client = self._open()
            for name in ARTIFACTS:
                if (self.out / name).is_file():
                    client.log_artifact(self.parent_id, str(self.out / name))
            client.set_terminated(self.parent_id, "FINISHED")
        self._guard(go)


def _filter(tags: dict) -> str:
    """An MLflow search filter: every tag equal to its value."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


class WandB(_Tracker):
    """One W&B run per trial, grouped by the study (see the module's docstring)."""

    label = "W&B"

    def _run(self, run: Run):
        if run.id not in self.runs:
            import wandb

            self.out.mkdir(parents=True, exist_ok=True)
            r = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdbench"), group=self.study, name=run.id,
                           id=hashlib.sha1(f"{self.out}|{run.key}".encode()).hexdigest()[:16], resume="allow",
                           dir=str(self.out), config={**run.values, **run.tags}, job_type=str(run.tags.get("stage", "train")),
                           reinit="create_new", settings=wandb.Settings(
                               silent=True, console="off", x_disable_stats=True, disable_git=True, save_code=False,
                               x_transaction_log_flush_interval=1.0))  # offline: a kill -9 loses at most 1 s of it
            r.define_metric("*", step_metric="epoch")
            # what a continued run holds: the ledger's count (offline runs cannot be asked), or the server's
            ledger = self._ledger()
            held = ledger.get(r.id, 0) if run.previous else 0
            self.runs[run.id] = [r, max(held, int(r.summary.get("epoch", 0) or 0) if run.previous else 0)]
            trials = ledger.get("trials", {})
            self._write({**ledger, "trials": {**trials, r.id: list(dict.fromkeys([*trials.get(r.id, []), run.id]))}})
        return self.runs[run.id]

    def _ledger(self) -> dict:
        """``DIR/wandb/kdbench-epochs.json``: the epochs each run of the folder has logged (W&B run id -> the last),
        and under ``trials`` the trials that opened each run (W&B run id -> trial ids)."""
        path = self.out / "wandb" / "kdbench-epochs.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write(self, ledger: dict) -> None:
        path = self.out / "wandb" / "kdbench-epochs.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(ledger))
        path.with_suffix(".tmp").replace(path)

    def _epoch(self, run: Run, row: dict) -> None:
        handle, epoch = self._run(run), int(row["epoch"])
        if epoch > handle[1]:
            # The ledger first: a kill between the two then loses the epoch (as W&B's last second may) rather than
            # log it twice (W&B's service, a process of its own, wrote an epoch the ledger had not counted: seen).
            self._write(self._ledger() | {handle[0].id: epoch})
            handle[0].log(numbers(row))
            handle[1] = epoch

    def _discard(self, keep: set) -> None:
        ledger = self._ledger()
        gone = {w for w, ids in ledger.get("trials", {}).items() if not set(ids) & keep}
        if gone:
            for w in gone:  # an online run's local files go too; the server's run stays (crashed)
                for d in (self.out / "wandb").glob(f"*run-*-{w}"):
                    shutil.rmtree(d, ignore_errors=True)
            self._write({k: v for k, v in ledger.items() if k not in gone} |
                        {"trials": {w: ids for w, ids in ledger["trials"].items() if w not in gone}})

    def _end(self, run: Run, metrics: dict, status: str) -> None:
        r = self._run(run)[0]
        r.summary.update({**{f"final/{k}": v for k, v in numbers(metrics).items()}, "status": status})
        r.finish(exit_code=1 if status == "failed" else 0)
        self.runs.pop(run.id, None)

    def _close(self) -> None:
        for r, _ in self.runs.values():
            r.finish()
        self.runs.clear()
