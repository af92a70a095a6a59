"""A real two-node Ray cluster on 127.0.0.1: `kdbench tune --address` spreads the trials over both."""

import os
import subprocess
import sys

import pandas as pd
import pytest


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    # Two nodes of one CPU each, on loopback only (a test never listens on or contacts another address).
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_tune_on_a_two_node_cluster_runs_trials_on_both_nodes(tmp_path, two_nodes, digits_teacher):
    study = tmp_path / "two.toml"
    study.write_text("""
name = "two"
dataset = "digits"
[recipe]
epochs = 1
[grid]
methods = ["baseline", "kd"]
seeds = [0, 1]
concurrency = 2
""")
    out = tmp_path / "out"
    # Ray maps 127.0.0.1 to the machine's other address unless told this is a loopback-only cluster:
    # the setting lives in the test's environment, never in kdbench.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    r = subprocess.run([sys.executable, "-m", "kdbench.cli", "tune", str(study), "--out", str(out),
                        "--address", two_nodes.address], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    # Each node has one CPU and two trials run at once: both nodes must have run trials, and the rows say which.
    assert trials["node"].nunique() == 2 and trials["node"].str.len().eq(12).all()
    assert not (out / "ray").exists()  # checkpoints went with the finished trials
