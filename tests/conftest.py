import os
import tempfile

# Keep the tests' teacher cache out of the user's: one folder per test session.
os.environ["KDBENCH_CACHE"] = tempfile.mkdtemp(prefix="kdbench-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


RAY = {"ray_session", "searched_run", "searched", "two_nodes"}  # the fixtures that start Ray or a cluster


def pytest_collection_modifyitems(items):
    """Tests that need Ray run last (in their usual order): a live Ray instance in this process slows the
    CPU-bound tests that would otherwise run beside it."""
    items.sort(key=lambda item: bool(RAY & set(item.fixturenames)))


@pytest.fixture(autouse=True)
def _threads():
    """In-process commands (`kdbench train --threads 1` through CliRunner) set torch's thread count for the
    whole process: put it back, or every later test runs on one core."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    from kdbench.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def synthetic():
    from kdbench.data import load_data

    return load_data("synthetic")


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """The default digits teacher (trained once per session, then cached)."""
    from kdbench.teacher import get_teacher
    from kdbench.train import DATASET_DEFAULTS

    teacher, _ = get_teacher(digits, "cnn_teacher", DATASET_DEFAULTS["digits"]["recipe"])
    return teacher


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (start-up costs seconds)."""
    import ray

    from kdbench.search import _init_ray

    _init_ray(None, verbose=False)
    yield
    ray.shutdown()


def one_line_error(result, *fragments):
    """A CliRunner result that is bad input: exit 2, one line, no traceback, naming each fragment."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for f in fragments:
        assert f in text, text


SEARCHED = """
name = "c"
dataset = "digits"
[recipe]
epochs = 3
[search]
samples = 5
[search.space.geometry]
type = "loguniform"
low = 1.0
high = 1000.0
[search.space.momentum]
type = "uniform"
low = 0.0
high = 0.99
[asha]
grace_period = 1
reduction_factor = 2
rank = "pareto"   # the two-objective stopping rule (a search's default), for real in Ray
"""


@pytest.fixture(scope="session")
def searched_run(tmp_path_factory, ray_session, digits_teacher):
    """One finished search through the CLI (`kdbench tune`), shared: (folder, CliRunner result). Tests that
    write into a results folder work on a copy of it."""
    from typer.testing import CliRunner

    from kdbench.cli import app

    root = tmp_path_factory.mktemp("searched")
    (root / "c.toml").write_text(SEARCHED)
    result = CliRunner().invoke(app, ["tune", str(root / "c.toml"), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out", result


@pytest.fixture
def searched(searched_run):
    return searched_run[0]
