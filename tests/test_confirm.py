"""`kdbench confirm`: fresh seeds for a search's best configurations and the presets, in the same folder."""

import json
import os
import shutil
import subprocess

import pandas as pd
import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from conftest import one_line_error
from kdbench.results import read_folder, read_table

runner = CliRunner()

def _copy(searched, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(searched, out)
    return out


_one_line_error = one_line_error


def test_confirm_adds_seeds_times_candidates_then_nothing_then_races_until_settled(searched, tmp_path):
    out = _copy(searched, tmp_path)
    search = read_table(out / "trials.csv")
    r = runner.invoke(app, ["confirm", str(out), "--seeds", "2", "--top", "1", "--with", "baseline"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "study.json").read_text())
    cands = meta["confirm"]["candidates"]
    after = read_table(out / "trials.csv")
    confirm = after[after["stage"] == "confirm"]
    assert len(confirm) == 2 * len(cands) and len(after) == len(search) + 2 * len(cands)
    assert set(confirm["seed"]) == {1, 2}  # never the search's seed 0
    assert {c["method"] for c in cands if c["from"] == "preset"} <= {"baseline"}
    assert sorted(set(confirm["config_id"])) == sorted(c["config_id"] for c in cands)
    # A confirmed search configuration is the same configuration as its search trial.
    searched_ids = set(search["config_id"])
    assert sum(c["config_id"] in searched_ids for c in cands) == 1
    assert (confirm["status"] == "completed").all() and (confirm["epochs"] == 3).all()  # no early stopping
    pd.testing.assert_frame_equal(after.head(len(search))[search.columns], search)  # the search is kept as it was

    before = (out / "trials.csv").read_bytes()
    again = runner.invoke(app, ["confirm", str(out), "--seeds", "2", "--top", "1", "--with", "baseline"])
    assert again.exit_code == 0 and "0 runs added" in again.output, again.output
    assert (out / "trials.csv").read_bytes() == before  # idempotent

    doc = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    confirmed = [c for c in doc["configurations"] if c["stage"] == "confirm"]
    assert len(confirmed) == len(cands)
    for c in confirmed:
        assert c["n_seeds"] == 2 and c["seeds"] == "1 2"
        assert c["test_top1_ci_low"] <= c["test_top1_mean"] <= c["test_top1_ci_high"]
        if c["method"] != "baseline":
            assert 0 <= c["p_improve_top1_vs_baseline"] <= 1
    assert doc["front_stability"]["of"] >= 1 and 0 <= doc["front_stability"]["kept"] <= doc["front_stability"]["of"]
    assert (out / "pareto.png").is_file() and (out / "slices.png").is_file()

    # Then racing on the same folder (one search configuration and the baseline, as above): its first round is
    # the confirmation just run; then one more seed for the configurations the seeds do not settle, at most 3
    # each; every configuration says why it stopped; a second run adds nothing. A round recorded in study.json
    # (as a kill mid-round leaves it) is finished as planned: only its missing runs.
    from kdbench.confirm import STOP_REASONS
    from kdbench.confirm import pending
    from kdbench.study import study_from_dict

    args = ["confirm", str(out), "--seeds", "2", "--top", "1", "--with", "baseline", "--until-settled", "--max-seeds", "3"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "study.json").read_text())["confirm"]
    rows = read_table(out / "trials.csv")
    confirm = rows[rows["stage"] == "confirm"]
    seeds = confirm.groupby("config_id")["seed"].apply(sorted).to_dict()
    assert all(s in ([1, 2], [1, 2, 3]) for s in seeds.values()), seeds  # fresh seeds, in order, never 0
    rounds = meta["rounds"]
    assert len(rounds[0]["pairs"]) == 2 * len(seeds) and all("front" in x for x in rounds)
    assert sum(len(x["pairs"]) for x in rounds) == len(confirm) and not confirm.duplicated(["config_id", "seed"]).any()
    if len(rounds) > 1:  # round 1 never settles alone (no earlier front to compare with): the front got a seed
        assert set(rounds[0]["front"]) <= {c for c, _ in rounds[1]["pairs"]}
    settled = meta["settled"]
    assert set(settled) == set(seeds) and all(v["stop"] in STOP_REASONS and v["seeds"] == len(seeds[c])
                                              for c, v in settled.items())
    assert {c for c, v in settled.items() if v["stop"] == "separated"} <= set(rounds[-1]["front"])
    assert f"over {len(rounds)} rounds" in r.output

    before = (out / "trials.csv").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 runs added" in again.output, again.output
    assert (out / "trials.csv").read_bytes() == before
    doc = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    assert doc["interval_method"] == "t" and {r["config_id"]: r["stop"] for r in doc["leaderboard"]
                                               if r.get("stop")} == {c: v["stop"] for c, v in settled.items()}
    assert all(0 <= c["p_on_front"] <= 1 for c in doc["configurations"])

    # A recorded round with one run done and one not: only the missing one is planned, nothing re-decided.
    study = study_from_dict(json.loads((out / "study.json").read_text())["study"])
    trials = read_folder(out).trials
    from kdbench.study import Confirm

    c = Confirm(2, 2, ("baseline",), True, 4)
    cid = next(iter(seeds))
    recorded = {"rounds": rounds + [{"pairs": [[cid, seeds[cid][0]], [cid, 7]]}]}
    todo, _, decision = pending(study, trials, c, recorded, str(out))
    assert [(t["config_id"], t["seed"]) for t in todo] == [(cid, 7)] and decision is None

    # Asked again another way after the race (no presets, or a subset of them): a new plan, nothing to add, the
    # racing verdicts kept -- never a traceback (a recorded round's preset is not among the new candidates).
    before = (out / "trials.csv").read_bytes()
    for presets in ("none", "baseline"):
        r = runner.invoke(app, ["confirm", str(out), "--seeds", "2", "--top", "1", "--with", presets])
        assert r.exit_code == 0 and "0 runs added" in r.output, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert (out / "trials.csv").read_bytes() == before
    assert json.loads((out / "study.json").read_text())["confirm"]["settled"] == settled
    # Any presets, against the raced rounds recorded (planning only: no run): never a pair it did not pick.
    recorded = json.loads((out / "study.json").read_text())["confirm"]
    for presets in ((), ("kd",), ("baseline", "kd")):
        todo, picked, _ = pending(study, read_folder(out).trials, Confirm(2, 1, presets, False, 8), recorded, str(out))
        assert {t["config_id"] for t in todo} <= {p["config_id"] for p in picked}, presets


