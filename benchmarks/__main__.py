"""Speed benchmarks: ratios measured side by side in one run.

    python -m benchmarks [--quick] [--device cpu|cuda] [--json PATH]

Each figure is a ratio of two timings taken in the same process, interleaved repeat by repeat, and
reported as the median with its min-max over repeats: the machine is shared and noisy, so a lone
absolute time would say little. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rich.console import Console
from rich.table import Table

from . import bench, ddp, downstream, stream

console = Console(stderr=True)


def summarise(samples: list[float]) -> dict:
    """Median, min-max and a 95% percentile-bootstrap interval of the median (2,000 resamples, fixed seed)."""
    import numpy as np

    x = np.asarray(samples, dtype=float)
    medians = np.median(np.random.default_rng(0).choice(x, size=(2000, len(x))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return {"median": float(np.median(x)), "ci_low": float(low), "ci_high": float(high), "min": float(x.min()),
            "max": float(x.max()), "n": len(x)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats; skip the (slow) search comparison")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", dest="json_path", help="write the figures here as JSON")
    p.add_argument("--only", help="comma-separated subset: data,geometry,step,folder,method,compile,"
                                        "downstream,stream,ddp,ray,search,replay,gpu")
    p.add_argument("--val-fraction", type=float, help="search comparison: the study's [data] val_fraction")
    p.add_argument("--search-study", default="digits", help="search comparison: the bundled study to search")
    p.add_argument("--search-seeds", type=int, default=5, help="search comparison: seeds 0..N-1")
    p.add_argument("--search-samples", type=int, help="search comparison: trials per search (default: the study's)")
    p.add_argument("--search-epochs", type=int, help="search comparison: epochs per trial (default: the study's)")
    p.add_argument("--replay-seeds", type=int, default=50, help="search replay: replays per strategy and table")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda":
        if not torch.cuda.is_available():
            console.print("error: --device cuda: CUDA is not available on this machine")
            return 2
    repeats = 3 if args.quick else 7
    figures: dict[str, dict] = {}
    goals = {"data_path_speedup": ">= 10", "geometry_overhead": "<= 1.03", "step_overhead": "<= 1.10",
             "search_hv_ratio": ">= 0.95", "search_budget_ratio": "<= 0.5", "ray_overhead": "<= 1.25",
             "search_hv_ratio_pareto": ">= 0.97 (min >= 0.90)", "search_budget_ratio_pareto": "<= 0.5",
             "gpu_images_per_second": ">= 10000", "gpu_packed_4_speedup": ">= 2.5", "gpu_tune_exit_code": "0",
             "folder_decode_seconds": "< 30 (2,000 JPEGs 64x64)", "folder_cache_load_seconds": "< 3",
             "downstream_share": "<= 0.10", "stream_decode_torchvision_vs_pil": "> 1: torchvision decodes",
             "ddp_step_ratio": "< 1 on 2 cores (0.5: no cost)", "ddp_measure_ratio": "< 1 on 2 cores (0.5: no cost)"}
    plan = [
        ("data_path_speedup", lambda: bench.data_path(args.device, repeats)),
        ("geometry_overhead", lambda: bench.geometry_overhead(args.device, repeats)),
        ("step_overhead", lambda: bench.step_overhead(args.device, repeats)),
        ("folder_decode", lambda: bench.folder_decode(repeats)),
        ("method_cost", lambda: bench.method_cost(args.device, max(2, repeats // 2))),
        ("compile", lambda: bench.compile_check(args.device)),
        ("downstream", lambda: downstream.downstream_cost(args.device, max(2, repeats // 2))),
        ("stream", lambda: stream.stream_costs(max(2, repeats // 2))),
    ]
    if args.device == "cpu":  # CPU figures (~4 minutes each on 2 cores); on a GPU, the GPU check below instead
        plan += [("ddp", lambda: ddp.ddp_cost(max(3, repeats // 2))),
                 ("ray_overhead", lambda: bench.ray_overhead(quick=args.quick))]
    if not args.quick:
        options = {"val_fraction": args.val_fraction} if args.val_fraction else None
        plan.append(("search", lambda: bench.search_comparison(
            seeds=tuple(range(args.search_seeds)), data_options=options, study_name=args.search_study,
            samples=args.search_samples, epochs=args.search_epochs)))
    if not args.quick or args.only:  # recorded tables, every strategy replayed (benchmarks/replay)
        from .replay.report import figures as replay_figures

        plan.append(("replay", lambda: replay_figures(seeds=args.replay_seeds)))
    if args.device == "cuda":
        from . import gpu

        plan[:0] = [("gpu_images_per_second", gpu.paper_pair_throughput), ("gpu_packed", gpu.packed_trials),
                    ("gpu_tune", gpu.tune_end_to_end)]  # first: on a lent GPU, what only a GPU can measure
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        plan = [(n, f) for n, f in plan if n.split("_")[0] in wanted or n in wanted]
    started = time.time()

    def meta() -> dict:
        return {"device": args.device, "quick": args.quick, "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": time.time() - started, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}

    def save():  # after every figure: a run cut short (a device lease, a timeout) keeps what it measured
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump({**figures, "meta": meta()}, f, indent=2)

    failed = []
    for name, fn in plan:
        console.print(f"[bold]{name}[/bold] …")
        t0 = time.time()
        try:
            out = fn()
        except Exception as e:  # one figure's failure is reported, and the others are still measured
            failed.append(name)
            out = {f"{name}_error": f"{type(e).__name__}: {e}"[-2000:]}
            console.print_exception(max_frames=8)
        for key, value in out.items():
            numbers = isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value)
            figures[key] = summarise(value) if numbers else value
        console.print(f"  done in {time.time() - t0:.0f} s")
        save()

    table = Table(title=f"kdbench benchmarks ({args.device}{', quick' if args.quick else ''})")
    for c in ("figure", "median", "95% CI of the median", "min – max", "n", "goal"):
        table.add_column(c, justify="left" if c in ("figure", "goal") else "right")
    for key, v in figures.items():
        if isinstance(v, dict) and "median" in v:
            table.add_row(key, f"{v['median']:.3f}", f"{v['ci_low']:.3f} – {v['ci_high']:.3f}",
                          f"{v['min']:.3f} – {v['max']:.3f}", str(v["n"]), goals.get(key, ""))
        elif isinstance(v, (int, float)):
            table.add_row(key, f"{v:.3f}", "", "", "1", goals.get(key, ""))
    Console().print(table)
    save()
    if args.json_path:
        console.print(f"wrote {args.json_path}")
    if failed:
        console.print(f"error: {len(failed)} figure(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
