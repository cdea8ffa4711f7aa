"""Fine-tuning from a shipped model against training from scratch, at equal CPU minutes, on a case the demos never
saw: In silico labeling condition B, one phase-contrast plane -> DAPI (configs/isl-dapi-phase.yaml).

    OMP_NUM_THREADS=1 python benchmarks/finetune_isl.py --minutes 8 -o benchmarks/results/finetune_isl.json

Two runs of the same recipe (one-pass network, widths 16-32-64-128, 128² crops, constant lr 5e-4, validation every
100 steps on the config's strips), one from scratch and one with ``--init demo-stain-regression`` (brightfield ->
Hoechst + labels: its last layer is new, every other weight carries over), each given ``--max-minutes``. Reported:
the validation curves (r against CPU seconds) and, once, DAPI r on the held-out bottom-right quadrant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from napari_virtualstain.core.settings import RunSettings


ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/isl-dapi-phase.yaml"
DATA = ROOT.parent / "shared/data/isl_condition_b"
RECIPE = ["--objective", "regression", "--channels", "16,32,64,128", "--crop-size", "128", "--batch-size", "8",
          "--lr", "5e-4", "--lr-schedule", "constant", "--val-every", "100", "--tile-size", "128",
          "--tile-overlap", "16", "--steps", "100000", "--seed", "0"]


def held_out_r(bundle_path: Path) -> float:
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.io import read_image
    from napari_virtualstain.core.metrics import image_metrics, normalize_pair
    from napari_virtualstain.core.tasks.stain import predict_stain

    q = (slice(512, 1024), slice(512, 1024))
    phase, dapi = read_image(DATA / "phase_z06.png")[q], read_image(DATA / "dapi.png")[q]
    res = predict_stain(load_bundle(bundle_path), phase, make_labels=False, settings=RunSettings(threads=1))
    p, t, _ = normalize_pair(res.channel("DAPI"), dapi)
    return float(image_metrics(p, t)["pearson"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--root", type=Path, default=ROOT / "runs/finetune_isl")
    p.add_argument("--init", default="demo-stain-regression")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = {"minutes": args.minutes, "cpu": platform.processor() or platform.machine(), "runs": {}}
    for label, extra in (("scratch", []), ("fine-tuned", ["--init", args.init])):
        out = args.root / label
        cmd = [sys.executable, "-m", "napari_virtualstain.cli", "train", str(CONFIG), "-o", str(out), *RECIPE,
               "--max-minutes", str(args.minutes), "--name", f"isl-dapi-{label}", *extra]
        subprocess.run(cmd, check=True, env=env)
        history = json.loads((out / "training_log.json").read_text())
        curve = [(h["step"], h["seconds"], h["val"]["DAPI"]["pearson"]) for h in history if "val" in h]
        results["runs"][label] = {"command": " ".join(cmd[3:]), "curve": curve, "steps": curve[-1][0],
                                  "held_out_dapi_r": held_out_r(out)}
        print(label, "steps", curve[-1][0], "val r", round(curve[-1][2], 3), "held-out r",
              round(results["runs"][label]["held_out_dapi_r"], 3), flush=True)
    args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
