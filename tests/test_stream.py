"""Streamed image folders (issue 31): an ImageNet-layout tree written here in the real formats (JPEG, PNG,
greyscale, CMYK, mixed sizes), read from disk batch by batch in DataLoader workers; the views checked against
torchvision's own transforms; the batches the same with any number of workers; a bad file mid-stream one line."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from test_images import write_tree
from kdbench.data import DataError, load_data
from kdbench.stream import EVAL_RESIZE, _eval_view, _train_view, crop_box

CLASSES = ("n01", "n02", "n03")


def _imagenet_kinds(im, folder, i):
    """As ImageNet mixes them: an RGB JPEG, a greyscale JPEG, a CMYK JPEG, a PNG with alpha."""
    if i % 4 == 3:
        return im.convert("RGBA").save(folder / f"{i}.png")
    im = im.convert("L") if i % 4 == 1 else im.convert("CMYK") if i % 4 == 2 else im
    im.save(folder / f"{folder.name}_{i}.JPEG", quality=90)


def write_imagenet(root, train=6, val=2, seed=0):
    """ImageNet's layout (train/<wnid>/*.JPEG, val/<wnid>/*: no test/): each class its own colour; sizes and
    formats mixed as ImageNet mixes them."""
    return write_tree(root, (("train", train), ("val", val)), ((48, 40), (36, 60), (64, 64), (50, 30)), seed, CLASSES,
                      _imagenet_kinds)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_measuring_view_is_torchvisions_resize_and_centre_crop():
    from torchvision.transforms import v2

    rng = np.random.default_rng(1)
    for w, h in ((64, 48), (37, 80), (32, 32)):
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8))
        expected = v2.CenterCrop(24)(v2.Resize(int(24 / EVAL_RESIZE), interpolation=v2.InterpolationMode.BILINEAR)(im))
        assert np.array_equal(np.asarray(_eval_view(im, 24)), np.asarray(expected))


def test_random_resized_crop_draws_as_torchvision_and_crops_as_it_does():
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    boxes = np.array([crop_box(80, 60, rng) for _ in range(4000)])
    area, ratio = boxes[:, 2] * boxes[:, 3] / (80 * 60), boxes[:, 2] / boxes[:, 3]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 80).all() and (boxes[:, 1] + boxes[:, 3] <= 60).all()
    assert 0.075 < area.min() < 0.1 and area.max() > 0.97 and 0.72 < ratio.min() < 0.78 and 1.3 < ratio.max() < 1.36
    # Too thin for any draw: the fallback, the centre crop of the nearest ratio (3:4 here), as torchvision's get_params.
    assert crop_box(3, 200, np.random.default_rng(0)) == (0, (200 - 4) // 2, 3, 4)
    assert crop_box(200, 3, np.random.default_rng(0)) == ((200 - 4) // 2, 0, 4, 3)
    # The same box through torchvision's resized_crop gives the same pixels, then the flip.
    im = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 80, 3)).astype(np.uint8))
    for seed in range(6):
        r = np.random.default_rng(seed)
        left, top, cw, ch = crop_box(80, 60, r)
        expected = F.resized_crop(im, top, left, ch, cw, [24, 24], interpolation=v2.InterpolationMode.BILINEAR)
        if r.random() < 0.5:
            expected = F.horizontal_flip(expected)
        assert np.array_equal(np.asarray(_train_view(im, 24, seed)), np.asarray(expected))


def test_a_streamed_imagenet_folder_tests_on_val_carves_validation_and_reads_every_format_as_rgb(tree):
    d = load_data(f"folder:{tree}", options={"stream": True, "image_size": 24, "loader_workers": 0, "val_fraction": 0.2})
    assert d.streamed and d.shape == (3, 24, 24) and (d.size("train"), d.size("val"), d.size("test")) == (15, 3, 6)
    assert d.labels("train").tolist() == [0] * 5 + [1] * 5 + [2] * 5 and d.labels("val").tolist() == [0, 1, 2]
    assert all(f.startswith("val/") for f in d.files["test"]) and all(f.startswith("train/") for f in d.files["val"])
    x, y = next(d.chunks("test", 100))
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 1, 1, 2, 2]
    # Each image is dominated by its class's channel, greyscale and CMYK files aside.
    rgb = [i for i, f in enumerate(d.files["test"]) if f.endswith("_0.JPEG")]
    assert (x[rgb].float().mean((2, 3)).argmax(1) == y[rgb]).all()
    # The statistics: from the images as measured (here all of them), per channel on the 0..1 scale.
    whole = torch.cat([c for c, _ in d.chunks("train")]).double() / 255
    assert d.mean == pytest.approx(whole.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert d.std == pytest.approx(whole.transpose(0, 1).reshape(3, -1).std(1, unbiased=False).tolist(), abs=1e-6)


def test_training_batches_are_the_same_with_any_number_of_workers(tree):
    base = load_data(f"folder:{tree}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.0})
    epochs = {}
    for workers in (0, 2):
        d = dataclasses.replace(base, workers=workers)
        g = torch.Generator().manual_seed(3)
        epochs[workers] = [list(d.train_batches(4, g)) for _ in range(2)]
    for (a, b) in zip(epochs[0], epochs[2]):
        assert len(a) == len(b) == 18 // 4
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
            assert torch.equal(ya, base.labels("train")[ia])
    seen = torch.cat([i for _, _, i in epochs[0][0]])
    assert len(set(seen.tolist())) == 16  # a permutation: 4 batches of 4 distinct images
    assert not torch.equal(torch.cat([x for x, _, _ in epochs[0][0]]), torch.cat([x for x, _, _ in epochs[0][1]]))
    # A data-parallel worker decodes only its share of each batch: rank 1 of 2, the second half, as drawn whole.
    from kdbench.parallel import World

    share = list(base.train_batches(4, torch.Generator().manual_seed(3), share=World(1, 2).share(4)))
    for (x, y, i), (xa, ya, ia) in zip(share, epochs[0][0]):
        assert torch.equal(x, xa[2:]) and torch.equal(y, ya[2:]) and torch.equal(i, ia[2:])


def test_a_bad_file_mid_stream_is_one_line_or_skipped_and_counted(tree, tmp_path):
    import shutil

    root = tmp_path / "t"
    shutil.copytree(tree, root)
    bad = root / "train" / "n02" / "n02_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: its header reads, its pixels do not
    d = load_data(f"folder:{root}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.0})
    with pytest.raises(DataError, match=rf"^{bad}: unreadable image \(.*\); remove it, or pass --skip-bad-images"):
        for _ in d.train_batches(18, torch.Generator().manual_seed(0)):
            pass
    d = load_data(f"folder:{root}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.0,
                                             "skip_bad_images": True})
    (x, y, i), = list(d.train_batches(18, torch.Generator().manual_seed(0)))
    assert len(y) == 17 and [f for f, _ in d.bad] == ["train/n02/n02_0.JPEG"]


def test_auto_streams_only_what_does_not_fit(tree, monkeypatch, capsys):
    """24 images of 3x16x16 take 18,432 bytes decoded: resident under a budget of 20,000 (half of 40,000 free),
    streamed under 15,000."""
    import kdbench.images

    monkeypatch.setattr(kdbench.images, "_free_memory", lambda device: (40_000, "RAM"))
    d = load_data(f"folder:{tree}", options={"image_size": 16})
    assert not d.streamed and "streamed" not in capsys.readouterr().err
    monkeypatch.setattr(kdbench.images, "_free_memory", lambda device: (30_000, "RAM"))
    d = load_data(f"folder:{tree}", options={"image_size": 16, "loader_workers": 0})
    assert d.streamed
    assert ("24 images of 3x16x16 would take 18 KiB decoded, over half the free RAM (15 KiB): streamed from disk"
            in capsys.readouterr().err.replace("\n", " "))


def test_distill_trains_on_a_streamed_folder_and_resumes_mid_epoch_exactly(tree, monkeypatch):
    """Six epochs learn a separable set; a state taken after a step inside epoch 4 (what a checkpoint by time takes
    on an hour-long ImageNet epoch) continues to the same numbers and weights, with the epoch's order and every
    image's crop and flip as the uninterrupted run drew them, whatever the number of loader workers."""
    from kdbench.methods import METHODS
    from kdbench.settings import Recipe
    from kdbench.teacher import get_teacher
    from kdbench.train import TrainConfig, distill

    monkeypatch.setenv("KDBENCH_CACHE", str(tree.parent / "cache"))
    d = load_data(f"folder:{tree}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.0})
    recipe = Recipe(epochs=6, batch_size=6, lr=0.05)
    teacher, _ = get_teacher(d, "cnn_teacher", recipe)
    assert teacher.centroids.shape[0] == 3
    cfg, states = TrainConfig("cnn_student", METHODS["geometry"], recipe, seed=0), []
    keep = lambda e: states.append(e.state) if e.state is not None and not e.row else None  # noqa: E731
    run = distill(cfg, d, teacher, keep, state_when=lambda epoch, within: within and epoch == 4 and not states)
    # Each class is its own colour: separable; chance is 33 %.
    assert len(run.history) == 6 and run["test_top1"] >= 66 and np.isfinite(run["test_geom_corr"])
    # A state after the first of epoch 4's three steps resumes exactly, decoding in two worker processes.
    (mid,) = states
    assert (mid.epoch, mid.batch, len(mid.history)) == (3, 1, 3)
    rows = []
    again = distill(cfg, dataclasses.replace(d, workers=2), teacher, lambda e: rows.append(e.row), resume=mid)
    assert [r["epoch"] for r in rows] == [4, 5, 6] and rows[0]["train_loss"] == run.history[3]["train_loss"]
    assert {k: again[k] for k in run.metrics if "seconds" not in k and "per_second" not in k} == \
        {k: run[k] for k in run.metrics if "seconds" not in k and "per_second" not in k}
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), run.model.state_dict().values()))


