""""Extending kdbench" (README) holds: a copy of the package gets a toy term (its loss in losses.py, its entry in
terms.py, its weight and preset in methods.py) and a toy minimised metric (its function in geometry.py, its entry in
metrics.py), and nothing else; a real `kdbench tune` of that copy searches the term's weight with the metric as an
objective (two-objective ASHA minimising it), and `kdbench compare` ranks by it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

import kdbench

EDITS = {  # file -> (an anchor line in it, what goes after that line)
    "losses.py": ("from __future__ import annotations\n", None),  # appended at the end instead (see below)
    "terms.py": ('    "ctkd": Term(', '    "toy": Term(frozenset({"logits"}), lambda b, m, p: losses.toy(b.logits)),\n'),
    "methods.py": ("    ctkd_loops: float = setting(", "    toy: float = weight()\n"),
    "geometry.py": ("from __future__ import annotations\n", None),
    "metrics.py": ('    Metric("top1",', '    Metric("toy_spread", "spread of the features (a toy, minimised)", lambda o: __import__('
                                        '"kdbench.geometry").geometry.toy_spread(o.features), maximise=False, '
                                        'bounds=(0.0, math.inf)),\n'),
}
APPENDED = {
    "losses.py": '\n\ndef toy(student_logits):\n    """A toy loss: the mean squared logit."""\n'
                 '    return (student_logits ** 2).mean()\n',
    "geometry.py": '\n\ndef toy_spread(features) -> float:\n    """A toy measure: the features\' standard deviation."""\n'
                   '    return float(features.float().std())\n',
}
PRESET = ('    "ctkd": Method("ctkd", ce=0.1, ctkd=0.9),\n', '    "toy": Method("toy", ce=1.0, toy=0.1),\n')

STUDY = """
name = "toy"
dataset = "digits"
method = "toy"
[recipe]
epochs = 2
[search]
samples = 2
concurrency = 1
objectives = ["top1", "toy_spread"]
[search.space.toy]
type = "loguniform"
low = 0.001
high = 1.0
[asha]
grace_period = 1
reduction_factor = 2
rank = "pareto"
"""


def _copy_with_toys(root: Path) -> Path:
    pkg = root / "kdbench"
    shutil.copytree(Path(kdbench.__file__).parent, pkg, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    touched = set()
    for name, (anchor, line) in EDITS.items():
        f = pkg / name
        text = f.read_text()
        if line is not None:
            i = text.index(anchor)
            text = text[:i] + line + text[i:]
        text += APPENDED.get(name, "")
        if name == "methods.py":
            text = text.replace(PRESET[0], PRESET[0] + PRESET[1])
        f.write_text(text)
        touched.add(name)
    assert touched == {"losses.py", "terms.py", "methods.py", "geometry.py", "metrics.py"}  # README's list, no more
    return root


def test_a_toy_term_and_a_toy_minimised_metric_reach_a_tune_folder_compare_and_the_objectives(tmp_path, digits_teacher):
    root = _copy_with_toys(tmp_path / "copy")
    (tmp_path / "toy.toml").write_text(STUDY)
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = tmp_path / "out"
    # One process, the two commands a user would type: `kdbench tune toy.toml --out out`, `kdbench compare out
    # --format json` (the second's output alone on stdout, in out/compare.json).
    script = (f"from typer.testing import CliRunner; from kdbench.cli import app; import sys\n"
              f"r = CliRunner().invoke(app, ['tune', {str(tmp_path / 'toy.toml')!r}, '--out', {str(out)!r}])\n"
              f"assert r.exit_code == 0, r.output[-3000:]\n"
              f"r = CliRunner().invoke(app, ['compare', {str(out)!r}, '--format', 'json'])\n"
              f"assert r.exit_code == 0, r.output[-3000:]\n"
              f"open({str(out / 'compare.json')!r}, 'w').write(r.stdout)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    trials, epochs = pd.read_csv(out / "trials.csv"), pd.read_csv(out / "epochs.csv")
    assert {"toy", "val_toy_spread", "test_toy_spread"} <= set(trials.columns)  # the term's weight, the metric
    assert "loss_toy" in epochs.columns and epochs["val_toy_spread"].notna().all()  # every epoch: ASHA ranks by it
    full = trials[trials["fidelity"] == "full"]
    assert len(full) >= 1 and (full["test_toy_spread"] > 0).all() and (full["method"] == "toy").all()
    study = json.loads((out / "study.json").read_text())["study"]
    assert study["search"]["objectives"] == ["top1", "toy_spread"]
    import optuna

    directions = optuna.load_study(study_name="toy", storage=f"sqlite:///{out / 'optuna.db'}").directions
    assert directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]

    doc = json.loads((out / "compare.json").read_text())
    assert doc["objectives"] == ["top1", "toy_spread"]
    assert all("test_toy_spread_mean" in row for row in doc["leaderboard"])
    front = [p["test_toy_spread_mean"] for p in doc["front"]]
    assert front and all(v > 0 for v in front)
