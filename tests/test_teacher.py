"""Teachers read from checkpoint files (issue 10): the formats trainers save, evaluated once, cached by the
file's hash; every bad file is one line and writes nothing. A teacher trained by another process (or thread)
right now is waited for, not trained twice."""

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error
from kdbench.cli import app
from kdbench.models import build_model
from kdbench.teacher import get_teacher
from kdbench.settings import Recipe

runner = CliRunner()


class NotWeights:  # pickled by reference to this module: code, which weights_only=True refuses
    pass


def test_every_usual_format_loads_into_the_same_teacher_evaluated_once(tmp_path, digits, digits_teacher):
    sd = digits_teacher.model.state_dict()
    formats = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 30}, "model": {"model": sd, "acc": 97.0},
               "net": {"net": {f"module.{k}": v for k, v in sd.items()}}}  # RepDistiller, DataParallel prefixes
    for name, blob in formats.items():
        path = tmp_path / f"{name}.pt"
        torch.save(blob, path)
        t, hit = get_teacher(digits, "cnn_teacher", Recipe(), checkpoint=path)
        assert not hit, name
        for k, v in sd.items():
            assert torch.equal(t.model.state_dict()[k], v), (name, k)
        # Same weights, same data: the metrics and centroids of the trained teacher, measured again.
        assert t.meta["test_top1"] == pytest.approx(digits_teacher.meta["test_top1"], abs=1e-9)
        assert t.meta["val_top1"] == pytest.approx(digits_teacher.meta["val_top1"], abs=1e-9)
        assert torch.allclose(t.centroids, digits_teacher.centroids, atol=1e-5)
        assert t.meta["checkpoint"] == str(path.resolve()) and t.meta["train_seconds"] == 0.0
    # Independently: test top-1 by hand from the logits.
    with torch.inference_mode():
        from kdbench.measure import forward_all

        _, z = forward_all(t.model, digits.test_x, digits)
    assert t.meta["test_top1"] == pytest.approx(100 * (z.argmax(1) == digits.test_y).double().mean().item())
    again, hit = get_teacher(digits, "cnn_teacher", Recipe(), checkpoint=tmp_path / "net.pt")
    assert hit and torch.equal(again.centroids, t.centroids)  # the same file: from the cache, no evaluation
    r = runner.invoke(app, ["teacher", "--arch", "cnn_teacher", "--checkpoint", str(tmp_path / "net.pt")])
    assert r.exit_code == 0 and "loaded from cache" in r.output and f"{t.meta['test_top1']:.2f}" in r.output, r.output
    torch.save({"net": {k: v + 1e-3 for k, v in sd.items()}}, tmp_path / "net.pt")  # new contents, same name
    assert not get_teacher(digits, "cnn_teacher", Recipe(), checkpoint=tmp_path / "net.pt")[1]


def test_a_repdistiller_teacher_file_loads_end_to_end(tmp_path, digits):
    """Saved as RepDistiller's train_teacher.py saves it ({'epoch', 'model', 'accuracy', 'optimizer'}; here also
    through DataParallel's module. prefix): `kdbench teacher --checkpoint` reads it strictly and evaluates it.
    (On digits, for speed: a one-channel, ten-class resnet8; the format is what is tested.)"""
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(4, 1, 8, 8))[1].sum().backward()
    opt.step()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": {f"module.{k}": v for k, v in model.state_dict().items()}, "accuracy": 12.5,
                "optimizer": opt.state_dict()}, path)
    r = runner.invoke(app, ["teacher", "--dataset", "digits", "--arch", "resnet8", "--checkpoint", str(path)])
    assert r.exit_code == 0 and "resnet8" in r.output, r.output
    t, hit = get_teacher(digits, "resnet8", Recipe(), checkpoint=path)
    assert hit and all(torch.equal(t.model.state_dict()[k].cpu(), v) for k, v in model.state_dict().items())
    # The same file for another zoo name is refused, naming the architecture its keys fit.
    one_line_error(runner.invoke(app, ["teacher", "--dataset", "digits", "--arch", "resnet14", "--checkpoint",
                                       str(path)]), "does not fit resnet14", "its keys fit resnet8")


