"""Recorded tables and replayed searches.

    python -m benchmarks.replay study NAME          # write tables/NAME.toml: the grid study that records NAME
    kdbench tune benchmarks/replay/tables/NAME.toml --out DIR   # record it (real runs; --resume continues)
    python -m benchmarks.replay pack DIR NAME       # write tables/NAME.csv.gz from that folder
    python -m benchmarks.replay run [--tables digits,synthetic] [--seeds 50] [--workers 4] [--json F]
    python -m benchmarks.replay real NAME [DIR...] [--run 5 --out runs/real]   # real searches, scored alike

``run`` is what ``python -m benchmarks --only replay`` runs: every strategy on every table, ``--seeds`` replays
each, anytime curves in benchmarks/results/replay-NAME.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from kdbench.results import ResultsError
from kdbench.study import StudyError

from .report import check_real, figures, run_real
from .tables import HERE, TABLES, pack, record_study

console = Console(stderr=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("study", help="write tables/NAME.toml")
    a.add_argument("name", choices=sorted(TABLES))
    a = sub.add_parser("pack", help="write tables/NAME.csv.gz from a results folder")
    a.add_argument("folder", type=Path)
    a.add_argument("name", choices=sorted(TABLES))
    a = sub.add_parser("run", help="replay every strategy")
    a.add_argument("--tables", default="digits,synthetic")
    a.add_argument("--seeds", type=int, default=50)
    a.add_argument("--workers", type=int, default=4)
    a.add_argument("--json", dest="json_path")
    a = sub.add_parser("real", help="score real `kdbench tune` folders beside the replay's band")
    a.add_argument("name", choices=sorted(TABLES))
    a.add_argument("folders", type=Path, nargs="*", help="results folders (else --run)")
    a.add_argument("--run", type=int, help="first run this many searches of the table's study into --out")
    a.add_argument("--out", type=Path, default=Path("runs/real"))
    a.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except (ResultsError, StudyError) as e:
        console.print(f"error: {e}", markup=False, highlight=False)
        return 2


def _run(args) -> int:
    if args.command == "study":
        path = HERE / f"{args.name}.toml"
        path.write_text(record_study(args.name))
        console.print(f"wrote {path}")
    elif args.command == "pack":
        console.print(f"wrote {pack(args.folder, args.name)}")
    elif args.command == "real":
        folders = args.folders + (run_real(args.name, args.out, args.run) if args.run else [])
        out = check_real(args.name, folders)
        console.print(json.dumps(out, indent=2))
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(out, indent=2))
    else:
        out = figures(tuple(t.strip() for t in args.tables.split(",")), args.seeds, args.workers)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(out, indent=2))
            console.print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
