"""The README's and docs' code runs: every Python and shell block, in a fresh folder, unless it says why it cannot
here (a GPU, CIFAR, your own files, the set-up itself) in a `<!-- not run: ... -->` line just above it."""

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import SEARCHED
from kdbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
REASONS = ("GPU", "CIFAR", "your", "set-up", "make test")  # what a block may need that this machine has not


def blocks(lang: str):
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            if m["lang"] == lang:
                yield page.relative_to(ROOT), m["why"], m["code"]


def commands(code: str) -> list[list[str]]:
    """A shell block's kdbench command lines (continuations joined, comments dropped) as argument lists."""
    lines = code.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.strip().startswith("kdbench ")]


def test_every_block_runs_or_says_why_not():
    for lang in ("bash", "python"):
        for page, why, _ in blocks(lang):
            assert why is None or any(r in why for r in REASONS), (page, why)
    assert any(why is None for _, why, _ in blocks("bash"))  # the tour is run, not excused


@pytest.fixture
def workdir(tmp_path, searched):
    """A fresh folder with the committed results beside it, and the README's search already there: `kdbench tune
    quick --out runs/search` is the suite's shared search (conftest.SEARCHED), run once for every test."""
    (tmp_path / "results").symlink_to(ROOT / "results")
    shutil.copytree(searched, tmp_path / "runs" / "search")
    here = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(here)


def test_the_shell_blocks_run(workdir):
    runner = CliRunner()
    ran = 0
    for page, why, code in blocks("bash"):
        if why is not None:
            continue
        for args in commands(code):
            if args[:len(SEARCHED)] == SEARCHED:
                assert args[len(SEARCHED):] == ["--out", "runs/search"], args  # what the fixture copied here
                continue
            r = runner.invoke(app, args)
            assert r.exit_code == 0, (page, args, r.output)
            ran += 1
    assert ran >= 5
    assert (workdir / "runs" / "g1" / "result.json").is_file() and (workdir / "runs" / "measured" / "trials.csv").is_file()


def test_the_python_blocks_run(tmp_path, digits_teacher, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for page, why, code in blocks("python"):
        if why is None:
            exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out.split()
    assert len(printed) >= 3 and 0 <= float(printed[-3]) <= 100 and -1 <= float(printed[-2]) <= 1