@pytest.mark.parametrize("name", ["tv:resnet18", "timm:resnet18"])
def test_a_plain_library_state_dict_loads_into_its_model_as_it_is(tmp_path, name, synthetic):
    import timm
    import torchvision

    data = synthetic
    data = dataclasses.replace(data, train_x=data.train_x[::20], train_y=data.train_y[::20], val_x=data.val_x[::10],
                               val_y=data.val_y[::10], test_x=data.test_x[::10], test_y=data.test_y[::10])
    torch.manual_seed(0)  # as the library itself builds and saves it
    lib = torchvision.models.resnet18(num_classes=100) if name.startswith("tv:") else timm.create_model("resnet18",
                                                                                                      num_classes=100)
    torch.save(lib.state_dict(), tmp_path / "resnet18.pth")
    t, _ = get_teacher(data, name, Recipe(), checkpoint=tmp_path / "resnet18.pth")
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in lib.state_dict().items())
    assert t.centroids.shape == (100, 512)
    with torch.inference_mode():  # and computes the library model's own logits
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(t.model(x)[1], lib.eval()(x), atol=1e-5)


def _bad(tmp_path, teacher):
    sd = teacher.model.state_dict()
    other = build_model("cnn_teacher", 7, 1).state_dict()
    return {
        "missing": (sd, lambda p: p.unlink(), ["no such file"]),
        "list": ([1, 2, 3], torch.save, ["holds list, not a state_dict", "state_dict, model, net"]),
        "keys": ({"weights": sd}, torch.save, ["holds a dict with keys weights"]),
        "code": ({"model": NotWeights()}, torch.save, ["cannot be read with weights_only=True", "carries code"]),
        "fewer": ({k: v for k, v in list(sd.items())[2:]}, torch.save, ["2 missing (", "does not fit cnn_teacher"]),
        "more": ({**sd, "extra.weight": torch.ones(1)}, torch.save, ["1 unexpected (extra.weight)"]),
        "classes": (other, torch.save, ["has 7 classes, the data set 10"]),
        "arch": (build_model("resnet8x4", 10, 1).state_dict(), torch.save, ["missing (", "unexpected (", ", ...)",
                                                                             "its keys fit resnet8x4"]),
    }


@pytest.mark.parametrize("case", ["missing", "list", "keys", "code", "fewer", "more", "classes", "arch"])
def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path, digits_teacher, case):
    blob, write, fragments = _bad(tmp_path, digits_teacher)[case]
    path = tmp_path / "t.pt"
    torch.save(blob, path)
    if write is not torch.save:
        write(path)
    out = tmp_path / "out"
    r = runner.invoke(app, ["train", "--teacher", "cnn_teacher", "--teacher-checkpoint", str(path), "--epochs", "1",
                            "--out", str(out)])
    one_line_error(r, str(path), *fragments)
    assert not out.exists()


def test_a_teacher_being_trained_elsewhere_is_waited_for_then_read_from_its_cache(tmp_path, monkeypatch, digits):
    """A second caller arrives while the first trains (at its first epoch's report, one epoch still to go): it
    waits on the cache entry's lock, then reads what the first cached. Without the lock it would train too."""
    import threading

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path))
    recipe, got = Recipe(epochs=2), {}
    second = threading.Thread(target=lambda: got.setdefault("second", get_teacher(digits, "cnn_student", recipe)))

    def report(e):
        if e.row["epoch"] == 1:
            second.start()
            second.join(timeout=0.5)  # it is blocked on the lock, not finished: nothing is cached yet
            assert second.is_alive() and not list(tmp_path.glob("*.pt"))

    first, hit = get_teacher(digits, "cnn_student", recipe, report=report)
    second.join()
    assert not hit and got["second"][1]  # trained once, then read from the cache
    assert torch.equal(first.centroids, got["second"][0].centroids)
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_a_code_carrying_checkpoint_is_one_line_with_no_library_warning_before_it(tmp_path):
    """torch warns of a pickle protocol other than its own before refusing such a file; outside pytest that warning
    printed two lines before kdbench's one. Here every warning is recorded: none may be raised at all."""
    import pickle
    import warnings

    path = tmp_path / "module.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": torch.nn.Linear(2, 2)}, f, protocol=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, ["teacher", "--checkpoint", str(path)])
    one_line_error(r, str(path), "carries code")
    assert not caught, [str(w.message) for w in caught]
