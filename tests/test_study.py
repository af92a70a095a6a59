import dataclasses

import pytest

from kdbench.study import StudyError, apply_overrides, bundled_studies, find_study, load_study, parse_sets
from kdbench.methods import METHODS
from kdbench.settings import Recipe

BASE = """
name = "t"
dataset = "digits"
method = "geometry"
[recipe]
epochs = 6
[search]
samples = 4
[search.space.geometry]
type = "loguniform"
low = 1.0
high = 100.0
"""


def _write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_bundled_study_loads():
    studies = bundled_studies()
    assert {"digits", "digits-paper", "synthetic-search", "cifar100-paper", "cifar100-search"} <= set(studies)
    from kdbench.pairs import load_studies

    for path in studies.values():
        for s in load_studies(path):
            assert s.trial_count() >= 1 and s.recipe.epochs >= 1


def test_paper_study_carries_the_papers_recipe_and_table():
    s = load_study(find_study("cifar100-paper"))
    assert (s.teacher, s.student, s.recipe.epochs, s.recipe.batch_size) == ("resnet50", "resnet18", 30, 64)
    assert dict(s.reference) == {"teacher": 72.81, "baseline": 74.64, "kd": 76.13, "feature": 76.00, "geometry": 75.81}
    assert sorted({m for m, _, _ in s.grid.points}) == ["baseline", "feature", "geometry", "kd"] and len(s.grid.points) == 12


def test_grid_is_methods_times_seeds_times_values(tmp_path):
    p = _write(tmp_path, """
dataset = "digits"
[grid]
methods = ["kd", "geometry"]
seeds = [0, 1]
[grid.values]
temperature = [2, 4, 8]
""")
    s = load_study(p)
    assert s.is_grid and s.trial_count() == 2 * 2 * 3
    assert ("kd", 1, (("temperature", 8.0),)) in s.grid.points
    assert s.asha.rank == "top1"  # a grid's objectives are nominal; a search's ASHA ranks on both of them
    assert load_study(_write(tmp_path, BASE)).asha.rank == "pareto"


def test_grid_points_are_listed_configurations_times_seeds(tmp_path):
    p = _write(tmp_path, """
dataset = "digits"
method = "geometry"
[grid]
seeds = [0, 1]
points = [{geometry = 3, temperature = 2.0}, {geometry = 30.0, momentum = 0.5}]
""")
    s = load_study(p)
    assert s.grid.points == (("geometry", 0, (("geometry", 3.0), ("temperature", 2.0))),
                             ("geometry", 0, (("geometry", 30.0), ("momentum", 0.5))),
                             ("geometry", 1, (("geometry", 3.0), ("temperature", 2.0))),
                             ("geometry", 1, (("geometry", 30.0), ("momentum", 0.5))))
    for bad, match in (("momentum = 0.5", r"grid.points\[1\].momentum: momentum = 1.5; allowed: >= 0"),
                       ("points = [", r"grid.points = \[3, .*allowed: a list of dicts")):
        text = p.read_text().replace(bad, "momentum = 1.5" if "momentum" in bad else "points = [3, ")
        with pytest.raises(StudyError, match=match):
            load_study(_write(tmp_path, text))
    with pytest.raises(StudyError, match=r"grid.points = '...'; allowed: either \[grid.values\]"):
        load_study(_write(tmp_path, p.read_text() + "[grid.values]\ngeometry = [1.0]\n"))


def test_find_study_by_name_and_path(tmp_path):
    assert find_study("digits").name == "digits.toml"
    p = _write(tmp_path, BASE)
    assert find_study(str(p)) == p
    with pytest.raises(StudyError, match="bundled: "):
        find_study("no-such-study")


