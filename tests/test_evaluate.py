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
MEASURED = ("val_top1", "test_top1", "val_geom_corr", "test_geom_corr", "test_geom_err", "test_cka", "test_knn_top1",
            "test_map_at_r", "test_r_at_1", "test_nmi", "test_ari")


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


def test_train_out_keeps_both_geometries_and_the_final_measures_recompute_from_the_student(trained, digits,
                                                                                         digits_teacher):
    """matrices.npz holds the teacher's and the student's centroid-similarity matrices; recomputed here from the
    teacher and from student.pt's features (a second path: no kdbench.measure), they agree, and so do the
    retrieval and clustering measures of result.json. compare names the pairs that moved most, by hand."""
    import numpy as np

    from kdbench.downstream import clustering, retrieval
    from kdbench.measure import forward_all
    from kdbench.geometry import class_centroids, similarity_matrix

    run = trained / "s0"
    z = np.load(run / "matrices.npz")
    assert set(z.files) == {"val", "test", "teacher_val", "teacher_test", "classes"}
    assert list(z["classes"]) == [str(i) for i in range(10)] and z["test"].shape == (10, 10) and z["test"].dtype == np.float32
    model = build_model("cnn_student", 10, 1)
    model.load_state_dict(torch.load(run / "student.pt", weights_only=True)["model"])
    metrics = json.loads((run / "result.json").read_text())["metrics"]
    for split in ("val", "test"):
        x, y = digits.split(split)
        f_t = forward_all(digits_teacher.model, x, digits)[0]
        f_s = forward_all(model, x, digits)[0]
        assert np.allclose(z[f"teacher_{split}"], similarity_matrix(class_centroids(f_t, y, 10)).numpy(), atol=1e-6)
        assert np.allclose(z[split], similarity_matrix(class_centroids(f_s, y, 10)).numpy(), atol=1e-5)
    ref = forward_all(model, digits.train_x, digits)[0]
    x, y = digits.split("test")
    f_s = forward_all(model, x, digits)[0]
    again = retrieval(f_s, y, ref, digits.train_y) | clustering(f_s, y, 10)
    assert {k: metrics[f"test_{k}"] for k in again} == pytest.approx(again, abs=1e-6)
    assert 0 < metrics["test_map_at_r"] <= metrics["test_r_at_1"] <= 1  # mAP@R never above the first hit's rate
    assert (run / "geometry.png").stat().st_size > 10_000 and (run / "curves.png").stat().st_size > 10_000
    doc = json.loads(runner.invoke(app, ["compare", str(run), "--format", "json"]).stdout)
    (moved,) = next(iter(doc["moved_pairs"].values()))
    i, j = np.triu_indices(10, 1)
    change = np.abs(z["test"] - z["teacher_test"])[i, j]
    first = moved["pairs"][0]
    assert (int(first["a"]), int(first["b"])) == (i[change.argmax()], j[change.argmax()])
    assert first["teacher"] == pytest.approx(float(z["teacher_test"][i[change.argmax()], j[change.argmax()]]))
    assert len(moved["pairs"]) == 3 and moved["runs"] == 1


def test_a_reference_of_k_images_a_class_is_seeded_and_all_of_them_is_the_whole_split(digits, digits_teacher):
    """``[evaluation] reference_per_class``: by hand on six labels; then kNN against a reference as large as the
    biggest class equals kNN against the whole split, and against 2 images a class it is the vote of those."""
    from kdbench.data import reference_rows
    from kdbench.geometry import knn_top1
    from kdbench.measure import forward_all
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.train import TrainConfig, distill

    y = torch.tensor([0, 0, 0, 1, 1, 2])
    rows = reference_rows(y, 2, seed=0)
    assert reference_rows(y, 0) is None and torch.equal(rows, reference_rows(y, 2, seed=0))
    assert torch.bincount(y[rows]).tolist() == [2, 2, 1] and torch.equal(rows, rows.sort().values)
    assert torch.equal(reference_rows(y, 3), torch.arange(6))
    runs = {k: distill(TrainConfig("cnn_student", METHODS["kd"], Recipe(epochs=1), seed=0, reference_per_class=k),
                       digits, digits_teacher) for k in (0, 500, 2)}
    assert runs[500]["test_knn_top1"] == runs[0]["test_knn_top1"] and runs[500]["test_map_at_r"] == runs[0]["test_map_at_r"]
    few = reference_rows(digits.labels("train"), 2)
    f = forward_all(runs[2].model, "train", digits)[0]
    by_hand = knn_top1(f[few], digits.labels("train")[few], forward_all(runs[2].model, "test", digits)[0],
                       digits.labels("test"), digits.num_classes)
    assert len(few) == 20 and runs[2]["test_knn_top1"] == pytest.approx(float(by_hand), abs=1e-9)


def test_a_model_whose_outputs_are_not_finite_is_a_divergence_in_one_line(digits, digits_teacher, tmp_path):
    """A student whose training loss stays finite while its weights blow up (BatchNorm's running variance, say)
    gives inf features at evaluation: a DivergedError naming the split (which a search records as the trial's
    failure), not a crash inside k-means; `kdbench train` says so in one line, exit 1, and writes nothing."""
    from kdbench.measure import DivergedError, evaluate

    class Broken(torch.nn.Module):
        def forward(self, x):
            f = x.flatten(1).float()
            return f.masked_fill(torch.arange(f.shape[0])[:, None] == 3, float("inf")), f[:, :10]

    with pytest.raises(DivergedError, match="on test are not finite"):
        evaluate(Broken(), digits, "test", knn=True)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--epochs", "1", "--lr", "1e12", "--out", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("error: the run diverged:") and not out.exists()
