import glob
import json
import os
import tempfile

# Keep the tests' teacher cache out of the user's: one folder per test run, made here by the first process that
# imports this file and inherited by pytest-xdist's workers (`make test` runs two, see below).
if "KDBENCH_TEST_CACHE" not in os.environ:
    os.environ["KDBENCH_TEST_CACHE"] = tempfile.mkdtemp(prefix="kdbench-test-cache-")
os.environ["KDBENCH_CACHE"] = os.environ["KDBENCH_TEST_CACHE"]
# Ray maps 127.0.0.1 to the machine's other address unless told it runs a loopback-only cluster (read when Ray is
# imported): the tests' Ray instances, and the drivers the tests connect to them, stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two workers on two cores: one thread each (a second thread would only fight the other worker for a core).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# Module fixtures that cost seconds: their tests run in one worker, so that the fixture is made once.
SHARED = ("two_workers", "trained")  # tests/test_parallel.py's gloo workers, tests/test_evaluate.py's students


def _group(item):
    """The Ray instance a test needs: "cluster" (the two-node cluster), "ray" (this process's), or None; or the
    costly module fixture (SHARED) it shares with its neighbours."""
    names = set(item.fixturenames)
    if names & set(SHARED):
        return next(n for n in SHARED if n in names)
    return "cluster" if "two_nodes" in names else "ray" if names & {"ray_session", "searched_run"} else None


def pytest_collection_modifyitems(config, items):
    """In one process, tests that need Ray run last (in their usual order), the cluster's before the local
    instance's: a live Ray instance in this process slows the CPU-bound tests that would run beside it. Tests
    marked slow run first among the others, so that under xdist the longest one never runs alone at the end.
    In an xdist worker, tell the controller each test's group (it sees only test ids): see
    pytest_xdist_make_scheduler."""
    items.sort(key=lambda item: ({"cluster": 1, "ray": 2}.get(_group(item), 0), item.get_closest_marker("slow") is None))
    if hasattr(config, "workerinput"):
        path = os.path.join(os.environ["KDBENCH_TEST_CACHE"], f"groups-{config.workerinput['workerid']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({item.nodeid: _group(item) for item in items if _group(item)}, f)
        os.replace(path + ".tmp", path)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, plain pytest runs everything in one process
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two xdist workers. All tests of one Ray instance go to one worker (one Ray start, one
    shared search), the two instances to different workers (the largest units go out first), and every other
    test is a unit of its own, handed to whichever worker runs low. (xdist's own --dist loadgroup cannot be used:
    it renames test ids, which pytest 9.2 no longer allows.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByRayInstance(LoadScopeScheduling):
        groups = None

        def _split_scope(self, nodeid):
            if self.groups is None:  # every worker has finished its collection when the scopes are asked for
                self.groups = {}
                for path in glob.glob(os.path.join(os.environ["KDBENCH_TEST_CACHE"], "groups-*.json")):
                    with open(path) as f:
                        self.groups |= json.load(f)
            return self.groups.get(nodeid, nodeid)

    return ByRayInstance(config, log)


@pytest.hookimpl(tryfirst=True)  # on the controller: after xdist has started the workers, inside pytest's timing
def pytest_collection(session):
    """Under xdist, the controller trains the default digits teacher into the shared cache while the workers
    start and collect: once, with both cores, instead of in one worker while the other waits for it. No worker
    runs a test before this returns: the controller hands tests out after its collection step."""
    if getattr(session.config.option, "numprocesses", None) and not hasattr(session.config, "workerinput"):
        _digits_teacher(_load("digits"))


def _load(name):
    from kdbench.data import load_data

    return load_data(name)


def _digits_teacher(digits):
    from kdbench.teacher import get_teacher
    from kdbench.settings import DATASET_DEFAULTS

    return get_teacher(digits, "cnn_teacher", DATASET_DEFAULTS["digits"]["recipe"])[0]


@pytest.fixture(autouse=True)
def _threads():
    """In-process commands (`kdbench train --threads 1` through CliRunner) set torch's thread count for the
    whole process: put it back, or every later test runs on one core."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    return _load("digits")


@pytest.fixture(scope="session")
def synthetic():
    return _load("synthetic")


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """The default digits teacher (trained once per test run, then cached)."""
    return _digits_teacher(digits)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (start-up costs seconds). It declares one GPU (and
    four logical CPUs), as a GPU machine's Ray would: every search here takes the GPU path of the scheduling —
    the automatic share of the one GPU per trial, the GPU ids in each row — while torch, which sees no CUDA,
    trains on the CPU."""
    import logging

    import ray

    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def two_nodes():
    """A real two-node Ray cluster on loopback (one CPU each), for every test that reaches a cluster (one worker)."""
    from ray.cluster_utils import Cluster

    # Two nodes of one CPU each, on loopback only (a test never listens on or contacts another address).
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def one_line_error(result, *fragments):
    """A CliRunner result that is bad input: exit 2, one line, no traceback, naming each fragment."""
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for f in fragments:
        assert f in text, text


def wandb_runs(folder) -> dict:
    """The W&B runs a folder's offline logs hold, read without W&B's client: run id -> one dict per offline run
    directory (a resumed run has one per process), in order: its name, group, config, history rows and summary.
    Each ``run-<id>.wandb`` is a LevelDB-format log (a 7-byte header, then records in 32 KiB blocks, each with a
    7-byte header: CRC, length, kind: full, first, middle or last) of W&B's ``Record`` protocol buffers."""
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    def records(data: bytes):
        assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
        pos, part = 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:  # zeros to the block's end
                pos += 32768 - pos % 32768
                continue
            part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                r = pb.Record()
                r.ParseFromString(part)
                part = b""
                yield r

    def items(updates):
        return {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in updates}

    runs = {}
    for d in sorted(p for p in (Path(folder) / "wandb").glob("offline-run-*") if not p.is_symlink()):
        (f,) = d.glob("run-*.wandb")
        run = {"history": [], "summary": {}}
        for r in records(f.read_bytes()):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run |= {"id": r.run.run_id, "name": r.run.display_name, "group": r.run.run_group,
                        "config": {k: v for k, v in items(r.run.config.update).items() if k != "_wandb"}}
            elif kind == "history":
                run["history"].append(items(r.history.item))
            elif kind == "summary":
                run["summary"] |= items(r.summary.update)
        if "id" in run:  # (a process killed before W&B wrote its first records leaves the header alone)
            runs.setdefault(run["id"], []).append(run)
    return runs


SEARCHED = ["tune", "quick", "--log", "tensorboard"]  # the bundled studies/quick.toml, as the README's tour runs it


@pytest.fixture(scope="session")
def searched_run(tmp_path_factory, ray_session, digits_teacher):
    """One finished search through the CLI (`kdbench tune quick --out DIR`, the README's line), shared: (folder,
    CliRunner result). Tests that write into a results folder work on a copy of it."""
    from typer.testing import CliRunner

    from kdbench.cli import app

    from rich.console import Console

    from kdbench import views

    root = tmp_path_factory.mktemp("searched")
    # What the terminal's live view shows at each update of the search, rendered by rich's recording console
    # (CliRunner is no terminal: the command itself prints its plain lines).
    frames, show = [], views.show_progress

    def recorded(live, state, printed):
        console = Console(record=True, width=200, file=open(os.devnull, "w"))
        console.print(live.renderable)
        frames.append(console.export_text())
        show(live, state, printed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(views, "show_progress", recorded)
        result = CliRunner().invoke(app, [*SEARCHED, "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    result.frames = frames
    return root / "out", result


@pytest.fixture
def searched(searched_run):
    return searched_run[0]
