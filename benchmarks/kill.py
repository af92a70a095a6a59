"""Fault tolerance, measured: kill -9 `kdbench tune` at random moments, resume each time, check what survived.

    python -m benchmarks.kill [--kills 5] [--seed 0] [--json PATH]

A small digits search (16 trials of 12 epochs, 2 at a time, a checkpoint every epoch) is started in a
subprocess and killed with SIGKILL at a random moment (0-6 s after the run's first new checkpoint);
then `kdbench tune --resume` continues it, and is killed again, `--kills` times, before a last resume
runs to the end. Checked at the end:

- no finished trial is lost: every row written before a kill is in the final table, unchanged;
- each interrupted trial continued from its latest checkpoint (``resumed_from`` at least the epoch of
  the checkpoint found right after the kill: a worker of the killed run may still persist one more),
  so a kill costs at most the epoch each running trial was in;
- the final table is complete (16 trials, unique ids, no configuration trained twice) and no
  checkpoint is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from kdbench import checkpoints
from kdbench.results import read_table

STUDY = """
name = "kill"
dataset = "digits"
method = "geometry"
[recipe]
epochs = 12
[search]
samples = 16
concurrency = 2
[search.space.geometry]
type = "loguniform"
low = 1.0
high = 1000.0
[asha]
enabled = false
[checkpoint]
every = 1
"""


def _rows(out: Path) -> pd.DataFrame:
    p = out / "trials.csv"
    return read_table(p) if p.exists() and p.stat().st_size else pd.DataFrame()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kill", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kdbench-kill-"))
    (root / "kill.toml").write_text(STUDY)
    out = root / "out"
    cmd = [sys.executable, "-m", "kdbench.cli", "tune", str(root / "kill.toml"), "--out", str(out)]
    kills, finished_before, last_ckpt = [], {}, {}
    for k in range(args.kills + 1):
        proc = subprocess.Popen(cmd + (["--resume"] if k else []), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k == args.kills:  # the last run goes to the end
            rc = proc.wait()
            break
        # Kill at a random moment once this run's trials train (start-up takes seconds): after its first
        # new checkpoint or finished trial.
        started, before = time.time(), (checkpoints.find(str(out / "ray")), len(_rows(out)))
        while time.time() - started < 120 and (checkpoints.find(str(out / "ray")), len(_rows(out))) == before:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 6.0))
        delay = time.time() - started
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = _rows(out)
        for r in rows.to_dict("records"):
            finished_before[str(r["trial_id"])] = r
        found = checkpoints.find(str(out / "ray"))
        last_ckpt.update({f"{c}-{s}": v["epoch"] for (c, s), v in found.items()})
        kills.append({"after_s": round(delay, 1), "finished": len(rows),
                      "checkpoints": {f"{c}-{s}": v["epoch"] for (c, s), v in found.items()}})
        print(f"kill {k + 1}: after {delay:.1f} s, {len(rows)} finished, checkpoints "
              f"{kills[-1]['checkpoints']}", flush=True)
    final = _rows(out)
    lost = [t for t in finished_before if t not in set(final["trial_id"].astype(str))]
    changed = [t for t, r in finished_before.items() if t not in lost and
               final[final["trial_id"].astype(str) == t].iloc[0]["test_top1"] != r["test_top1"]]
    resumed = final[final["resumed_from"] > 0]
    # A worker of the killed run can persist one more epoch before Ray stops it: later is fine, earlier is lost work.
    mismatched = [r["trial_id"] for r in resumed.to_dict("records")
                  if r["resumed_from"] < last_ckpt.get(f"{r['config_id']}-{int(r['seed'])}", 0)]
    report = {"kills": kills, "exit_code": rc, "trials": len(final), "unique": bool(final["trial_id"].is_unique),
              "finished_before_kills": len(finished_before), "lost": lost, "changed": changed,
              "resumed_trials": int(len(resumed)), "resumed_from": resumed["resumed_from"].astype(int).tolist(),
              "resumed_before_latest_checkpoint": mismatched, "checkpoints_left": (out / "ray").exists(),
              "trained_twice": int(final.duplicated(["config_id", "seed"]).sum())}
    print(json.dumps(report, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    ok = rc == 0 and len(final) == 16 and report["unique"] and not lost and not changed and not mismatched \
        and not report["checkpoints_left"] and not report["trained_twice"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("KDBENCH_CACHE", str(Path.home() / ".cache" / "kdbench"))
    sys.exit(main())
