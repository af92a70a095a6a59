import os
import tempfile

# Keep the tests' teacher cache out of the user's: one folder per test session.
os.environ["KDBENCH_CACHE"] = tempfile.mkdtemp(prefix="kdbench-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits():
    from kdbench.data import load_data

    return load_data("digits")


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """The default digits teacher (trained once per session, then cached)."""
    from kdbench.train import DATASET_DEFAULTS, get_teacher

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
