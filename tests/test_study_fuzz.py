"""The study reader never tracebacks: random mutations of every bundled study (keys dropped, renamed, retyped, out of
range; tables nested wrongly, flattened, replaced by values) each give a valid study or one StudyError line, which
the command line prints as one line with exit code 2 (tests/test_cli.py)."""

import copy
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdbench.pairs import load_studies
from kdbench.study import StudyError, bundled_studies, read_toml

STUDIES = bundled_studies()
# Per study: 1,200 mutated studies in all, derandomised (the same ones on every run); KDBENCH_FUZZ_EXAMPLES=3000 runs
# 36,000 (clean on December 3, 85 s).
EXAMPLES = int(os.environ.get("KDBENCH_FUZZ_EXAMPLES", 100))

VALUES = st.one_of(st.booleans(), st.integers(-3, 10 ** 6), st.sampled_from([2 ** 63, -(2 ** 63) - 1]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.sampled_from(["geometry", "kd", "top1", "tpe", "loguniform", "cnn_student", "digits", "every_epoch"]),
                   st.lists(st.one_of(st.integers(-2, 50), st.text(max_size=4)), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(-1, 5), max_size=2))
EDGES = [-1, 0, -0.5, 0.0, 1, 1e-12, 1e9, 10 ** 12, float("nan"), float("inf"), -float("inf")]
KEYS = st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["search", "grid", "space", "recipe", "asha", "data",
                                                                   "methods", "confirm", "epochs", "samples", "low"]))


def _paths(node, prefix=()):
    """Every place in a TOML table: keys of tables, indices of lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


@st.composite
def mutants(draw, raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    for _ in range(draw(st.integers(1, 3))):
        places = list(_paths(raw))
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        op = draw(st.sampled_from(["drop", "rename", "retype", "range", "nest", "flatten", "move"]))
        if isinstance(parent, list):
            op = "retype" if op in ("drop", "rename", "flatten", "move") else op
        if op == "drop":
            del parent[key]
        elif op == "rename":
            parent[draw(KEYS)] = parent.pop(key)
        elif op == "retype":
            parent[key] = draw(VALUES)
        elif op == "range":
            parent[key] = draw(st.sampled_from(EDGES))
        elif op == "nest":  # a table where a value (or another table) was
            parent[key] = {draw(KEYS): parent[key]}
        elif op == "flatten" and isinstance(parent[key], dict):  # a table's keys one level up
            parent.update(parent.pop(key))
        elif op == "move":  # a value or table under another table
            value = parent.pop(key)
            tables = [p for p in [(), *_paths(raw)] if isinstance(_at(raw, p), dict)]
            _at(raw, draw(st.sampled_from(tables)))[key] = value
    return raw


def _at(raw, path):
    for k in path:
        raw = raw[k]
    return raw


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_every_mutation_of_a_bundled_study_is_a_study_or_one_line(name):
    path = STUDIES[name]
    raw = read_toml(path)

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutants(raw))
    def check(mutant):
        try:
            studies = load_studies(path, None, mutant)
        except StudyError as e:
            message = str(e)
            assert message.strip() and "\n" not in message, message
        else:
            assert studies and all(s.trial_count() >= 1 for s in studies)

    check()
