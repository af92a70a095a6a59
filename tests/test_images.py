"""Image folders (issue 10): trees written here in the real format (PNG and JPEG files through Pillow),
decoded, cached, split; every bad input one line; a checkpoint teacher; train and tune end to end."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import one_line_error
from kdbench.cli import app
from kdbench.data import DataError, load_data
from kdbench.images import read_image_folder
from kdbench.results import read_table

runner = CliRunner()
CLASSES = ("cat", "dog", "owl")


def _png_or_jpeg(im, folder, i):
    im.save(folder / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")


def write_tree(root, per_split=(("train", 8), ("test", 3)), sizes=((20, 20), (24, 20)), seed=0, classes=CLASSES,
               save=_png_or_jpeg):
    """Each class its own colour plus noise; sizes alternate; ``save(image, folder, i)`` writes image i (default:
    even ones PNG, odd ones JPEG)."""
    rng = np.random.default_rng(seed)
    for split, n in per_split:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                img = rng.integers(0, 60, (h, w, 3))
                img[..., c] += 180
                save(Image.fromarray(img.astype(np.uint8)), root / split / name, i)
    return root


def test_splits_labels_and_sizes_from_the_tree(tmp_path):
    root = write_tree(tmp_path / "imgs")
    f = read_image_folder(root, image_size=16)
    assert f["classes"] == list(CLASSES) and f["bad"] == []
    (x, y), (tx, ty) = f["splits"]["train"], f["splits"]["test"]
    assert x.shape == (24, 3, 16, 16) and x.dtype == torch.uint8 and tx.shape == (9, 3, 16, 16)
    assert y.tolist() == [0] * 8 + [1] * 8 + [2] * 8 and ty.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # Each image is dominated by its class's channel (JPEG or PNG alike).
    assert (x.float().mean((2, 3)).argmax(1) == y).all()


def test_center_crop_grayscale_and_exact_pixels(tmp_path):
    """A 32x16 grayscale PNG whose column j holds 8j: image_size 16 keeps the height (scale 1) and crops columns
    8..23; every image grayscale -> one channel; one RGB image among them -> three."""
    row = (8 * np.arange(32)).astype(np.uint8)
    for split in ("train", "test"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.tile(row, (16, 1))).save(tmp_path / split / name / "0.png")
    x, _ = read_image_folder(tmp_path, image_size=16)["splits"]["train"]
    assert x.shape == (2, 1, 16, 16)
    assert (x[0, 0] == torch.from_numpy(row[8:24]).expand(16, 16)).all()
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(tmp_path / "train" / "a" / "1.png")
    x, _ = read_image_folder(tmp_path, image_size=16)["splits"]["train"]
    assert x.shape == (3, 3, 16, 16) and (x[0, 0] == x[0, 2]).all()  # gray -> equal R, G, B


def test_load_data_carves_val_or_takes_val_folder_and_scales_padding(tmp_path):
    root = write_tree(tmp_path / "imgs")
    d = load_data(f"folder:{root}", options={"image_size": 16})
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (21, 3, 9)  # 10% of 8 per class, rounded: 1
    assert d.val_y.tolist() == [0, 1, 2] and d.num_classes == 3 and d.class_names == CLASSES
    assert d.pad == 2 and d.flip and d.in_channels == 3
    f = d.train_x.double() / 255  # standardised with the train split's own statistics
    assert d.mean == pytest.approx(tuple(f.mean((0, 2, 3)).tolist()))
    assert d.std == pytest.approx(tuple(f.std((0, 2, 3), correction=0).tolist()))
    write_tree(tmp_path / "v", per_split=(("train", 4), ("val", 2), ("test", 1)))
    d = load_data(f"folder:{tmp_path / 'v'}", options={"image_size": 16, "pad": 0, "flip": False})
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (12, 6, 3) and d.pad == 0 and not d.flip
    with pytest.raises(DataError, match="has a val/ folder; val_fraction applies only without one"):
        load_data(f"folder:{tmp_path / 'v'}", options={"image_size": 16, "val_fraction": 0.2})


def test_the_cache_is_used_until_a_file_changes(tmp_path):
    root = write_tree(tmp_path / "imgs")
    news = []
    first = read_image_folder(root, image_size=16, cache=tmp_path / "cache", log=news.append)
    again = read_image_folder(root, image_size=16, cache=tmp_path / "cache", log=news.append)
    assert "decoded" in news[0] and "images/s" in news[0] and "loaded from the cache" in news[1]
    assert torch.equal(first["splits"]["train"][0], again["splits"]["train"][0])
    assert read_image_folder(root, image_size=12, cache=tmp_path / "cache", log=news.append)["splits"]["test"][0].shape[-1] == 12
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "test" / "cat" / "0.png")
    os.utime(root / "test" / "cat" / "0.png", ns=(1, 10**18))  # another modification time
    changed = read_image_folder(root, image_size=16, cache=tmp_path / "cache", log=news.append)
    assert "decoded" in news[-1] and changed["splits"]["test"][0][0].sum() == 0


def test_unreadable_images_stop_or_are_counted(tmp_path):
    root = write_tree(tmp_path / "imgs")
    data = (root / "train" / "dog" / "1.jpg").read_bytes()
    (root / "train" / "dog" / "1.jpg").write_bytes(data[: len(data) // 2])  # truncated: fails when decoded
    (root / "train" / "owl" / "2.png").write_bytes(b"not an image")  # fails at the header
    with pytest.raises(DataError, match=r"train/dog/1.jpg: unreadable image .*\(and 1 more\); .*--skip-bad-images"):
        read_image_folder(root, image_size=16)
    f = read_image_folder(root, image_size=16, skip_bad_images=True)
    assert len(f["bad"]) == 2 and len(f["splits"]["train"][1]) == 22
    d = load_data(f"folder:{root}", options={"image_size": 16, "skip_bad_images": True})
    assert d.skipped == 2


def test_over_the_memory_budget_names_an_image_size_that_fits(tmp_path):
    root = write_tree(tmp_path / "imgs")
    budget = 33 * 3 * 10 * 10 + 5  # 33 images: 10x10 fits, 11x11 does not
    with pytest.raises(DataError, match=r"33 images of 3x64x64 take .* over the budget .*; set image_size = 10 or smaller"):
        read_image_folder(root, image_size=64, budget=budget)
    assert read_image_folder(root, image_size=10, budget=budget)["splits"]["train"][0].shape[-1] == 10


def _rm(p):
    for f in p.iterdir():
        f.unlink()


@pytest.mark.parametrize("break_it, extra, fragments", [
    (lambda r: os.rename(r / "train", r / "training"), [], ["no train/ folder", "train/<class>/<image>"]),
    (lambda r: os.rename(r / "test", r / "t"), [], ["no test/ folder"]),
    (lambda r: _rm(r / "train" / "dog"), [], ["train/dog: no images", ".png"]),
    (lambda r: [_rm(r / "test" / "owl"), (r / "test" / "owl").rmdir()], [], ["test: no folder for class 'owl' (it is in train/)"]),
    (lambda r: (r / "test" / "bird").mkdir(), [], ["train: no folder for class 'bird' (it is in test/)"]),
    (lambda r: [_rm(r / s / c) for s in ("train", "test") for c in CLASSES], [], ["no images (expected"]),
    (lambda r: None, ["--image-size", "0"], ["image_size = 0; allowed: an integer >= 4"]),
    (lambda r: None, ["--dataset", "digits", "--image-size", "16"], ["image_size = 16; allowed only for image folders"]),
    (lambda r: (r / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken"), ["--image-size", "16"],
     ["train/cat/0.png: unreadable image", "--skip-bad-images"]),
    (lambda r: None, [], ["images differ in size", "is 20x20", "is 24x20", "--image-size"]),
    (lambda r: None, ["--student", "tv:resnet_9000"], ["torchvision has no classification model 'resnet_9000'"]),
])
def test_bad_folders_are_one_line_and_write_nothing(tmp_path, break_it, extra, fragments):
    root = write_tree(tmp_path / "imgs")
    break_it(root)
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", "--dataset", f"folder:{root}", "--epochs", "1", "--out", str(out), *extra])
    one_line_error(r, *fragments)
    assert not out.exists()


def test_tune_on_a_bad_folder_is_one_line_and_writes_nothing(tmp_path):
    root = write_tree(tmp_path / "imgs")
    (tmp_path / "s.toml").write_text(f'dataset = "folder:{root}"\n[search]\n[search.space.geometry]\nlow = 1.0\nhigh = 9.0\n')
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, ["tune", str(tmp_path / "s.toml"), "--out", str(out)]), "images differ in size")
    assert not out.exists()


def test_without_timm_a_timm_model_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    one_line_error(runner.invoke(app, ["train", "--student", "timm:resnet18", "--epochs", "1"]),
                   "needs timm, which is not installed", 'pip install "kdbench[timm]"')


def test_tune_train_and_compare_on_a_folder_with_a_torchvision_student_and_a_checkpoint_teacher(tmp_path, ray_session):
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.train import TrainConfig, distill

    root = write_tree(tmp_path / "imgs", per_split=(("train", 12), ("test", 4)))
    # A teacher trained elsewhere, saved as RepDistiller saves its own: {"model": state_dict, ...}.
    data = load_data(f"folder:{root}", options={"image_size": 32})
    res = distill(TrainConfig("cnn_teacher", METHODS["baseline"], Recipe(epochs=3, batch_size=16), seed=0), data)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": res.model.state_dict(), "epoch": 3}, ckpt)
    # No study file: the data set, the models, the recipe and the space are flags (`tune --dataset ... --space ...`).
    out = tmp_path / "out"
    flags = ["--dataset", f"folder:{root}", "--image-size", "32", "--teacher", "cnn_teacher", "--teacher-checkpoint",
             str(ckpt), "--student", "tv:mobilenet_v3_small", "--epochs", "2", "--set", "batch_size=16", "--samples", "2",
             "--concurrency", "1", "--space", "geometry=loguniform:1:100", "--no-asha"]
    r = runner.invoke(app, ["tune", *flags, "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "study.json").read_text())
    assert meta["name"] == "imgs-search" and meta["study"]["path"] == "" and not meta["study"]["asha"]["enabled"]
    assert meta["study"]["search"]["space"] == [{"name": "geometry", "type": "loguniform", "low": 1.0, "high": 100.0, "choices": [],
                                       "when": []}]
    # A resume needs no flags (study.json holds the study) and finds nothing left; a changed space is refused.
    r = runner.invoke(app, ["tune", "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "2 trials in 0 s" in r.output, r.output
    one_line_error(runner.invoke(app, ["tune", *flags[:-3], "--space", "geometry=loguniform:1:1000", "--no-asha",
                                       "--out", str(out), "--resume"]),
                   f"--resume {out}: the study differs", "space.geometry.high = 1000.0 now, 100.0 in the folder")
    t = read_table(out / "trials.csv")
    assert len(t) == 2 and (t["status"] == "completed").all() and t["config_id"].is_unique
    meta = json.loads((out / "study.json").read_text())
    assert meta["teacher"]["checkpoint"] == str(ckpt) and meta["teacher"]["epochs"] == 0  # read, not trained
    assert meta["data"] | {"name": ""} == {"name": "", "classes": 3, "shape": [3, 32, 32], "train": 33, "val": 3,
                                           "test": 12, "skipped_images": 0, "streamed": False,
                                           "reference_images": 33}
    # `train` with a trial's values names the same configuration, and at the trial's one thread ends the same.
    row = t.iloc[0]
    one = tmp_path / "one"
    r = runner.invoke(app, ["train", "--dataset", f"folder:{root}", "--image-size", "32", "--teacher", "cnn_teacher",
                            "--teacher-checkpoint", str(ckpt), "--student", "tv:mobilenet_v3_small", "--epochs", "2",
                            "--batch-size", "16", "--set", f"geometry={float(row['geometry'])!r}", "--threads", "1",
                            "--out", str(one)])
    assert r.exit_code == 0, r.output
    res = json.loads((one / "result.json").read_text())
    assert res["config_id"] == row["config_id"] and res["metrics"]["test_top1"] == row["test_top1"]
    r = runner.invoke(app, ["rerun", str(out), str(row["trial_id"])])  # from study.json: [data], checkpoint
    assert r.exit_code == 0 and "identical to the recorded trial, bit for bit" in r.output, r.output
    r = runner.invoke(app, ["compare", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    board = {r["method"]: r for r in shown["leaderboard"]}
    assert {r["config_id"] for r in shown["leaderboard"] if r["config_id"]} == set(t["config_id"])
    assert board["teacher (cnn_teacher, checkpoint)"]["test_top1_mean"] == meta["teacher"]["test_top1"]
