"""Where a biologist waits on the class-conditional demo: translate one 256² crop, synthesize 4 samples of 256².

    python benchmarks/bench_conditions.py -o benchmarks/results/bench_conditions.json

Both at the bundle's validated settings (``demo-nfkb``: 50 DDIM steps, guidance and strength from its
``sampling``), through the same core calls as the CLI and the widgets, on the held-out NF-kB crops the widgets'
sample data opens. Records the CPU, its load and the threads used beside every time: numbers from a busy machine are
upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from napari_virtualstain._sample_data import nfkb_wells
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.settings import RunSettings
from napari_virtualstain.core.tasks.classcond import synthesize, translate


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=None, help="write the timings (JSON) here")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: as the CLI chooses)")
    args = p.parse_args(argv)
    bundle = load_bundle("demo-nfkb")
    wells = {w[1]["metadata"]["class"]: np.asarray(w[0], np.float32) for w in nfkb_wells()}
    source, target = "A12", "A01"
    settings = RunSettings(threads=args.threads)
    report = {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
              "bundle": bundle.id}
    t = time.perf_counter()
    tr = translate(bundle, wells[source], source, target, channel_axis=0, settings=settings)
    report["translate_256"] = {"seconds": round(time.perf_counter() - t, 1), "steps": tr.provenance["steps"],
                               "tiles": [tr.provenance["tile_size"], tr.provenance["num_tiles"]],
                               "precision": tr.provenance["precision"], "threads": tr.provenance.get("threads"),
                               "threads_from": tr.provenance.get("threads_from")}
    t = time.perf_counter()  # the same crop in 128² tiles (the bundle's tiling before round 3d), for the ratio
    translate(bundle, wells[source], source, target, channel_axis=0,
              settings=settings.replace(tile_size=128, tile_overlap=16))
    report["translate_256_in_128_tiles"] = {"seconds": round(time.perf_counter() - t, 1)}
    report["speedup_one_tile"] = round(report["translate_256_in_128_tiles"]["seconds"]
                                       / report["translate_256"]["seconds"], 2)
    dna = wells[source][bundle.config.image_names.index(bundle.config.input_names[0])]
    t = time.perf_counter()
    syn = synthesize(bundle, target, 4, condition=dna, settings=settings)
    report["synthesize_4x256"] = {"seconds": round(time.perf_counter() - t, 1), "steps": syn.provenance["steps"],
                                  "shape": list(syn.images.shape)}
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
