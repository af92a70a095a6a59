"""Experiment trackers (issue 33): the README's search logs to TensorBoard; TensorBoard's own event reader reads
every trial's curves back equal to epochs.csv, and its hparams view holds trials.csv's values and final metrics.
`kdbench train --log` logs its one run to each tracker, read back with its own client (W&B's offline log with a
reader of its format); a tracker that fails is one warning; a missing client or W&B login is one line, exit 2.
(TensorBoard, MLflow and W&B through a kill -9 and --resume on the two-node cluster: tests/test_cluster.py.)"""

import json
import math

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, wandb_runs
from kdbench.cli import app
from kdbench.results import read_folder, read_table


def test_tensorboard_reads_back_every_trials_epochs_and_values(searched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    f = read_folder(searched)
    assert f.study["study"]["trackers"] == ["tensorboard"]
    assert sorted(p.name for p in (searched / "tensorboard").iterdir()) == sorted(f.trials["trial_id"])
    for _, trial in f.trials.iterrows():
        events = EventAccumulator(str(searched / "tensorboard" / trial["trial_id"]))
        events.Reload()
        rows = f.epochs[f.epochs["trial_id"] == trial["trial_id"]].sort_values("epoch")
        for column in ("train_loss", "loss_geometry", "val_top1", "val_geom_corr", "lr"):
            got = [(e.step, e.value) for e in events.Scalars(column)]
            want = [(int(r["epoch"]), float(r[column])) for _, r in rows.iterrows() if not math.isnan(r[column])]
            assert [s for s, _ in got] == [s for s, _ in want], column
            assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), column  # float32 in the file
        # The hparams view: the trial's values (as trials.csv has them) and its final metrics.
        hp = events  # the hparams session is the trial's own run
        content = hp.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        values = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}
        assert values["geometry"] == pytest.approx(trial["geometry"]) and values["method"] == trial["method"]
        assert values["seed"] == trial["seed"] and values["status"] == trial["status"]
        for metric in ("val_top1", "val_geom_corr", *(["test_top1"] if trial["status"] == "completed" else [])):
            (e,) = hp.Scalars(f"final/{metric}")
            assert e.value == pytest.approx(trial[metric], rel=1e-6), metric


def test_an_unknown_tracker_a_missing_client_or_no_wandb_login_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    one_line_error(CliRunner().invoke(app, ["tune", "quick", "--log", "tensorboard,mlflw", "--out", str(tmp_path / "o")]),
                   "--log = 'mlflw'; allowed: tensorboard, mlflow, wandb (comma-separated)")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    one_line_error(CliRunner().invoke(app, ["tune", "quick", "--log", "wandb", "--out", str(tmp_path / "o")]),
                   "wandb has no credentials for api.wandb.ai", "WANDB_MODE=offline")
    one_line_error(CliRunner().invoke(app, ["train", "--log", "wandb", "--out", str(tmp_path / "o")]), "wandb login")
    one_line_error(CliRunner().invoke(app, ["train", "--log", "tensorboard"]), "--log tensorboard: needs --out DIR")
    find = importlib.util.find_spec  # as on a machine without the extra: its module is not found
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find(name, *a))
    one_line_error(CliRunner().invoke(app, ["tune", "quick", "--log", "mlflow", "--out", str(tmp_path / "o")]),
                   "mlflow needs its client, which is not installed; allowed: pip install 'kdbench[mlflow]'")
    assert not (tmp_path / "o").exists()


def test_train_logs_its_run_to_tensorboard_mlflow_and_wandb(tmp_path, monkeypatch, digits_teacher):
    """One `kdbench train --log`: each tracker's own reader gives back epochs.csv's curves, the run's values and its
    final metrics (result.json's)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdbench.methods import METHODS
    from kdbench.settings import dataset_defaults, trial_values
    from kdbench.study import apply_overrides

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--epochs", "2", "--seed", "3", "--log", "tensorboard,mlflow,wandb", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    epochs, final = read_table(out / "epochs.csv"), json.loads((out / "result.json").read_text())["metrics"]
    method, recipe = apply_overrides(METHODS["geometry"], dataset_defaults("digits")["recipe"], {"epochs": 2}, "--set")
    values = trial_values(method, recipe)
    # (a number a row lacks, val_* at an epoch without evaluation, is not logged)
    want = {k: [[int(e), v] for e, v in zip(epochs["epoch"], epochs[k]) if v == v] for k in ("train_loss", "val_top1", "test_cka")}
    assert [len(v) for v in want.values()] == [2, 1, 1]

    ea = EventAccumulator(str(out / "tensorboard" / "cnn_student-geometry-seed3"))
    ea.Reload()
    for k, v in want.items():
        _same(ea.Scalars(k), v, lambda e: (e.step, e.value), 1e-6)  # float32 in the file

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kdbench-train-digits").experiment_id])
    assert run.info.run_name == "cnn_student-geometry-seed3" and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in values.items()} and run.data.tags["seed"] == "3"
    for k, v in want.items():
        _same(sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step), v, lambda m: (m.step, m.value))
    assert run.data.metrics["final/test_top1"] == pytest.approx(final["test_top1"])

    ((wb,),) = wandb_runs(out).values()
    assert wb["name"] == "cnn_student-geometry-seed3" and wb["config"]["geometry"] == values["geometry"]
    for k, v in want.items():
        _same([h for h in wb["history"] if k in h], v, lambda h: (h["epoch"], h[k]))
    assert wb["summary"]["final/test_top1"] == pytest.approx(final["test_top1"]) and wb["summary"]["status"] == "completed"


def _same(logged, want: list, point, rel: float = 1e-12):
    """``logged`` (as ``point`` reads each) holds ``want``'s [epoch, value] pairs, in order, each once."""
    got = [point(x) for x in logged]
    assert [int(e) for e, _ in got] == [e for e, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=rel)


