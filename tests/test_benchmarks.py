"""The benchmark harness (``python -m benchmarks``): what a run cut short or a failing figure leaves behind."""

from __future__ import annotations

import json

from benchmarks import bench
from benchmarks.__main__ import main


def test_a_failing_figure_is_reported_and_the_others_are_kept(tmp_path, monkeypatch):
    """A lent GPU's run must not lose its figures to one that breaks: the error is a figure, the run goes on to
    the next, exits 1, and the JSON (written after every figure) holds both."""
    def broken(*_):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(bench, "data_path", lambda device, repeats: {"data_path_speedup": [2.0, 4.0, 3.0]})
    monkeypatch.setattr(bench, "geometry_overhead", broken)
    path = tmp_path / "out.json"
    assert main(["--only", "geometry,data", "--json", str(path)]) == 1
    figures = json.loads(path.read_text())
    assert figures["geometry_overhead_error"] == "RuntimeError: no such kernel"
    assert figures["data_path_speedup"]["median"] == 3.0 and figures["data_path_speedup"]["n"] == 3
    assert 2.0 <= figures["data_path_speedup"]["ci_low"] <= 3.0 <= figures["data_path_speedup"]["ci_high"] <= 4.0
    assert figures["meta"]["gpu"] is None and figures["meta"]["device"] == "cpu"
