"""`kdbench tune`'s flags: the same study as the TOML that says the same, errors that name the flag, and a resume
that refuses a changed study. No data, no training: `--plan` and the study objects."""

import copy
import dataclasses

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from kdbench.cli import app
from kdbench.flags import Flags, base_table
from kdbench.pairs import load_studies
from kdbench.flags import differences
from kdbench.settings import Checkpointing, Evaluation, Resources
from kdbench.study import find_study, parse_study, read_toml

runner = CliRunner()
DIGITS = find_study("digits")


def _flags(**given) -> Flags:
    """The flags `kdbench tune` makes of these arguments (its options name the study keys they set)."""
    from kdbench.cli import tune

    return Flags.of(tune, given)


def _same(a, b):
    strip = lambda s: dataclasses.replace(s, path="", source={})
    assert strip(a) == strip(b)


def test_flags_make_the_study_that_the_equivalent_toml_makes():
    (flagged,) = load_studies(DIGITS, _flags(space=("geometry=loguniform:1:10000", "momentum=off",
                                                    "method=categorical:geometry,kd", "temperature=uniform:2:6:when=kd"),
                                             set_=("ce=0.5", "baseline.ce=0.9", "lr=0.1", "milestones=10,20"),
                                             epochs=40, samples=7, sampler="nsga2", objectives="top1,cka", no_asha=True,
                                             val_fraction=0.2, concurrency=3, cpus_per_trial=0.5))
    raw = copy.deepcopy(read_toml(DIGITS))  # the same edits, by hand
    raw["search"] |= {"samples": 7, "sampler": "nsga2", "objectives": ["top1", "cka"], "concurrency": 3}
    raw["search"]["space"] = {"geometry": {"type": "loguniform", "low": 1.0, "high": 10000.0},
                              "temperature": {"type": "uniform", "low": 2.0, "high": 6.0, "when": ["kd"]},
                              "method": {"type": "categorical", "choices": ["geometry", "kd"]}}
    raw["recipe"] |= {"epochs": 40, "lr": 0.1, "milestones": [10, 20]}
    raw["methods"] = {"geometry": {"ce": 0.5}, "baseline": {"ce": 0.9}}
    raw["data"]["val_fraction"] = 0.2
    raw["asha"]["enabled"] = False
    raw["resources"]["cpus_per_trial"] = 0.5
    _same(flagged, parse_study(raw, DIGITS))
    assert flagged.methods["geometry"].ce == 0.5 and flagged.methods["baseline"].ce == 0.9
    assert flagged.teacher_recipe.lr == 0.05 and flagged.recipe.milestones == (10, 20)  # the teacher's recipe stays
    assert [p.name for p in flagged.space] == ["geometry", "temperature", "method"]
    assert flagged.source["search"]["space"]["geometry"]["high"] == 10000.0  # what study.json records


def test_a_study_of_flags_alone_is_the_data_sets_defaults_and_the_default_search():
    (s,) = load_studies(None, _flags(dataset="synthetic", space=("geometry=loguniform:1:100",)),
                        base_table("synthetic", space=False))
    (d,) = load_studies(DIGITS)
    assert (s.name, s.path, s.dataset, s.search.sampler, s.search.samples, s.objectives) == \
        ("synthetic-search", "", "synthetic", d.search.sampler, d.search.samples, d.objectives)
    assert [(p.name, p.low, p.high) for p in s.space] == [("geometry", 1.0, 100.0)] and s.confirm is None
    (full,) = load_studies(None, _flags(dataset="synthetic"), base_table("synthetic"))
    assert [p.name for p in full.space] == [p.name for p in d.space]
    r = runner.invoke(app, ["tune", "--dataset", "synthetic", "--space", "geometry=loguniform:1:100", "--plan"])
    assert r.exit_code == 0 and "synthetic-search: synthetic" in r.stdout and "space: geometry loguniform 1..100;" in r.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--space", "zeta=uniform:0:1"], ["--space zeta=uniform:0:1: zeta: unknown parameter"]),
    (["--space", "geometry=loguniform:1000:1"], ["--space geometry=loguniform:1000:1: high = 1.0; allowed: > low (1000.0)"]),
    (["--space", "geometry=gauss:1:2"], ["distribution 'gauss' is unknown", "uniform, loguniform, int, categorical"]),
    (["--space", "geometry=uniform:1"], ["--space geometry=uniform:1: expected KEY=uniform:LOW:HIGH"]),
    (["--space", "geometry"], ["--space 'geometry': expected KEY=DIST:LOW:HIGH"]),
    (["--space", "temperature=int:1:8"], ["type = 'int'; allowed: uniform or loguniform"]),
    (["--space", "geometry=loguniform:1:10:when=zz"], ["when = 'zz'; allowed: baseline"]),
    (["--space", "lr=off"], ["lr is not searched"]),
    (["digits-paper", "--space", "geometry=uniform:1:2"], ["digits-paper.toml is a grid study"]),
    (["--set", "geometry=10"], ["--set geometry=10: geometry is searched for geometry", "--space geometry=off"]),
    (["--set", "kd.temperature=0"], ["--set kd.temperature=0: temperature = '0'; allowed: > 0"]),
    (["--set", "nope.ce=1"], ["method 'nope' is unknown"]),
    (["--set", "kd.lr=0.1"], ["lr is a recipe field"]),
    (["--space", "method=categorical:geometry,kd", "--set", "kd.temperature=3"], ["temperature is searched for kd"]),
    (["digits-paper", "--set", "ce=0.5"], ["the grid runs", "--set METHOD.ce=VALUE"]),
    (["--objectives", "top1,foo"], ["--objectives top1,foo: objectives = 'foo'"]),
    (["--objectives", "top1"], ["--objectives top1: objectives = ['top1']; allowed: two different metrics"]),
    (["--sampler", "cmaes"], ["--sampler cmaes: sampler = 'cmaes'; allowed: tpe, nsga2, gp, qmc, random"]),
    (["--samples", "0"], ["--samples 0: samples = 0; allowed: >= 1"]),
    (["--epochs", "2"], ["asha.grace_period = 3; allowed: <= recipe.epochs (2)"]),
    (["--dataset", "mnist"], ["--dataset mnist: dataset = 'mnist' is unknown"]),
    (["--teacher", "foo"], ["--teacher foo: teacher = 'foo' is unknown"]),
    (["cifar100-repdistiller", "--student", "resnet20"], ["runs [pairs]"]),
    (["--concurrency", "0"], ["--concurrency 0: allowed: >= 1"]),
    (["--precision", "fp16"], ["--precision: precision = 'fp16'; allowed: auto, bf16, fp32"]),
    (["--set", "compile_backend=tvm"], ["compile_backend = 'tvm'; allowed: inductor, aot_eager, cudagraphs"]),
    (["--set", "compile_backend=aot_eager", "--set", "compile_mode=max-autotune"],
     ["compile_mode = 'max-autotune'; allowed with compile_backend = 'inductor' only (here 'aot_eager')"]),
])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, ["tune", *args, "--out", str(out)]), *fragments)
    assert not out.exists()