def test_a_tracker_that_fails_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, digits_teacher):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    r = CliRunner().invoke(app, ["train", "--epochs", "1", "--log", "mlflow", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow logging stopped (MlflowException: "), r.output
    assert (tmp_path / "run" / "result.json").exists() and "Traceback" not in r.output


def test_the_docs_logging_table_is_a_studys(tmp_path):
    """docs/trackers.md's `[logging]` block, added to a bundled study, is read as its trackers."""
    import re
    from pathlib import Path

    from kdbench.study import find_study, load_study

    page = (Path(__file__).resolve().parents[1] / "docs" / "trackers.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", page, re.S)
    study = tmp_path / "s.toml"
    study.write_text(Path(find_study("quick")).read_text() + "\n" + block)
    assert load_study(study).trackers == ("tensorboard", "mlflow")


def test_a_resume_discards_the_runs_of_trials_killed_before_their_first_checkpoint(tmp_path, monkeypatch):
    """Three trials logged to each tracker, then killed: a finished, b interrupted before any checkpoint (it reruns
    from scratch as a new trial), c interrupted after one (continued by d, with c's lineage). The resume discards b's
    runs everywhere and keeps a's and c's; each tracker read back with its own reader."""
    from mlflow.tracking import MlflowClient

    from kdbench.trackers import Run, discard, open_trackers

    monkeypatch.setenv("WANDB_MODE", "offline")
    out, names = tmp_path / "out", ("tensorboard", "mlflow", "wandb")
    trackers = open_trackers(names, out, "s", pytest.fail)
    runs = {t: Run(t, {"geometry": 1.0}, {"config_id": f"cfg-{t}", "seed": 0}) for t in "abc"}
    for run in runs.values():
        for tr in trackers:
            tr.epoch(run, {"epoch": 1, "train_loss": 0.5})
    for tr in trackers:
        tr.end(runs["a"], {"test_top1": 50.0}, "completed")
        tr.close()  # b and c stay open: the kill
    wandb_ids = {v[-1]["name"]: k for k, v in wandb_runs(out).items()}
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["a", "b", "c"] and sorted(wandb_ids) == ["a", "b", "c"]

    resumed = open_trackers(names, out, "s", pytest.fail)
    discard(resumed, {"a", "c"})  # a finished; c's checkpoint continues it (its trial id and lineage)
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["a", "c"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("s").experiment_id
    (parent,) = client.search_runs([exp], "tags.`kdbench.role` = 'folder'")
    kids = lambda: sorted((r.info.run_name, r.info.status)
                          for r in client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    assert kids() == [("a", "FINISHED"), ("c", "RUNNING")]
    assert sorted(v[-1]["name"] for v in wandb_runs(out).values()) == ["a", "c"]
    ledger = json.loads((out / "wandb" / "kdbench-epochs.json").read_text())
    assert wandb_ids["b"] not in ledger and set(ledger["trials"]) == {wandb_ids["a"], wandb_ids["c"]}
    d = Run("d", {"geometry": 1.0}, {"config_id": "cfg-c", "seed": 0}, lineage="c", previous="c")
    for tr in resumed:  # d continues c's runs, then a second resume keeps them (d finished)
        tr.epoch(d, {"epoch": 1, "train_loss": 0.5})
        tr.epoch(d, {"epoch": 2, "train_loss": 0.4})
        tr.end(d, {"test_top1": 51.0}, "completed")
        tr.close()
    discard(open_trackers(names, out, "s", pytest.fail), {"a", "d"})
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["a", "d"]
    assert sorted(v[-1]["name"] for v in wandb_runs(out).values()) == ["a", "d"]
    assert kids() == [("a", "FINISHED"), ("d", "FINISHED")]
