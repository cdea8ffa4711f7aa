"""Held-out quality of ISL bundles: the bottom-right quadrant [512:1024, 512:1024] of In silico labeling
condition B, never used in training (configs/demo-isl.yaml lists only the other three quadrants).

    python benchmarks/eval_demo_isl.py demo-isl demo-isl-regression -o docs/reports/demo-isl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_demo_stain import predict_and_evaluate  # noqa: E402

from napari_virtualstain.core.io import read_image  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/isl_condition_b"
STAINS = ("dapi", "map2", "nfh")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="bundle, or 'LABEL=BUNDLE predict-options' (see eval_demo_stain.py)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data, q = Path(args.data), (slice(512, 1024), slice(512, 1024))
    work = Path(tempfile.mkdtemp(prefix="vs-eval-isl-"))
    (work / "input").mkdir()
    (work / "truth").mkdir()
    phase = np.stack([read_image(data / f"phase_z{z:02d}.png")[q] for z in range(13)])
    tifffile.imwrite(work / "input" / "q11.tif", phase, photometric="minisblack")
    truth = np.stack([read_image(data / f"{s}.png")[q] for s in STAINS])
    tifffile.imwrite(work / "truth" / "q11.tif", truth, photometric="minisblack")
    rc, seconds = predict_and_evaluate(args.bundles, work, args.seed, args.output,
                                       ["--truth", str(work / "truth"), "--truth-channels", "DAPI,MAP2,NFH"])
    for label, s in seconds.items():
        print(f"{label}: {s:.1f} s for the 512x512 quadrant")
    return rc


if __name__ == "__main__":
    sys.exit(main())
