"""Trained students are kept (`train --out` student.pt, a search's students/), and `kdbench evaluate` measures
student files trained anywhere, reproducing what a run recorded."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error
from kdbench.cli import app
from kdbench.models import build_model
from kdbench.results import read_folder, read_table

runner = CliRunner()
MEASURED = ("val_top1", "test_top1", "val_geom_corr", "test_geom_corr", "test_geom_err", "test_cka", "test_knn_top1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_teacher):
    """Two 2-epoch KD students through `train --out` (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("trained")
    for seed in (0, 1):
        r = runner.invoke(app, ["train", "--method", "kd", "--epochs", "2", "--seed", str(seed), "--out", str(root / f"s{seed}")])
        assert r.exit_code == 0, r.output
    return root


def test_train_out_keeps_the_student_in_a_file_their_loaders_read(trained):
    blob = torch.load(trained / "s0" / "student.pt", weights_only=True)
    result = json.loads((trained / "s0" / "result.json").read_text())
    assert (blob["arch"], blob["num_classes"], blob["epoch"], blob["config_id"]) == ("cnn_student", 10, 2, result["config_id"])
    assert all(blob["metrics"][k] == pytest.approx(result["metrics"][k], abs=0) for k in MEASURED)
    model = build_model("cnn_student", 10, 1)
    model.load_state_dict(blob["model"], strict=True)  # what RepDistiller's and mdistiller's loaders do with 'model'


def test_evaluate_reproduces_the_recorded_metrics_and_compare_ranks_the_files(trained, tmp_path):
    out = tmp_path / "ev"
    files = [str(trained / f"s{s}" / "student.pt") for s in (0, 1)]
    r = runner.invoke(app, ["evaluate", *files, "--student", "cnn_student", "--label", "kd2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = read_table(out / "trials.csv").sort_values("seed")
    assert rows["stage"].eq("evaluate").all() and rows["config_id"].nunique() == 1 and rows["seed"].tolist() == [0, 1]
    for s, row in zip((0, 1), rows.to_dict("records")):
        recorded = json.loads((trained / f"s{s}" / "result.json").read_text())["metrics"]
        assert {k: row[k] for k in MEASURED} == pytest.approx({k: recorded[k] for k in MEASURED}, abs=1e-9)
    again = runner.invoke(app, ["evaluate", *files, "--student", "cnn_student", "--label", "kd2", "--out", str(out)])
    assert again.exit_code == 0 and "0 students measured (2 already there)" in again.output
    doc = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    (lb,) = [x for x in doc["leaderboard"] if x["method"] == "kd2"]
    assert lb["n_seeds"] == 2 and lb["test_top1_mean"] == pytest.approx(rows["test_top1"].mean())


def test_evaluate_bad_input_is_one_line_and_writes_nothing(trained, tmp_path):
    f = str(trained / "s0" / "student.pt")
    out = tmp_path / "ev"
    one_line_error(runner.invoke(app, ["evaluate", f, "--student", "cnn_teacher", "--out", str(out)]),
                   "--student", "cnn_teacher needs", "its keys and shapes fit cnn_student")
    one_line_error(runner.invoke(app, ["evaluate", "--student", "cnn_student", "--out", str(out)]), "no student files")
    one_line_error(runner.invoke(app, ["evaluate", f, "--out", str(out)]), "--student: missing")
    one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "nope.pt"), "--student", "cnn_student", "--out",
                                       str(out)]), "no such file")
    one_line_error(runner.invoke(app, ["evaluate", f, "--student", "cnn_student", "--out", str(trained / "s0")]),
                   "folder exists and is not empty")
    assert not out.exists()


def test_a_search_keeps_every_full_fidelity_student_and_none_of_the_stopped(searched):
    trials = read_folder(searched).trials
    kept = {p.stem: p for p in (searched / "students").glob("*.pt")}
    assert set(kept) == set(trials.loc[trials["fidelity"] == "full", "trial_id"])
    for row in trials[trials["fidelity"] == "full"].to_dict("records"):
        blob = torch.load(kept[row["trial_id"]], weights_only=True)
        assert blob["config_id"] == row["config_id"] and blob["epoch"] == row["epochs"]
        assert blob["metrics"]["val_top1"] == row["val_top1"] and blob["metrics"]["test_top1"] == row["test_top1"]
        build_model("cnn_student", 10, 1).load_state_dict(blob["model"], strict=True)
    assert not (searched / "ray").exists()  # the final checkpoints that carried them are gone


def test_keep_students_front_removes_the_students_off_the_front(searched, tmp_path):
    import dataclasses
    import shutil

    from kdbench import stats
    from kdbench.search.run import _prune_students
    from kdbench.study import study_from_dict

    out = tmp_path / "out"
    shutil.copytree(searched, out)
    study = dataclasses.replace(study_from_dict(json.loads((out / "study.json").read_text())["study"]),
                                keep_students="front")
    _prune_students(out, study)
    trials = read_folder(out).trials.assign(study="c")
    table = stats.summarise(trials, ["val_top1", "val_geom_corr"])
    table = table[table["n"] > 0].reset_index(drop=True)
    front = set(table.loc[stats.front_on_means(table, ("top1", "geom_corr"))[0], "config_id"])
    assert {p.stem for p in (out / "students").glob("*.pt")} == set(trials.loc[trials["config_id"].isin(front), "trial_id"])