def test_a_grid_may_grow_on_resume_and_a_changed_grid_is_named_in_a_short_line():
    from kdbench.study import find_study

    (s,) = load_studies(find_study("digits-zoo"))
    recorded = s.to_dict()
    older = copy.deepcopy(recorded)  # the folder ran without ctkd (and its version had no ctkd preset)
    older["grid"]["points"] = [g for g in older["grid"]["points"] if g[0] != "ctkd"]
    del older["methods"]["ctkd"]
    assert differences(older, s) == []  # the resume runs the 3 added runs
    fewer = dataclasses.replace(s, grid=dataclasses.replace(s.grid, points=tuple(g for g in s.grid.points if g[1] != 2)))
    (line,) = differences(recorded, fewer)
    assert line.startswith("grid.points: 23 gone (['baseline', 2, []], ['kd', 2, []], ['dkd', 2, []] and 20 more) since") and \
        len(line) < 160, line
    changed = copy.deepcopy(older)
    changed["methods"]["kd"]["temperature"] = 2.0  # what the folder's own runs are still compared
    assert differences(changed, s) == ["methods.kd.temperature = 4.0 now, 2.0 in the folder"]


def test_a_resume_compares_the_study_field_by_field_and_lets_only_the_how_much_change():
    (s,) = load_studies(DIGITS)
    recorded = s.to_dict()
    assert differences(recorded, s) == []
    more = dataclasses.replace(s, search=dataclasses.replace(s.search, samples=40, concurrency=1), path="/elsewhere",
                               resources=Resources(cpus_per_trial=2.0), checkpoint=Checkpointing(max_failures=3))
    assert differences(recorded, more) == []
    older = copy.deepcopy(recorded)  # a folder of an earlier version, which had fewer presets
    del older["methods"]["reviewkd"], older["methods"]["ofd"]
    assert differences(older, s) == []
    del older["evaluation"]  # a table that version did not record: unknown, not different
    assert differences(older, dataclasses.replace(s, evaluation=Evaluation(test="every_epoch"))) == []
    older["methods"]["geometry"]["temperature"] = 2.0  # but the method it trains is compared
    assert differences(older, s) == ["methods.geometry.temperature = 4.0 now, 2.0 in the folder"]
    (changed,) = load_studies(DIGITS, _flags(space=("geometry=loguniform:1:5000",), epochs=31))
    assert differences(recorded, changed) == ["recipe.epochs = 31 now, 30 in the folder",
                                              "search.space.geometry.high = 5000.0 now, 1000.0 in the folder"]


def test_a_new_flag_for_a_study_key_is_one_marked_option():
    """What "Extending kdbench" says: an option carrying StudyKey is a flag, checked as the study file's line is."""
    from typing import Annotated, Optional

    import typer

    from kdbench.settings import StudyKey
    from kdbench.study import StudyError

    def command(grace: Annotated[Optional[int], typer.Option("--grace"), StudyKey("asha.grace_period")] = None):
        """A command with one new flag."""

    (s,) = load_studies(DIGITS, Flags.of(command, {"grace": 2}))
    assert s.asha.grace_period == 2
    with pytest.raises(StudyError, match=r"^--grace 99: grace_period = 99; allowed: <= recipe.epochs"):
        load_studies(DIGITS, Flags.of(command, {"grace": 99}))
