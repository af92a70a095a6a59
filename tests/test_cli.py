"""The CLI through typer's CliRunner: exit codes, one-line errors, files written, real numbers."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from conftest import one_line_error
from kdbench.results import read_table

runner = CliRunner()


_one_line_error = one_line_error


@pytest.mark.parametrize("args, fragments", [
    (["train", "--method", "magic"], ["--method 'magic' is unknown", "geometry_only"]),
    (["train", "--dataset", "mnist"], ["--dataset 'mnist' is unknown", "cifar100"]),
    (["train", "--student", "vgg"], ["--student 'vgg' is unknown", "resnet18"]),
    (["train", "--set", "zeta=2"], ["--set: key 'zeta' is unknown", "temperature"]),
    (["train", "--set", "temperature=-1"], ["temperature = '-1'; allowed: > 0"]),
    (["train", "--epochs", "0"], ["epochs = 0; allowed: >= 1"]),
    (["train", "--precision", "fp16"], ["precision = 'fp16'; allowed: auto, bf16, fp32"]),
    (["tune", "--gpus-per-trial", "0.3", "--plan"], ["--gpus-per-trial 0.3: allowed: a fraction that divides one GPU",
                                                     "1/3 = 0.3333"]),
    (["tune", "--gpus-per-trial", "1.5", "--plan"], ["allowed: whole GPUs above one"]),
    (["tune", "--workers-per-trial", "0", "--plan"], ["--workers-per-trial 0: workers_per_trial = 0; allowed: >= 1"]),
    (["tune", "--workers-per-trial", "3", "--plan"], ["workers_per_trial = 3; allowed: a divisor of the recipe's batch_size 64"]),
    (["tune", "--log", "mlflw", "--plan"], ["--log = 'mlflw'; allowed: tensorboard, mlflow, wandb"]),
    (["train", "--dataset", "cifar100", "--data-root", "/nonexistent"], ["no cifar-100-python/ folder"]),
    (["tune", "no-such-study"], ["no such study file or bundled study"]),
    (["tune", "digits-paper", "--samples", "3"], ["grid study"]),
    (["tune", "digits", "--resume"], ["--resume needs --out"]),
    (["compare", "/nonexistent/folder"], ["no such results folder"]),
    (["compare", "--format", "xml", "/tmp"], ["--format 'xml'"]),
    (["compare", "--interval", "wald", "/tmp"], ["--interval 'wald'", "allowed: t, bootstrap"]),
    (["rerun", "/nonexistent/folder", "abc"], ["no such results folder"]),
])
def test_bad_input_is_one_line_and_exit_2(args, fragments):
    _one_line_error(runner.invoke(app, args), *fragments)


def test_train_writes_result_and_history_and_refuses_to_overwrite(tmp_path, digits_teacher):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--method", "kd", "--epochs", "3", "--set", "temperature=2", "--out", str(out),
                            "--eval-test", "every_epoch"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert res["config"]["method"]["temperature"] == 2.0 and res["config"]["recipe"]["epochs"] == 3
    history = read_table(out / "epochs.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert res["metrics"]["test_top1"] == pytest.approx(history["test_top1"].iloc[-1])
    assert res["metrics"]["best_test_top1"] == pytest.approx(history["test_top1"].max())
    assert f"{res['metrics']['test_top1']:.2f} %" in r.output
    again = runner.invoke(app, ["train", "--epochs", "1", "--out", str(out)])
    _one_line_error(again, "already holds a result.json")


def _brute_front(points):
    keep = []
    for i, p in enumerate(points):
        keep.append(not any((q >= p).all() and (q > p).any() for j, q in enumerate(points) if j != i))
    return np.array(keep)


def test_tune_then_compare_json_front_is_the_non_dominated_full_rows(tmp_path, searched_run):
    out, r = searched_run  # `kdbench tune quick` (samples 5, two parameters, pareto ASHA)
    assert "Pareto front" in r.output and "Leaderboard" in r.output
    # Not a terminal: one plain line per finished trial, with its status, epochs and objectives; no redraws.
    from kdbench.results import read_table

    rows = read_table(out / "trials.csv")
    # The automatic rule on the tests' Ray (one declared GPU, concurrency 1): each trial held the whole GPU 0, one at
    # a time.
    assert set(rows["gpu_ids"].astype(str)) == {"0"}
    spans = rows.sort_values("started_at")[["started_at", "ended_at"]].to_numpy()
    assert (spans[1:, 0] >= spans[:-1, 1]).all()
    for row in rows.to_dict("records"):
        lines = [line for line in r.output.splitlines() if line.startswith(f"{row['trial_id']} {row['status']} after "
                                                                             f"{int(row['epochs'])} epochs: val_top1 ")]
        assert len(lines) == 1, (row["trial_id"], r.output[-3000:])
    # A terminal's live view (rich's recording console at each update): every trial had a row with its values, its
    # epoch k/3 and its val objectives while it ran; the ETA counts down the trial-epochs left.
    epochs = read_table(out / "epochs.csv")
    for row in rows.to_dict("records"):
        first = epochs[(epochs["trial_id"] == row["trial_id"]) & (epochs["epoch"] == 1)].iloc[0]
        seen = [line.split() for f in r.frames for line in f.splitlines() if line.startswith(row["trial_id"] + " ")]
        assert any(cells[3] == "1/3" and cells[5] == f"{first['val_top1']:.4g}" for cells in seen), (row, seen)
        assert seen[0][1:3] == [f"{row['geometry']:.4g}", f"{row['momentum']:.4g}"]
    assert r.frames[0].splitlines()[1].split()[:5] == ["trial", "geometry", "momentum", "epoch", "val"]
    assert "ETA" in r.frames[0] and "trial-epochs left at most" in r.frames[0] and "ETA" not in r.frames[-1]
    for name in ("trials.csv", "epochs.csv", "optuna.db", "front.csv", "pareto.png", "leaderboard.md", "geometry.png",
                 "curves.png"):
        assert (out / name).is_file(), name
    # Every full-fidelity trial kept its student's matrices, the folder the teacher's once; stopped ones none.
    import numpy as np

    full = rows[rows["status"] == "completed"]
    assert {p.stem for p in (out / "matrices").glob("*.npz")} == {*full["trial_id"], "teacher"}
    teacher = np.load(out / "matrices" / "teacher.npz")
    assert list(teacher["classes"]) == [str(i) for i in range(10)] and np.allclose(np.diag(teacher["val"]), 1, atol=1e-5)
    assert rows.loc[rows["status"] == "stopped", "test_map_at_r"].isna().all() and full["test_map_at_r"].between(0, 1).all()
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary files left behind
    meta = json.loads((out / "study.json").read_text())
    assert meta["ended"] and meta["environment"]["versions"]["ray"] and meta["study"]["search"]["samples"] == 5
    # Where the command's time went (the speed benchmark's breakdown): phases that add up within its span.
    t = meta["timings"]
    fit = t["search"]
    assert min(t["teacher"], t["ray_start"], t["ray_stop"], t["report"], *fit.values()) >= 0
    assert fit["to_first_trial"] + fit["tail"] + fit["after_last_trial"] <= fit["seconds"]
    assert t["teacher"] + t["ray_start"] + fit["seconds"] + t["ray_stop"] + t["report"] <= \
        t["command_ended"] - t["command_started"]

    r = runner.invoke(app, ["compare", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"leaderboard", "configurations", "front", "hypervolume", "reference_point", "knee", "front_stability",
            "importances", "moved_pairs", "payoff"} <= set(doc) and doc["payoff"] == {}  # 5 runs: too few
    trials = read_table(out / "trials.csv")
    assert trials["config_id"].str.fullmatch(r"[0-9a-f]{10}").all() and set(trials["stage"]) == {"search"}
    # The front is on configuration means of the validation split (one seed each here).
    full = trials[trials["fidelity"] == "full"]
    means = full.groupby("config_id")[["val_top1", "val_geom_corr"]].mean()
    mask = _brute_front(means.to_numpy())
    assert sorted(c["config_id"] for c in doc["front"]) == sorted(means.index[mask])
    assert doc["knee"]["config_id"] in {c["config_id"] for c in doc["front"]}
    assert doc["single_seed_on_front"] == [c["config_id"] for c in doc["front"]]  # every search point has one seed
    assert doc["front_stability"] is None  # nothing confirmed yet

    plot = tmp_path / "front.png"
    r = runner.invoke(app, ["compare", str(out), "--plot", str(plot), "--format", "md"])
    assert r.exit_code == 0 and plot.read_bytes()[:4] == b"\x89PNG"
    assert r.stdout.startswith("| # | config | method |") and "wrote" in r.stderr


def test_compare_skips_a_bad_folder_and_fails_when_nothing_is_readable(tmp_path, digits_teacher):
    good = tmp_path / "good"
    assert runner.invoke(app, ["train", "--method", "baseline", "--epochs", "1", "--out", str(good)]).exit_code == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "study.json").write_text("{ half-written")
    r = runner.invoke(app, ["compare", str(good), str(bad), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert "corrupt JSON" in r.output and "baseline" in r.output
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "study.json").write_text("{}")
    (torn / "trials.csv").write_bytes(b"trial_id,status\n\xff\xfe\x00")
    _one_line_error(runner.invoke(app, ["compare", str(bad)]), "bad/study.json: corrupt JSON")
    r = runner.invoke(app, ["compare", str(torn), str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "nothing readable" in r.output, r.output


def test_studies_lists_every_bundled_study():
    r = runner.invoke(app, ["studies"])
    assert r.exit_code == 0
    for name in ("digits", "digits-paper", "synthetic-search", "cifar100-paper", "cifar100-search"):
        assert name in r.output


@pytest.mark.parametrize("storage, fragment", [
    ("nosuchscheme://bucket/x", "allowed: a writable folder or a URI pyarrow understands"),
    ("/proc/kdbench-storage", "not writable"),
])
def test_bad_storage_is_one_line_and_creates_no_results_folder(tmp_path, storage, fragment, digits_teacher):
    out = tmp_path / "never"
    _one_line_error(runner.invoke(app, ["tune", "digits", "--out", str(out), "--storage", storage]),
                    f"--storage {storage}", fragment)
    assert not out.exists()


@pytest.mark.parametrize("text, fragment", [
    ('dataset = "digits"\n[grid]\nmethods = ["kd"]\nbogus = 1\n', "grid.bogus: unknown key"),
    ('dataset = "digits"\n[search]\nsamples = "many"\n[search.space.geometry]\nlow = 1.0\nhigh = 2.0\n',
     "search.samples = 'many'; allowed: an int"),
    ('dataset = "digits"\n[search]\n[search.space.geometry]\nlow = 5.0\nhigh = 2.0\n', "allowed: > low"),
    ('dataset = "digits"\n[search]\n', "search.space = {}; allowed: at least one parameter"),
    ('dataset = "digits"\nteacher = "giant"\n[grid]\n', "teacher = 'giant'"),
])
def test_bad_study_file_is_one_line_and_creates_no_results_folder(tmp_path, text, fragment):
    study = tmp_path / "bad.toml"
    study.write_text(text)
    out = tmp_path / "never"
    _one_line_error(runner.invoke(app, ["tune", str(study), "--out", str(out)]), "bad.toml", fragment)
    assert not out.exists()


def test_errors_and_notes_stay_one_line_in_a_pipe(tmp_path):
    """Piped stderr is never hard-wrapped: a long error is one line that grep finds whole."""
    import subprocess
    import sys

    (tmp_path / "F" / "train" / "a").mkdir(parents=True)
    (tmp_path / "F" / "test" / "a").mkdir(parents=True)
    name = "tv:" + "no_such_model_" * 10
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "train", "--dataset", f"folder:{tmp_path / 'F'}", "--student",
                        name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert name in r.stderr and len(r.stderr.strip()) > 200


def test_every_commands_help_shows_every_word_it_is_given():
    """Plain-text help: no word lost to markup ("[pairs]", "[METHOD.]KEY"), no line cut short; and the lists in it
    are the registries' (every preset, every --set key, every metric)."""
    import typer

    from kdbench.methods import METHODS
    from kdbench.metrics import METRICS
    from kdbench.values import FIELDS

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        r = runner.invoke(app, [name, "--help"], terminal_width=100)
        assert r.exit_code == 0 and "…" not in r.output, (name, r.output)
        shown = " ".join(r.output.split())
        for text in [command.help or ""] + [p.help or "" for p in command.params]:
            assert " ".join(text.split()) in shown, (name, text)
    train = " ".join(runner.invoke(app, ["train", "--help"]).output.split())
    assert all(f" {m}," in train or f" {m} " in train for m in METHODS) and all(k in train for k in FIELDS)
    tune = " ".join(runner.invoke(app, ["tune", "--help"]).output.split())
    assert "A study with [pairs] runs" in tune and all(m in tune for m in METRICS)
