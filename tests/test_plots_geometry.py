"""The geometry and the curves a folder's pictures show, against numbers worked out by hand: the seed-mean
matrices, the most-moved class pairs, the clustering order, the curve data of epochs.csv."""

import numpy as np
import pandas as pd
import pytest

from kdbench import matrices
from kdbench.plots import curve_data, moved, plot_curves, plot_geometry, save_plots, shown_configurations
from kdbench.report import trials_frame
from kdbench.results import read_folder, write_csv, write_json

CLASSES = ["cat", "dog", "owl", "eel"]
TEACHER = np.array([[1.0, 0.8, 0.1, 0.0], [0.8, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.7], [0.0, 0.1, 0.7, 1.0]],
                   dtype=np.float32)


def _folder(root, with_matrices=True):
    """Two configurations x two seeds (baseline b, geometry g) written as kdbench writes a grid's folder."""
    root.mkdir()
    write_json(root / "study.json", {"name": "hand", "kind": "grid", "study": {}})
    rows = [{"trial_id": f"{c}{s}", "config_id": c * 4, "stage": "grid", "status": "completed", "fidelity": "full",
             "method": {"b": "baseline", "g": "geometry"}[c], "seed": s, "epochs": 2,
             "test_top1": {"b": 90.0, "g": 95.0}[c] + s, "test_geom_corr": {"b": 0.5, "g": 0.9}[c]}
            for c in "bg" for s in (0, 1)]
    write_csv(root / "trials.csv", rows)
    epochs = [{"trial_id": f"{c}{s}", "epoch": e, "train_loss": 10.0 / e + s + (c == "g"),
               "loss_ce": 1.0 / e, "val_top1": (50.0 + 10 * e + s) if e == 2 else None}
              for c in "bg" for s in (0, 1) for e in (1, 2)]
    write_csv(root / "epochs.csv", epochs)
    if with_matrices:
        matrices.write_teacher(root / "matrices" / "teacher.npz", {"teacher_test": TEACHER}, CLASSES)
        for s, v in ((0, 0.2), (1, 0.4)):  # cat-dog: 0.8 -> 0.2 in g0, 0.4 in g1
            m = TEACHER.copy()
            m[0, 1] = m[1, 0] = v
            matrices.write_run(root, f"g{s}", {"test": m})
            matrices.write_run(root, f"b{s}", {"test": TEACHER + 0.01 * s})
    return read_folder(root)


def test_shown_configurations_put_the_baseline_first_then_the_front(tmp_path):
    f = _folder(tmp_path / "f")
    shown = shown_configurations(trials_frame([f]), front_ids=["gggg"])
    assert [(c, sorted(t)) for c, _, t in shown] == [("bbbb", ["b0", "b1"]), ("gggg", ["g0", "g1"])]
    assert shown[1][1].startswith("geometry · gggg") and shown[1][1].endswith("2 seeds")


def test_seed_mean_matrix_and_the_most_moved_pair_by_hand(tmp_path):
    f = _folder(tmp_path / "f")
    m = matrices.read_matrices(f.path)
    mean, std, n = m.mean(["g0", "g1"], "test")
    assert n == 2 and mean[0, 1] == pytest.approx(0.3) and std[0, 1] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    shown = shown_configurations(trials_frame([f]), ["gggg"])
    got = {x["config"].split(" ·")[0]: x["pairs"] for x in moved(f, shown, k=2)}
    first = got["geometry"][0]
    assert (first["a"], first["b"], first["teacher"], first["student"]) == ("cat", "dog", pytest.approx(0.8),
                                                                            pytest.approx(0.3))
    assert got["baseline"][0]["student"] - got["baseline"][0]["teacher"] == pytest.approx(0.005, abs=1e-6)


def test_the_clustering_order_keeps_each_block_of_related_classes_together():
    order = list(matrices.cluster_order(TEACHER))
    assert sorted(order) == [0, 1, 2, 3] and abs(order.index(0) - order.index(1)) == 1 \
        and abs(order.index(2) - order.index(3)) == 1


def test_curve_data_is_the_seed_mean_and_range_of_epochs_csv_on_the_evaluated_epochs_only(tmp_path):
    f = _folder(tmp_path / "f")
    shown = shown_configurations(trials_frame([f]), ["gggg"])
    data = curve_data(f, shown)
    assert list(data) == ["train_loss", "loss_ce", "val_top1"]
    ep = pd.read_csv(tmp_path / "f" / "epochs.csv")
    for label, x, mean, lo, hi in data["train_loss"]:
        c = "g" if label.startswith("geometry") else "b"
        mine = ep[ep["trial_id"].str.startswith(c)]
        assert list(x) == [1, 2] and list(mean) == pytest.approx(mine.groupby("epoch")["train_loss"].mean().tolist())
        assert list(hi - lo) == pytest.approx([1.0, 1.0])  # the seeds differ by 1 at every epoch
    (label, x, mean, lo, hi), _ = data["val_top1"]
    assert list(x) == [2] and list(mean) == [70.5]  # epoch 1 was not evaluated: not drawn
    assert plot_curves(f, shown, tmp_path / "c.png") and plot_geometry(f, shown, tmp_path / "g.png")


def test_a_folder_written_before_the_matrices_still_reads_and_draws_its_curves(tmp_path):
    f = _folder(tmp_path / "old", with_matrices=False)
    assert not matrices.read_matrices(f.path) and moved(f, shown_configurations(trials_frame([f]))) == []
    assert save_plots(f.path) == ["curves.png"]