def test_config_id_of_an_old_folder_is_derived_the_same_way(searched, tmp_path):
    """Folders written before config_id existed get it from their rows, identical to what is written now."""
    out = _copy(searched, tmp_path)
    written = read_table(out / "trials.csv")
    written.drop(columns=["config_id", "stage"]).to_csv(out / "trials.csv", index=False)
    derived = read_folder(out).trials
    assert derived["config_id"].tolist() == written["config_id"].tolist()
    assert set(derived["stage"]) == {"search"}



def test_settle_gives_the_front_and_its_overlapping_rivals_one_more_seed():
    """a and b: b dominated by a on means, intervals overlapping; c far below (dominated, separated)."""
    from types import SimpleNamespace

    from kdbench.confirm import settle
    from kdbench.study import Confirm

    runs = {"a": [(97, 0.90), (98, 0.92), (96, 0.91)], "b": [(96.5, 0.89), (97.5, 0.90), (96, 0.91)],
            "c": [(80, 0.50), (81, 0.51), (80.5, 0.52)]}
    trials = pd.DataFrame([{"trial_id": f"{c}{i}", "config_id": c, "stage": "confirm", "seed": i + 1, "method": "m",
                            "status": "completed", "fidelity": "full", "val_top1": t, "val_geom_corr": g}
                           for c, v in runs.items() for i, (t, g) in enumerate(v)]
                          + [{"trial_id": "s", "config_id": "a", "stage": "search", "seed": 0, "method": "m",
                              "status": "completed", "fidelity": "full", "val_top1": 99, "val_geom_corr": 0.99}])
    study = SimpleNamespace(objectives=("top1", "geom_corr"))
    d = settle(study, trials, ["a", "b", "c"], Confirm(3, 1, (), True, 8), None)
    assert d["front"] == ["a"] and d["next"] == [("a", 4), ("b", 4)] and not d["settled"]  # seed 4: 0 is the search's
    assert d["reasons"] == {"a": "max seeds", "b": "max seeds", "c": "dominated"}  # what they would be if it ended now
    d = settle(study, trials, ["a", "b", "c"], Confirm(3, 1, (), True, 3), ["a"])
    assert d["next"] == [] and d["reasons"]["b"] == "max seeds"  # at max_seeds: nothing more
    d = settle(study, trials, ["a", "c"], Confirm(3, 1, (), True, 8), ["a"])
    assert d["settled"] and d["next"] == [] and d["reasons"] == {"a": "separated", "c": "dominated"}


