"""RepDistiller's benchmark as studies: one study per teacher-student pair from a shared base, their recipe
(step decay at milestones, no validation carve-out, lr per student), published numbers beside; the synthetic
sibling runs end to end."""

import json

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from kdbench.cli import app
from kdbench.pairs import load_studies
from kdbench.results import read_folder
from kdbench.study import find_study
from kdbench.settings import Recipe
from kdbench.train import get_lr

runner = CliRunner()


def test_step_decay_at_milestones_by_hand():
    # 10 steps an epoch, lr 0.05, x0.1 after epochs 150, 180, 210 of 240 (RepDistiller: epoch > milestone decays).
    r = Recipe(epochs=240, lr=0.05, schedule="step", milestones=(150, 180, 210))
    lr = lambda epoch: get_lr((epoch - 1) * 10, 2400, r, 10)  # the first step of a 1-indexed epoch
    assert [lr(e) for e in (1, 150)] == [0.05, 0.05]
    assert lr(151) == pytest.approx(0.005) and lr(180) == pytest.approx(0.005)
    assert lr(181) == pytest.approx(0.0005) and lr(211) == pytest.approx(0.00005) and lr(240) == pytest.approx(0.00005)
    # Without milestones, step keeps its 50 % / 75 % rule.
    assert get_lr(5, 10, Recipe(epochs=10, schedule="step"), 1) == pytest.approx(0.005)


def test_the_repdistiller_study_is_thirteen_pairs_with_their_recipe_and_numbers():
    studies = load_studies(find_study("cifar100-repdistiller"))
    pairs = [(s.teacher, s.student) for s in studies]
    assert len(pairs) == 13 and ("resnet32x4", "resnet8x4") in pairs and ("ResNet50", "vgg8") in pairs
    lr = {s.student: s.recipe.lr for s in studies}
    assert lr["MobileNetV2"] == lr["ShuffleV1"] == lr["ShuffleV2"] == 0.01 and lr["resnet8x4"] == 0.05
    s = studies[pairs.index(("resnet32x4", "resnet8x4"))]
    assert (s.recipe.epochs, s.recipe.batch_size, s.recipe.milestones, s.recipe.weight_decay) == (240, 64, (150, 180, 210), 5e-4)
    assert s.data_options["val_fraction"] == 0.0 and s.is_grid and not s.asha.enabled
    ref = dict(s.reference)
    assert (ref["teacher"], ref["baseline"], ref["kd"], ref["crd"], ref["dkd"]) == (79.42, 72.50, 73.33, 75.51, 76.32)
    assert len({st.name for st in studies}) == 13 and s.name == "cifar100-repdistiller-resnet32x4-resnet8x4"
    r = runner.invoke(app, ["tune", "cifar100-repdistiller", "--plan"])
    assert r.exit_code == 0 and "13 studies; at most 177,840 trial-epochs in all" in r.output, r.output
    assert "grid of 57 runs (19 methods × 3 seeds)" in r.output  # 13 x 57 x 240 = 177,840
    ctkd = {st.name.split("-", 2)[2]: dict(st.reference).get("ctkd") for st in studies}  # CTKD's README
    assert (ctkd["resnet56-resnet20"], ctkd["vgg13-vgg8"], ctkd["resnet32x4-resnet8x4"]) == (71.19, 73.52, None)


