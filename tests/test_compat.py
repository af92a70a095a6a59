"""Every committed results folder stays readable as it was: the same config ids from its study.json, the same
leaderboard from `kdbench compare` (byte for byte), whatever the code that reads them has become."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdbench.cli import app
from kdbench.results import read_folder
from kdbench.stats import interval_label
from kdbench.study import study_from_dict
from kdbench.trial import resolve_trial, row_config, trial_config_id

FOLDERS = sorted(p for p in (Path(__file__).resolve().parents[1] / "results").iterdir() if (p / "study.json").is_file())


def test_the_committed_folders_are_all_here():
    assert {p.name for p in FOLDERS} >= {"digits", "digits-paper", "digits-zoo", "synthetic-zoo"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_every_row_of_a_committed_folder_gets_its_config_id_again(folder):
    f = read_folder(folder)
    study = study_from_dict(f.study["study"])
    ids = [trial_config_id(study, *resolve_trial(study, row_config(r))[:2]) for r in f.trials.to_dict("records")]
    assert ids == list(f.trials["config_id"])


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_compare_prints_the_committed_leaderboard_byte_for_byte(folder):
    r = CliRunner().invoke(app, ["compare", str(folder), "--format", "md"])
    assert r.exit_code == 0, r.output
    assert r.stdout + f"\nIntervals: {interval_label('t')}.\n" == (folder / "leaderboard.md").read_text()


def test_a_field_added_later_is_in_no_id_until_a_run_sets_it():
    """What replaced a list of later fields to remember: schema 1's fields are frozen, any other enters an id only
    where it differs from its default."""
    import dataclasses

    from kdbench.settings import SCHEMA_1_FIELDS, Recipe, fields_dict

    newer = dataclasses.make_dataclass("Newer", [("shiny", float, dataclasses.field(default=0.5))], bases=(Recipe,),
                                       frozen=True)
    assert fields_dict(newer()) == fields_dict(Recipe()) and "shiny" not in SCHEMA_1_FIELDS
    assert fields_dict(newer(shiny=1.0)) == {**fields_dict(Recipe()), "shiny": 1.0}


def test_a_folder_is_read_at_the_current_schema_and_a_newer_one_is_one_line(tmp_path):
    import json
    import shutil

    from kdbench.results import SCHEMA, ResultsError

    assert read_folder(FOLDERS[0]).study["schema"] == SCHEMA  # schema 1 on disk (no "schema" key), migrated
    out = tmp_path / "f"
    shutil.copytree(FOLDERS[0], out)
    meta = json.loads((out / "study.json").read_text())
    (out / "study.json").write_text(json.dumps({**meta, "schema": SCHEMA + 1}))
    with pytest.raises(ResultsError, match=f"results schema {SCHEMA + 1}, newer than this kdbench reads"):
        read_folder(out)