@pytest.mark.parametrize("args, fragments", [
    (["--seeds", "0"], ["--seeds 0", "allowed: an integer >= 1"]),
    (["--until-settled", "--max-seeds", "2"], ["--max-seeds 2", "allowed: an integer >= --seeds (3)"]),
    (["--until-settled", "--min-seeds", "4", "--max-seeds", "3"], ["--max-seeds 3", ">= --min-seeds (4)"]),
    (["--top", "0"], ["--top 0", "allowed: an integer >= 1"]),
    (["--with", "kd,magic"], ["--with 'magic': unknown preset", "baseline"]),
    (["--concurrency", "0"], ["--concurrency 0"]),
])
def test_bad_options_are_one_line_and_write_nothing(searched, tmp_path, args, fragments):
    out = _copy(searched, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _one_line_error(runner.invoke(app, ["confirm", str(out), *args]), *fragments)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_folders_are_one_line_and_write_nothing(searched, tmp_path):
    # Not a results folder; a grid; a single train run.
    _one_line_error(runner.invoke(app, ["confirm", str(tmp_path)]), "no study.json")
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "study.json").write_text(json.dumps({"name": "g", "kind": "grid"}))
    _one_line_error(runner.invoke(app, ["confirm", str(grid)]), "not a search", "a grid needs no confirmation")

    # A search still being written: the lock of a live process.
    out = _copy(searched, tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".kdbench.lock").write_text(f"{sleeper.pid} tune\n")
        before = (out / "trials.csv").read_bytes()
        _one_line_error(runner.invoke(app, ["confirm", str(out)]), "still running", str(sleeper.pid))
        assert (out / "trials.csv").read_bytes() == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same lock once its process is gone (kill -9) is stale: taken over, not an error.
    from kdbench.results import FolderLock

    assert FolderLock(out, "confirm").holder() is None
    with FolderLock(out, "confirm"):
        assert (out / ".kdbench.lock").read_text().split()[0] == str(os.getpid())
    assert not (out / ".kdbench.lock").exists()

    # A search that never finished.
    out2 = _copy(searched, tmp_path / "b")
    meta = json.loads((out2 / "study.json").read_text())
    (out2 / "study.json").write_text(json.dumps({**meta, "ended": None}))
    _one_line_error(runner.invoke(app, ["confirm", str(out2)]), "has not finished", "--resume")

    # Another study's trials under this study.json.
    out3 = _copy(searched, tmp_path / "c")
    t = read_table(out3 / "trials.csv")
    t.loc[t["status"] == "completed", "geometry"] *= 2
    t.to_csv(out3 / "trials.csv", index=False)
    before = (out3 / "trials.csv").read_bytes()
    _one_line_error(runner.invoke(app, ["confirm", str(out3)]), "does not match the study in study.json")
    assert (out3 / "trials.csv").read_bytes() == before


def test_train_names_the_same_configuration_as_tune_and_measures_geometry_for_baseline(searched, tmp_path):
    row = read_table(searched / "trials.csv").iloc[0]
    out = tmp_path / "one"
    r = runner.invoke(app, ["train", "--method", "geometry", "--epochs", "3", "--set", f"geometry={float(row['geometry'])!r}",
                            "--set", f"momentum={float(row['momentum'])!r}", "--seed", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "result.json").read_text())["config_id"] == row["config_id"]
    base = tmp_path / "base"
    r = runner.invoke(app, ["train", "--method", "baseline", "--epochs", "1", "--out", str(base)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((base / "result.json").read_text())["metrics"]
    assert -1 <= metrics["test_geom_corr"] <= 1 and 0 <= metrics["test_cka"] <= 1 and metrics["test_geom_err"] >= 0
    assert "geom_corr" in r.output


def test_every_row_records_where_it_ran_and_rerun_reproduces_it_bit_for_bit(searched, tmp_path):
    from kdbench.rerun import rerun_trial

    t = read_folder(searched).trials  # ids as text: this node's id may be all digits
    assert (t["threads"] == 1).all() and (t["device"] == "cpu").all() and t["node"].str.len().eq(12).all()
    done, stopped = t[t["status"] == "completed"].iloc[0], t[t["status"] == "stopped"]
    r = runner.invoke(app, ["rerun", str(searched), str(done["trial_id"])])
    assert r.exit_code == 0 and "identical to the recorded trial, bit for bit" in r.output, r.output
    if len(stopped):  # a trial ASHA stopped reruns up to its epoch, on the full run's schedule
        res = rerun_trial(searched, str(stopped["trial_id"].iloc[0]))
        assert res["epochs"] < 3 and res["rerun"] == res["recorded"] and "val_top1" in res["rerun"]
        assert "test_top1" not in res["recorded"]  # test is evaluated at the end, which a stopped trial never reaches
    _one_line_error(runner.invoke(app, ["rerun", str(searched), "nope"]), "no trial 'nope'", "allowed: a trial_id")
    _one_line_error(runner.invoke(app, ["rerun", str(searched), str(done["trial_id"]), "--threads", "0"]), "--threads 0")
    _one_line_error(runner.invoke(app, ["rerun", str(tmp_path), "x"]), "no study.json")
    _one_line_error(runner.invoke(app, ["train", "--threads", "0"]), "--threads 0")