@pytest.mark.parametrize("old, new, match", [
    ('dataset = "digits"', 'dataset = "mnist"', r"s.toml: dataset = 'mnist' is unknown; allowed: digits, synthetic"),
    ('dataset = "digits"', 'dataset = "digits"\nstudent = "vgg"', r"student = 'vgg' is unknown; allowed: resnet8, resnet14, .*ShuffleV2"),
    ('method = "geometry"', 'method = "magic"', r"s.toml: method = 'magic'; allowed: baseline"),
    ("epochs = 6", "epochs = 6\nlr = -1", r"s.toml: recipe: lr = -1; allowed: > 0"),
    ("epochs = 6", "epochs = 6\nbatch_size = 1", r"batch_size = 1; allowed: >= 2"),
    ("[search]", "[methods.geometry]\nmomentum = 1.5\n[search]", r"methods.geometry: momentum = 1.5; allowed: >= 0"),
    ("[search]", "[methods.kd]\ntemperature = 'hot'\n[search]", r"temperature = 'hot'; allowed: a number"),
    ("samples = 4", 'samples = 4\nsampler = "grid"', r"search.sampler = 'grid'; allowed: tpe, nsga2, gp, qmc, random"),
    ("[search]", '[results]\nkeep_students = "best"\n[search]', r"s.toml: results.keep_students = 'best'; allowed: full, front, none"),
    ("[search]", "[confirm]\nuntil_settled = true\nmax_seeds = 2\n[search]", r"max_seeds 2: allowed: an integer >= .*confirm.seeds \(3\)"),
    ('type = "loguniform"', 'type = "normal"', r"search.space.geometry.type = 'normal'; allowed: uniform"),
    ("high = 100.0", "high = 0.5", r"search.space.geometry.high = 0.5; allowed: > low"),
    ("[search.space.geometry]", "[search.space.wings]", r"search.space.wings: unknown parameter"),
    ("[search]", "[asha]\ngrace_period = 99\n[search]", r"asha.grace_period = 99; allowed: <= recipe.epochs"),
    ("[search]", "[checkpoint]\nmax_failures = -1\n[search]", r"checkpoint.max_failures = -1; allowed: >= 0"),
    ("[search]", "[asha]\nrank = 'hv'\n[search]", r"asha.rank = 'hv'; allowed: top1, pareto"),
    ("[search]", "[checkpoint]\nevery = -2\n[search]", r"checkpoint.every = -2; allowed: >= 0"),
    ("[search]", "[checkpoint]\nminutes = -5\n[search]", r"checkpoint.minutes = -5.0; allowed: >= 0.0"),
    ("[search]", "[checkpoint]\nhours = 5\n[search]", r"checkpoint.hours: unknown key"),
    ("[search]", "[confirm]\nseeds = 0\n[search]", r"confirm.seeds 0: allowed: an integer >= 1"),
    ("[search]", "[confirm]\nwith = ['magic']\n[search]", r"confirm.with 'magic': unknown preset"),
    ('name = "t"', 'name = "t"\ncolour = "red"', r"s.toml: colour: unknown key"),
    ("[search]", "[data]\nimage_size = 16\n[search]", r"s.toml: data: image_size = 16; allowed only for image folders"),
    ("[search]", "[data]\nval_fraction = 1.5\n[search]", r"data: val_fraction = 1.5; allowed: a number >= 0 and < 1"),
    ("[search]", "[data]\nzoom = 2\n[search]", r"data: data option 'zoom' is unknown; allowed: val_fraction"),
    ('dataset = "digits"', 'dataset = "folder:"', r"dataset = 'folder:' is unknown; allowed: .*folder:PATH"),
    ("[search]", "[grid]\n[search]", r"needs exactly one of \[search\]"),
    ("[search]", "[resources]\nworkers_per_trial = 2\ngpus_per_trial = 0.5\n[search]",
     r"s.toml: resources.gpus_per_trial = 0.5; allowed: whole GPUs with workers_per_trial = 2: each worker needs its own"),
])
def test_bad_values_name_file_key_value_and_what_is_allowed(tmp_path, old, new, match):
    assert old in BASE
    with pytest.raises(StudyError, match=match):
        load_study(_write(tmp_path, BASE.replace(old, new, 1)))


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(_write(tmp_path, "this is = = not toml"))
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "missing.toml")


def test_overrides_set_any_weight_or_recipe_field():
    m, r = apply_overrides(METHODS["geometry"], Recipe(), parse_sets(["geometry=10", "temperature=2", "epochs=3",
                                                                      "schedule=step"]), "--set")
    assert (m.geometry, m.temperature, m.kd, r.epochs, r.schedule) == (10.0, 2.0, 0.9, 3, "step")
    assert dataclasses.replace(m, geometry=100.0, temperature=4.0) == METHODS["geometry"]
    with pytest.raises(StudyError, match="key 'zeta' is unknown; allowed: ce, kd"):
        apply_overrides(METHODS["kd"], Recipe(), {"zeta": "1"}, "--set")
    with pytest.raises(StudyError, match="epochs = '2.5'; allowed: a number \\(int\\)"):
        apply_overrides(METHODS["kd"], Recipe(), {"epochs": "2.5"}, "--set")
    with pytest.raises(StudyError, match="expected KEY=VALUE"):
        parse_sets(["geometry"])


def test_new_method_combination_from_a_base(tmp_path):
    p = _write(tmp_path, BASE + '\n[methods.geo_feat]\nbase = "geometry"\nfeature = 0.5\n')
    s = load_study(p)
    assert s.methods["geo_feat"].feature == 0.5 and s.methods["geo_feat"].geometry == 100.0
    assert s.methods["geo_feat"].name == "geo_feat"
