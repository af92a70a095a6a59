"""Experiment trackers (issue 33): the README's search logs to TensorBoard; TensorBoard's own event reader reads
every trial's curves back equal to epochs.csv, and its hparams view holds trials.csv's values and final metrics."""

import math

import pytest

from conftest import one_line_error
from kdbench.results import read_folder


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
        hp = EventAccumulator(str(searched / "tensorboard" / trial["trial_id"] / "hparams"))
        hp.Reload()
        content = hp.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        values = {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}
        assert values["geometry"] == pytest.approx(trial["geometry"]) and values["method"] == trial["method"]
        assert values["seed"] == trial["seed"] and values["status"] == trial["status"]
        for metric in ("val_top1", "val_geom_corr", *(["test_top1"] if trial["status"] == "completed" else [])):
            (e,) = hp.Scalars(f"final/{metric}")
            assert e.value == pytest.approx(trial[metric], rel=1e-6), metric


def test_an_unknown_tracker_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from kdbench.cli import app

    one_line_error(CliRunner().invoke(app, ["tune", "quick", "--log", "tensorboard,mlflw", "--out", str(tmp_path / "o")]),
                   "--log = 'mlflw'; allowed: tensorboard (comma-separated)")
    assert not (tmp_path / "o").exists()