def test_a_streamed_folder_travels_to_a_ray_worker_and_trains_from_the_command_line(tree, tmp_path, monkeypatch):
    """What Ray's object store does with the data set (pickle) leaves its batches as they were; `kdbench train
    --stream true` runs; a bad --stream is one line. (`kdbench tune` on a streamed folder was run by hand: its
    trials' DataLoader workers start inside Ray's workers, and study.json records streamed and the reference.)"""
    import pickle

    from typer.testing import CliRunner

    from kdbench.cli import app

    d = load_data(f"folder:{tree}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.0})
    again = pickle.loads(pickle.dumps(d))
    for (a, ya, _), (b, yb, _) in zip(d.train_batches(6, torch.Generator().manual_seed(1)),
                                      again.train_batches(6, torch.Generator().manual_seed(1))):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    flags = ["train", "--dataset", f"folder:{tree}", "--image-size", "16", "--teacher", "cnn_teacher", "--student",
             "cnn_student", "--method", "kd", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "6"]
    r = CliRunner().invoke(app, [*flags, "--stream", "true"])
    assert r.exit_code == 0, r.output
    one_line_error(CliRunner().invoke(app, [*flags, "--stream", "maybe"]), "stream = 'maybe'; allowed: \"auto\"")


def test_a_fixed_model_measures_the_same_streamed_or_resident(tree):
    """The same images, preprocessed the same way (the streamed measuring view, decoded once into a resident
    data set): every metric of a fixed model, kNN and retrieval included, the same through either path."""
    from kdbench.data import Data
    from kdbench.measure import evaluate, teacher_views
    from kdbench.models import build_model

    s = load_data(f"folder:{tree}", options={"stream": True, "image_size": 16, "loader_workers": 0, "val_fraction": 0.2})
    split = {name: torch.cat([x for x, _ in s.chunks(name)]) for name in ("train", "val", "test")}
    r = Data("resident", split["train"], s.labels("train"), split["val"], s.labels("val"), split["test"], s.labels("test"),
             s.num_classes, s.mean, s.std, pad=0, flip=False)
    torch.manual_seed(0)
    model, teacher = build_model("cnn_student", 3, 3).eval(), build_model("cnn_teacher", 3, 3).eval()
    for name in ("val", "test"):
        a = evaluate(model, s, name, teacher_views(teacher, s)[name], knn=True)
        b = evaluate(model, r, name, teacher_views(teacher, r)[name], knn=True)
        assert a.keys() == b.keys() and len(a) > 8
        assert all(a[k] == pytest.approx(b[k], abs=1e-5, nan_ok=True) for k in a), {k: (a[k], b[k]) for k in a}


def test_a_search_of_two_worker_trials_with_asha_on_a_streamed_folder_writes_a_complete_folder(tree, tmp_path, monkeypatch,
                                                                                              two_nodes):
    """`kdbench tune` on the two-node cluster (one CPU a node) on a study that streams, its trial a Ray Train run of
    two gloo workers (issue 32), one on each node (0.9 CPU each), that decode their halves of each batch in
    DataLoader workers: rank 0's rows reach two-objective ASHA (grace 1) and the folder, which is whole, rank 0's
    student too, and the row says how and where it ran. Rank 0's worker is killed (-9) once Train has registered a
    checkpoint: Train restarts the two workers from it and the folder has every epoch once. One trial: a
    Train run costs ~25 s to start here (two concurrent trials, one stopped by ASHA through its driver, were run by
    hand: 48 s). More workers than the cluster has is one line before anything is written; so is a rerun of the
    trial."""
    import json
    import os
    import signal
    import threading
    import time

    from test_search import _wait_for_checkpoint
    from typer.testing import CliRunner

    from kdbench.cli import app
    from kdbench.results import read_folder

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    out, study = tmp_path / "out", tmp_path / "s.toml"
    study.write_text(f'name = "s"\ndataset = "folder:{tree}"\nteacher = "cnn_teacher"\nstudent = "cnn_student"\n'
                     'method = "geometry"\n[data]\nstream = true\nimage_size = 16\nloader_workers = 1\n'
                     '[recipe]\nepochs = 6\nbatch_size = 6\n[teacher_recipe]\nepochs = 1\nbatch_size = 6\n'
                     '[search]\nsamples = 1\nconcurrency = 2\n[search.space.geometry]\ntype = "loguniform"\n'
                     'low = 1.0\nhigh = 100.0\n[asha]\ngrace_period = 1\nreduction_factor = 2\n'
                     '[resources]\nworkers_per_trial = 2\ncpus_per_trial = 0.9\n')
    address = ["--address", two_nodes.address]
    one_line_error(CliRunner().invoke(app, ["tune", str(study), "--out", str(out), "--workers-per-trial", "3", *address]),
                   "workers_per_trial = 3: 3 workers × (0.9 CPU) and the driver's 0.1 CPU do not fit on the Ray cluster "
                   "(2 CPUs, 0 GPUs)")
    assert not out.exists()
    done = []
    run = threading.Thread(target=lambda: done.append(CliRunner().invoke(app, ["tune", str(study), "--out", str(out), *address])))
    run.start()
    # Once Train's controller has registered a checkpoint (it polls the workers every 2 s; a worker killed before
    # then is restarted from the one before), rank 0's worker dies, as on a lost node.
    deadline = time.time() + 150
    while not list((out / "ray").glob("train-*/checkpoint_manager_snapshot.json")) and time.time() < deadline:
        time.sleep(0.05)
    ck = _wait_for_checkpoint(out / "ray", 0, 1)
    os.kill(ck["pid"], signal.SIGKILL)
    run.join(timeout=240)
    assert done and done[0].exit_code == 0, done[0].output if done else "tune did not end"
    meta = json.loads((out / "study.json").read_text())
    assert meta["data"]["streamed"] and meta["study"]["asha"]["enabled"] and meta["study"]["resources"]["workers_per_trial"] == 2
    f = read_folder(out)
    assert f.trials["status"].tolist() == ["completed"], f.trials.to_dict("records")
    assert f.epochs["epoch"].tolist() == list(range(1, 7)) and f.trials["epochs"].tolist() == [6]  # each epoch once
    assert f.trials["resumed_from"].iloc[0] >= 1  # continued from the killed workers' checkpoint, not from scratch
    assert f.trials[["workers", "backend", "worker_batch"]].drop_duplicates().values.tolist() == [[2, "gloo", 3]]
    nodes = f.trials["node"].iloc[0].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1]  # one worker on each node
    done = f.trials[f.trials["status"] == "completed"]["trial_id"]
    assert all((out / "students" / f"{t}.pt").is_file() for t in done)  # rank 0's student, through Train's storage
    one_line_error(CliRunner().invoke(app, ["rerun", str(out), done.iloc[0]]),
                   f"trial {done.iloc[0]} ran on 2 data-parallel workers; allowed: a trial of one process")


