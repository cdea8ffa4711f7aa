"""Held-out quality of stain bundles on the ndev scratch assay: time points 8 and 9, never used in training.

    python benchmarks/eval_demo_stain.py demo-stain demo-stain-regression -o docs/reports/demo-stain
    python benchmarks/eval_demo_stain.py "anchored k4=demo-stain --samples 4" "one sample=demo-stain --samples 1" \
        demo-stain-regression -o report/

Each method is a bundle (folder or bundled name), optionally ``LABEL=BUNDLE OPTIONS`` where OPTIONS are
``virtualstain predict`` options (``--steps``, ``--samples``, ``--labels-from``...). Writes the held-out planes
(brightfield input, real Hoechst, nuclei and cell labels) to a work folder, runs ``virtualstain predict`` for every
method and ``virtualstain evaluate`` on the results, so the numbers come from the same commands a user runs. Adds
what evaluate does not measure: the background leak (``core.metrics.background_leak``: structure drawn where the real
stain has none), seconds per image, and a figure of held-out crops at stretched contrast. Report lands in ``-o``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_virtualstain.cli import main as virtualstain

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"


def parse_method(text: str) -> tuple[str, str, list[str]]:
    """'LABEL=BUNDLE --opt v' -> (label, bundle, options); a bare bundle is labelled by its folder name."""
    label, _, rest = text.partition("=") if "=" in text.split(" ")[0] else ("", "", text)
    words = shlex.split(rest)
    return (label or Path(words[0]).name), words[0], words[1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("methods", nargs="+", help="bundle, or 'LABEL=BUNDLE predict-options'")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="scratch-assay CTYX TIFF")
    p.add_argument("--timepoints", default="8,9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", default="60,260,150", help="figure crop: Y0,X0,SIZE of every time point")
    p.add_argument("--iou-thresholds", default=None,
                   help="passed to virtualstain evaluate (e.g. 0.1,0.3,0.5: found at all vs outlined well)")
    args = p.parse_args(argv)
    data = tifffile.imread(args.data)  # C0 Hoechst, C1 brightfield, C2 nuclei labels, C3 cell labels
    work = Path(tempfile.mkdtemp(prefix="vs-eval-"))
    for sub in ("input", "truth", "nuclei", "cells"):
        (work / sub).mkdir()
    stems = []
    for t in (int(v) for v in args.timepoints.split(",")):
        stem = f"t{t}"
        stems.append(stem)
        tifffile.imwrite(work / "input" / f"{stem}.tif", data[1, t])
        tifffile.imwrite(work / "truth" / f"{stem}.tif", data[0, t])
        tifffile.imwrite(work / "nuclei" / f"{stem}.tif", data[2, t])
        tifffile.imwrite(work / "cells" / f"{stem}.tif", data[3, t])
    methods = [parse_method(m) for m in args.methods]
    rc, seconds = predict_and_evaluate(args.methods, work, args.seed, args.output, [
        "--truth", str(work / "truth"), "--truth-channels", "Hoechst", "--labels", f"nuclei={work / 'nuclei'}",
        "--labels", f"cells={work / 'cells'}",
        *(["--iou-thresholds", args.iou_thresholds] if args.iou_thresholds else [])])
    if rc:
        return rc
    extra = extra_measures(methods, work, stems, seconds)
    Path(args.output, "background_and_speed.json").write_text(json.dumps(extra, indent=1))
    for lab, m in extra.items():
        print(f"{lab}: background structure {m['bg_structure']:.2f}x the real stain's, bg r with input "
              f"{m['bg_input_r']:.3f} (real stain {m['bg_input_r_truth']:.3f}); {m['seconds_per_image']:.1f} s/image")
    y0, x0, size = (int(v) for v in args.crop.split(","))
    crop_figure(methods, work, stems, Path(args.output) / "figures" / "background_crops.png", (y0, x0, size))
    return 0


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def predict_and_evaluate(method_texts: list[str], work: Path, seed: int, output: str,
                         truth_args: list[str]) -> tuple[int, dict]:
    """``virtualstain predict`` every method on ``work/input``, then one ``virtualstain evaluate`` report;
    returns (exit status, seconds per method)."""
    methods = [parse_method(m) for m in method_texts]
    rc, seconds = predict_all(methods, work, seed)
    if rc:
        return rc, seconds
    preds = sum((["--pred", f"{lab}={work / _slug(lab)}"] for lab, _, _ in methods), [])
    return virtualstain(["evaluate", *preds, *truth_args, "--input", str(work / "input"), "-o", output]), seconds


def predict_all(methods, work: Path, seed: int) -> tuple[int, dict]:
    """``virtualstain predict`` per method (1 thread as the rest of the benchmarks); seconds per method."""
    seconds = {}
    for label, bundle, options in methods:
        t0 = time.perf_counter()
        rc = virtualstain(["predict", "-c", bundle, str(work / "input"), "-o", str(work / _slug(label)),
                           "--seed", str(seed), "-q", *options])
        if rc:
            return rc, seconds
        seconds[label] = time.perf_counter() - t0
    return 0, seconds


def extra_measures(methods, work: Path, stems: list[str], seconds: dict) -> dict:
    from napari_virtualstain.core.metrics import background_leak

    out = {}
    for label, bundle, options in methods:
        rows = []
        for stem in stems:
            pred = tifffile.imread(work / _slug(label) / f"{stem}_virtualstain.tif")
            pred = pred[0] if pred.ndim == 3 else pred
            rows.append(background_leak(pred, tifffile.imread(work / "truth" / f"{stem}.tif"),
                                        tifffile.imread(work / "input" / f"{stem}.tif")))
        out[label] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        out[label] |= {"per_image": dict(zip(stems, rows)), "bundle": bundle, "options": options,
                       "seconds_per_image": seconds[label] / len(stems)}
    return out


def crop_figure(methods, work: Path, stems: list[str], path: Path, crop) -> None:
    """Input | real Hoechst | each method, one row per time point, at stretched contrast (0-30 % of the truth's
    1-99.8 % range, so faint background structure is visible), as a PNG."""
    from PIL import Image, ImageDraw

    from napari_virtualstain.core.metrics import normalize_pair

    y0, x0, size = crop
    cols = ["input", "real Hoechst", *[lab for lab, _, _ in methods]]
    cell, head = size * 2, 16
    canvas = Image.new("RGB", (cell * len(cols), (cell + head) * len(stems)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, stem in enumerate(stems):
        truth = tifffile.imread(work / "truth" / f"{stem}.tif")[y0 : y0 + size, x0 : x0 + size]
        images = [tifffile.imread(work / "input" / f"{stem}.tif")[y0 : y0 + size, x0 : x0 + size], truth]
        for label, _, _ in methods:
            pred = tifffile.imread(work / _slug(label) / f"{stem}_virtualstain.tif")
            images.append((pred[0] if pred.ndim == 3 else pred)[y0 : y0 + size, x0 : x0 + size])
        for c, (name, img) in enumerate(zip(cols, images)):
            if c == 0:
                lo, hi = np.percentile(img, (1, 99))
                v = np.clip((img.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1)
                rgb = np.stack([v, v, v], -1)
            else:
                v = np.clip(normalize_pair(img, truth)[0] / 0.3, 0, 1)
                rgb = np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 0.5, 0, 1), np.clip(2 * v - 1, 0, 1)], -1)
            tile = Image.fromarray((rgb * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (c * cell, r * (cell + head) + head))
            draw.text((c * cell + 3, r * (cell + head) + 2), f"{stem} {name}"[:40], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
