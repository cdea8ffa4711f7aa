"""What the uncertainty maps cost: plain sampling vs the same run with step maps vs k seeds batched vs k seeds one
after another — interleaved repeats in one process, medians and ratios (the machines are noisy; compare ratios).

    python benchmarks/bench_uncertainty.py demo-stain runs/demo-stain-ddpm -o benchmarks/results/bench_uncertainty.json

Real data: a crop of the ndev brightfield (held-out time point 9).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.io import read_image
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.uncertainty import predict_uncertainty

DATA = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="ddpm bundles: DDIM steps (default 50)")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = read_image(DATA)[1, 9, : args.size, : args.size]
    seeds = list(range(args.seeds))
    results = []
    for name in args.bundles:
        b = load_bundle(name)
        steps = args.steps if b.config.objective == "ddpm" else None
        runs = {
            "plain": lambda: predict_stain(b, x, seed=0, steps=steps, make_labels=False),
            "step_maps": lambda: predict_uncertainty(b, x, mode="steps", seeds=[0], steps=steps, make_labels=False),
            "k_seeds_batched": lambda: predict_uncertainty(b, x, mode="both", seeds=seeds, steps=steps, make_labels=False),
            "k_seeds_one_by_one": lambda: [predict_stain(b, x, seed=s, steps=steps, make_labels=False) for s in seeds],
        }
        runs["plain"]()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"bundle": b.config.name, "objective": b.config.objective, "size": args.size, "seeds": args.seeds,
               "median_s": med, "all_s": times,
               "map_overhead": med["step_maps"] / med["plain"] - 1,
               "k_batched_over_one": med["k_seeds_batched"] / med["plain"],
               "k_batched_over_k_sequential": med["k_seeds_batched"] / med["k_seeds_one_by_one"]}
        print(json.dumps(row), flush=True)
        results.append(row)
    out = {"machine": platform.platform(), "threads": args.threads, "repeats": args.repeats, "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