def test_the_imagenet_study_runs_end_to_end_on_a_tiny_jpeg_folder(tmp_path, monkeypatch, ray_session):
    """studies/imagenet-mdistiller.toml as bundled, on an ImageNet-shaped folder of JPEGs (train/ + val/, no test/)
    with the teacher's file of torchvision's architecture where its [pairs] template looks for it (random weights,
    the head centred on val/'s features), shrunk by flags: all four methods, one epoch, two trials at
    once, lr 0.01 (the recipe's 0.2 on batches of 4 blows geometry's student up: a DivergedError, tested apart)."""
    import torchvision
    from typer.testing import CliRunner

    from kdbench.cli import app
    from kdbench.results import read_folder

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the template is relative to the working directory, as the study's comment says
    jpeg = lambda image, folder, i: image.save(folder / f"n{i:08d}.JPEG", quality=90)  # noqa: E731
    write_tree(tmp_path / "imagenet", (("train", 4), ("val", 5)), ((40, 36), (36, 44)), 0, CLASSES[:2], jpeg)
    (tmp_path / "download_ckpts/imagenet").mkdir(parents=True)
    # A random ResNet-50 whose head is centred on val/'s features, so that its answers differ from image to image.
    from torchvision.transforms import v2

    view = v2.Compose([v2.Resize(int(32 / 0.875)), v2.CenterCrop(32), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted((tmp_path / "imagenet/val").glob("*/*.JPEG"))
    images = torch.stack([view(Image.open(p).convert("RGB")) for p in files])
    torch.manual_seed(0)
    net = torchvision.models.get_model("resnet50", num_classes=2).eval()
    with torch.no_grad():
        head, net.fc = net.fc, torch.nn.Identity()
        features = net(images)
        net.fc = head
        head.weight.copy_(torch.randn(2, features.shape[1]) / features.std(0).clamp_min(1e-6))
        head.bias.copy_(-head.weight @ features.mean(0))
        pred = net(images).argmax(1)
    assert 0 < pred.sum() < len(pred)  # not one class for every image
    torch.save(net.state_dict(), "download_ckpts/imagenet/resnet50.pth")
    # The bundled file with its [pairs] list (and references) cut to the pair whose student is kdbench's own (MobileNetV1): one pair
    # runs the whole path; both would double the suite's time for no new code.
    bundled = (Path(__file__).parents[1] / "studies/imagenet-mdistiller.toml").read_text()
    both = 'list = [["tv:resnet34", "tv:resnet18"], ["tv:resnet50", "MobileNetV1"]]'
    assert both in bundled
    study = tmp_path / "imagenet-mdistiller.toml"
    other = bundled.index('[pairs.reference."tv:resnet34-tv:resnet18"]')
    cut = bundled[:other] + bundled[bundled.index('[pairs.reference."tv:resnet50-MobileNetV1"]'):]
    study.write_text(cut.replace(both, 'list = [["tv:resnet50", "MobileNetV1"]]'))
    r = CliRunner().invoke(app, ["tune", str(study), "--dataset", f"folder:{tmp_path / 'imagenet'}", "--image-size", "32",
                                 "--epochs", "1", "--set", "batch_size=4", "--set", "lr=0.01", "--set", "schedule=constant",
                                 "--cpus-per-trial", "1", "--gpus-per-trial", "0.5", "--concurrency", "2", "--out", "out"])
    assert r.exit_code == 0, r.output
    f = read_folder(tmp_path / "out")  # one pair: its folder is --out itself
    assert sorted(f.trials["method"]) == ["baseline", "dkd", "geometry", "kd"]
    assert (f.trials["status"] == "completed").all() and f.study["data"]["streamed"]
    assert f.study["study"]["teacher_checkpoint"].endswith("download_ckpts/imagenet/resnet50.pth")
    assert f.study["study"]["student"] == "MobileNetV1"
    # The teacher's recorded test top-1 (val/ of ImageNet's layout) is the file's model run on val/ through
    # torchvision's own pipeline: resize to 32 / 0.875, centre crop 32, ImageNet's mean and std from the study.
    labels = torch.tensor([CLASSES.index(p.parent.name) for p in files])
    assert f.study["teacher"]["test_top1"] == pytest.approx(100 * (pred == labels).float().mean().item(), abs=1e-4)