def test_a_pair_reads_its_teacher_where_the_file_is(tmp_path, monkeypatch):
    (tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla").mkdir(parents=True)
    (tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    studies = {s.teacher: s for s in load_studies(find_study("cifar100-repdistiller"))}
    assert studies["resnet56"].teacher_checkpoint.endswith("resnet56_vanilla/ckpt_epoch_240.pth")
    assert studies["resnet110"].teacher_checkpoint == ""  # missing: trained with [teacher_recipe], and said so
    assert studies["resnet110"].teacher_looked_for == "download_ckpts/cifar_teachers/resnet110_vanilla/ckpt_epoch_240.pth"
    assert studies["resnet56"].teacher_looked_for == ""
    r = runner.invoke(app, ["tune", "cifar100-repdistiller", "--plan"])
    assert "teacher resnet56 (read from " in r.output and "teacher resnet110 (no file at download_ckpts/cifar_teachers/" \
        "resnet110_vanilla/ckpt_epoch_240.pth: trained if not cached: 240 epochs)" in r.output, r.output


BASE = """
name = "p"
dataset = "synthetic"
[grid]
methods = ["baseline"]
[pairs]
"""


@pytest.mark.parametrize("pairs, fragment", [
    ('list = [["resnet56"]]', "pairs.list = [['resnet56']]; allowed: a non-empty list of [teacher, student]"),
    ('list = [["resnet56", "resnet9"]]', "pairs.list: student 'resnet9' is unknown"),
    ('list = [["resnet56", "resnet20"], ["resnet56", "resnet20"]]', "a pair appears twice"),
    ('list = [["resnet56", "resnet20"]]\nlr = { resnet20 = -1 }', "pairs.lr"),
    ('list = [["resnet56", "resnet20"]]\nteacher_checkpoint = "t.pth"', "with {teacher} (the name) or {arch}"),
    ('list = [["resnet56", "resnet20"]]\n[pairs.reference.vgg13-vgg8]\nkd = 1.0', "['vgg13-vgg8'] name no pair"),
    ('list = [["resnet56", "resnet20"]]\nwho = 1', "allowed keys: list, lr, teacher_checkpoint, reference"),
])
def test_bad_pairs_are_one_line(tmp_path, pairs, fragment):
    p = tmp_path / "p.toml"
    p.write_text(BASE + pairs + "\n")
    one_line_error(runner.invoke(app, ["tune", str(p), "--plan"]), str(p), fragment)


@pytest.mark.parametrize("text, fragment", [
    ('[data]\nval_fraction = 0.0\n[search]\nsamples = 2\n[search.space.geometry]\ntype = "uniform"\nlow = 1.0\nhigh = 2.0',
     "data.val_fraction = 0.0 (no validation split); allowed only in a grid without ASHA"),
    ('[data]\nval_fraction = 0.0\n[grid]\nmethods = ["kd"]\n[asha]\nenabled = true', "allowed only in a grid without ASHA"),
    ('[recipe]\nepochs = 10\nmilestones = [5, 3]\n[grid]', "milestones = [5, 3]; allowed: increasing epochs >= 1"),
    ('[recipe]\nepochs = 10\nschedule = "step"\nmilestones = [5, 10]\n[grid]', "milestones = [5, 10]; allowed: epochs before the last"),
])
def test_bad_recipe_and_split_are_one_line(tmp_path, text, fragment):
    p = tmp_path / "s.toml"
    p.write_text('name = "s"\ndataset = "digits"\n' + text + "\n")
    one_line_error(runner.invoke(app, ["tune", str(p), "--plan"]), fragment)


def test_per_class_limits_take_the_first_images_of_each_class():
    from kdbench.data import load_data

    d = load_data("synthetic", options={"val_fraction": 0.0, "train_per_class": 2, "test_per_class": 3})
    assert d.train_x.shape[0] == 200 and d.test_x.shape[0] == 300 and d.val_x.shape[0] == 0
    assert (d.train_y.bincount() == 2).all() and (d.test_y.bincount() == 3).all()


def test_the_synthetic_sibling_runs_every_pair_end_to_end_on_a_cluster(tmp_path, two_nodes, monkeypatch):
    """From teachers saved as RepDistiller saves them, where the study's template says (untrained: the path is
    what is tested here; the zoo tests check the weights' numbers); every pair on one connection to a cluster."""
    import torch

    from kdbench.models import build_model

    monkeypatch.chdir(tmp_path)
    for i, teacher in enumerate(("resnet56", "vgg13")):
        torch.manual_seed(i)
        folder = tmp_path / f"download_ckpts/cifar_teachers/{teacher}_vanilla"
        folder.mkdir(parents=True)
        torch.save({"epoch": 240, "model": build_model(teacher, 100, 3).state_dict(), "accuracy": 0.0},
                   folder / "ckpt_epoch_240.pth")
    out = tmp_path / "out"
    r = runner.invoke(app, ["tune", "synthetic-repdistiller", "--out", str(out), "--address", two_nodes.address])
    assert r.exit_code == 0, r.output[-3000:]
    for teacher, student in (("resnet56", "resnet20"), ("vgg13", "MobileNetV2")):
        f = read_folder(out / f"{teacher}-{student}")
        assert (f.study["study"]["teacher"], f.study["study"]["student"]) == (teacher, student)
        assert f.study["teacher"]["checkpoint"].endswith(f"{teacher}_vanilla/ckpt_epoch_240.pth")
        assert len(f.trials) == 1 and (f.trials["status"] == "completed").all() and "val_top1" not in f.trials.columns
        assert set(f.trials["lr"]) == {0.01 if student == "MobileNetV2" else 0.05}
        assert f.trials["milestones"].astype(str).eq("1").all()
        assert len(list((out / f"{teacher}-{student}" / "students").glob("*.pt"))) == 1
    doc = json.loads(runner.invoke(app, ["compare", str(out / "resnet56-resnet20"), "--format", "json"]).stdout)
    assert doc["front_on"] == "test means" and len(doc["front"]) >= 1
    published = {r["method"]: r["reported_top1"] for r in doc["leaderboard"] if str(r["method"]).endswith("(published)")}
    assert published == {"baseline (published)": 69.06, "kd (published)": 70.66, "crd (published)": 71.16}
