"""Scaling study of the mean (one-pass) network on this CPU: how far does more training, width or crop size go?

    OMP_NUM_THREADS=1 nohup python benchmarks/scaling_study.py run w16_c128 --root runs/scaling &   # resumable
    python benchmarks/scaling_study.py score --root runs/scaling -o benchmarks/results/scaling_study.json

``run ARM`` trains one arm of the study with ``virtualstain train`` at a *constant* learning rate (so that no
schedule ending makes its own plateau) in segments that end at the snapshot steps; after each segment the bundle is
copied to ``ROOT/ARM/step_NNNNN`` and the next segment resumes the same run (``--resume``: the same random streams
as one long run). A killed run picks up at the last saved state; snapshots already written are kept. 1x is the
shipped mean network's budget (2,400 steps of 8 crops), so 4x = 9,600 and 16x = 38,400 steps.

``score`` measures every snapshot on the validation strip (x >= 490 of t0-t7: never trained on) and on a sample of
the training region (x < 490 of t3 and t7: the fit): Hoechst Pearson r, and per labels route the bundle offers
(boundaries, stain, distance) nuclei F1@0.5 and the median centroid offset of matched nuclei. Held-out time points 8/9 are never read here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/demo-stain.yaml"
DATA = REPO.parent / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"
BASE_STEPS = 2400  # the shipped demo-stain-regression budget
SNAPSHOTS = (600, 1200, 2400, 4800, 7200, 9600, 14400, 19200, 28800, 38400)
COMMON = ["--objective", "regression", "--batch-size", "8", "--lr", "5e-4", "--lr-schedule", "constant",
          "--val-every", "600", "--tile-size", "128", "--tile-overlap", "16", "--seed", "0", "--precision", "auto"]
ARMS = {
    "w16_c128": ["--channels", "16,32,64,128", "--crop-size", "128"],  # today's mean network, constant lr
    "w32_c128": ["--channels", "32,64,128,256", "--crop-size", "128"],
    "w16_c256": ["--channels", "16,32,64,128", "--crop-size", "256"],  # frames are 210 high: crops reflect-padded
    "w32_c256": ["--channels", "32,64,128,256", "--crop-size", "256"],
    # objectives at today's size (compare with w16_c128 at the same step: equal CPU time within a few %)
    "obj_mse_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head"],
    "obj_spotlight_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--loss", "spotlight"],
    "obj_l1msssim_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--loss", "l1_msssim"],
    "aug_mse_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--augment"],
}
VAL_X = 490  # first validation column of the 576-wide frames (val_fraction 0.15)
FIT_FRAMES = (3, 7)


def arm_options(arm: str) -> list[str]:
    if arm in ARMS:
        return COMMON + ARMS[arm]
    spec = json.loads((Path(arm) / "arm.json").read_text()) if Path(arm, "arm.json").is_file() else None
    if spec is None:
        raise SystemExit(f"error: unknown arm {arm!r}; use one of {', '.join(ARMS)}")
    return spec["options"]


def saved_step(bundle: Path) -> int:
    state = bundle / "training_state/state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def run(arm: str, root: Path, until: int, extra: list[str]) -> int:
    folder = root / arm
    bundle = folder / "bundle"
    folder.mkdir(parents=True, exist_ok=True)
    options = arm_options(arm) + extra
    (folder / "arm.json").write_text(json.dumps({"arm": arm, "options": options, "config": str(CONFIG)}, indent=1))
    for target in (s for s in SNAPSHOTS if s <= until):
        snap = folder / f"step_{target:05d}"
        if snap.is_dir():
            continue
        done = saved_step(bundle)
        if done < target:
            cmd = [sys.executable, "-m", "napari_virtualstain.cli", "train", str(CONFIG), "-o", str(bundle),
                   "--name", f"scaling-{arm}", "--steps", str(target), *options, *(["--resume"] if done else [])]
            print(time.strftime("%H:%M:%S"), " ".join(cmd[3:]), flush=True)
            rc = subprocess.call(cmd)
            if rc:
                return rc
        tmp = folder / f".{snap.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in bundle.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        tmp.rename(snap)  # a snapshot appears whole or not at all
    return 0


def _frames():
    import tifffile

    data = tifffile.imread(DATA)  # C0 Hoechst, C1 transmitted light, C2 nuclei labels, C3 cells
    val = [(data[1, t][:, VAL_X:], data[0, t][:, VAL_X:], data[2, t][:, VAL_X:]) for t in range(8)]
    fit = [(data[1, t][:, :VAL_X], data[0, t][:, :VAL_X], data[2, t][:, :VAL_X]) for t in FIT_FRAMES]
    return {"val": val, "fit": fit}


def centroid_offsets(true, pred, matches) -> list[float]:
    """Distance (px) between the centroids of every matched (true, predicted) pair."""
    import numpy as np
    from scipy import ndimage as ndi

    if not matches:
        return []
    t_ids = [m[0] for m in matches]
    p_ids = [m[1] for m in matches]
    ct = np.array(ndi.center_of_mass(np.ones_like(true), true, t_ids))
    cp = np.array(ndi.center_of_mass(np.ones_like(pred), pred, p_ids))
    return list(np.hypot(*(ct - cp).T))


def score_bundle(path, frames: dict, **predict_options) -> dict:
    """Hoechst r, nuclei F1@0.5 and median centroid offset on the validation strip and on training pixels."""
    import numpy as np

    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.metrics import match_labels, pearson, pool_matching
    from napari_virtualstain.core.tasks.stain import labels_from_channels, predict_stain

    bundle = load_bundle(path)
    routes = bundle.config.label_routes()
    out = {}
    for part, items in frames.items():
        rs, matches, offsets = [], {r: [] for r in routes}, {r: [] for r in routes}
        for image, stain, nuclei in items:
            res = predict_stain(bundle, image, seed=0, threads=1, make_labels=False, **predict_options)
            rs.append(pearson(res.channel("Hoechst"), stain.astype(np.float32)))
            for route in routes:
                pred = labels_from_channels(bundle.config, res.image, route)["nuclei"]
                m = match_labels(nuclei, pred, 0.5, return_matches=True)
                matches[route].append(m)
                offsets[route] += centroid_offsets(nuclei, pred, m["matches"])
        out[part] = {"hoechst_r": float(np.mean(rs))}
        for route in routes:
            out[part][f"nuclei_f1_05_{route}"] = pool_matching(matches[route])["f1"]
            out[part][f"centroid_offset_px_{route}"] = float(np.median(offsets[route])) if offsets[route] else None
    return out


def score(root: Path, output: Path) -> int:
    frames = _frames()
    results = json.loads(output.read_text()) if output.is_file() else {}
    for folder in sorted(p for p in root.iterdir() if (p / "arm.json").is_file()):
        arm = results.setdefault(folder.name, {"options": json.loads((folder / "arm.json").read_text())["options"]})
        points = arm.setdefault("points", {})
        for snap in sorted(folder.glob("step_*")):
            if snap.name in points:
                continue
            t0 = time.perf_counter()
            cfg = json.loads((snap / "config.json").read_text())
            hist = cfg["training"]["history"][-1]
            points[snap.name] = {"step": hist["step"], "train_seconds": hist["seconds"], "loss": hist["loss"],
                                 **score_bundle(snap, frames)}
            print(folder.name, snap.name, json.dumps(points[snap.name]), f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            output.write_text(json.dumps(results, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one arm, snapshot by snapshot (resumable)")
    r.add_argument("arm", help=f"one of {', '.join(ARMS)}, or a folder holding an arm.json")
    r.add_argument("--root", type=Path, default=REPO / "runs/scaling")
    r.add_argument("--until", type=int, default=SNAPSHOTS[-1], help="last snapshot step (default 16x = 38400)")
    s = sub.add_parser("score", help="measure every snapshot of every arm under --root")
    s.add_argument("--root", type=Path, default=REPO / "runs/scaling")
    s.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks/results/scaling_study.json")
    args, extra = p.parse_known_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.cmd == "run":
        return run(args.arm, args.root, args.until, extra)
    return score(args.root, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
