"""Held-out quality of stain bundles on the ndev scratch assay: time points 8 and 9, never used in training.

    python benchmarks/eval_demo_stain.py demo-stain demo-stain-regression -o docs/reports/demo-stain

Writes the held-out planes (brightfield input, real Hoechst, nuclei and cell labels) to a work folder, runs
``virtualstain predict`` with every bundle and ``virtualstain evaluate`` on the results, so the numbers come from
the same commands a user runs. The report (CSV, JSON, markdown, figures) lands in ``-o``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import tifffile

from napari_virtualstain.cli import main as virtualstain

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="bundle folders or bundled names")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="scratch-assay CTYX TIFF")
    p.add_argument("--timepoints", default="8,9")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = tifffile.imread(args.data)  # C0 Hoechst, C1 brightfield, C2 nuclei labels, C3 cell labels
    work = Path(tempfile.mkdtemp(prefix="vs-eval-"))
    for sub in ("input", "truth", "nuclei", "cells"):
        (work / sub).mkdir()
    for t in (int(v) for v in args.timepoints.split(",")):
        stem = f"t{t}"
        tifffile.imwrite(work / "input" / f"{stem}.tif", data[1, t])
        tifffile.imwrite(work / "truth" / f"{stem}.tif", data[0, t])
        tifffile.imwrite(work / "nuclei" / f"{stem}.tif", data[2, t])
        tifffile.imwrite(work / "cells" / f"{stem}.tif", data[3, t])
    return predict_and_evaluate(args.bundles, work, args.seed, args.output, [
        "--truth", str(work / "truth"), "--truth-channels", "Hoechst", "--labels", f"nuclei={work / 'nuclei'}",
        "--labels", f"cells={work / 'cells'}"])


def predict_and_evaluate(bundles: list[str], work: Path, seed: int, output: str, truth_args: list[str]) -> int:
    """``virtualstain predict`` every bundle on ``work/input``, then one ``virtualstain evaluate`` report."""
    preds = []
    for bundle in bundles:
        name = Path(bundle).name
        rc = virtualstain(["predict", "-c", bundle, str(work / "input"), "-o", str(work / name), "--seed", str(seed), "-q"])
        if rc:
            return rc
        preds += ["--pred", f"{name}={work / name}"]
    return virtualstain(["evaluate", *preds, *truth_args, "--input", str(work / "input"), "-o", output])

if __name__ == "__main__":
    sys.exit(main())
