"""Held-out quality of stain bundles on the ndev scratch assay (time points 8 and 9, never used in training).

    python benchmarks/eval_demo_stain.py runs/demo-stain runs/demo-stain-regression [--data PATH] [--out FILE]

Per bundle and time point: Pearson r, PSNR and SSIM of the Hoechst channel (prediction and truth both scaled by the
truth's 1st/99.8th percentiles to [0, 1] and clipped), and nuclei instance F1 at IoU 0.5 (one-to-one matching; with
IoU > 0.5 a match is unique) from the predicted nuclei boundary/foreground channels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.metrics import image_metrics
from napari_virtualstain.core.tasks.stain import predict_stain

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"


def f1_at_05(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Precision/recall/F1 of instances matched one-to-one at IoU > 0.5 (such matches cannot conflict)."""
    p_ids, t_ids = np.unique(pred)[1:], np.unique(truth)[1:]
    if len(p_ids) == 0 or len(t_ids) == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n_pred": int(len(p_ids)), "n_true": int(len(t_ids))}
    pairs = np.stack([pred.ravel(), truth.ravel()], 1)
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    inter: dict = {}
    for (a, b), n in zip(*np.unique(pairs, axis=0, return_counts=True)):
        inter[(a, b)] = n
    area_p = dict(zip(*np.unique(pred, return_counts=True)))
    area_t = dict(zip(*np.unique(truth, return_counts=True)))
    tp = sum(1 for (a, b), n in inter.items() if n / (area_p[a] + area_t[b] - n) > 0.5)
    precision, recall = tp / len(p_ids), tp / len(t_ids)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n_pred": int(len(p_ids)), "n_true": int(len(t_ids))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--timepoints", default="8,9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    data = tifffile.imread(args.data)
    rows = []
    for path in args.bundles:
        bundle = load_bundle(path)
        for t in (int(v) for v in args.timepoints.split(",")):
            res = predict_stain(bundle, data[1, t], seed=args.seed)
            truth = data[0, t].astype(np.float32)
            lo, hi = np.percentile(truth, [1, 99.8])
            scale = lambda a: np.clip((a - lo) / (hi - lo), 0, 1)  # noqa: E731
            m = image_metrics(scale(res.channel("Hoechst")), scale(truth))
            row = {"bundle": bundle.config.name, "objective": bundle.config.objective, "id": bundle.short_id,
                   "t": t, "hoechst": m, "seconds": res.provenance["seconds"]}
            if "nuclei" in res.labels:
                row["nuclei"] = f1_at_05(res.labels["nuclei"], data[2, t])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| bundle | objective | t | Hoechst r | PSNR (dB) | SSIM | nuclei F1@0.5 (pred/true) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        h, n = r["hoechst"], r.get("nuclei", {})
        print(f"| {r['bundle']} | {r['objective']} | {r['t']} | {h['pearson']:.3f} | {h['psnr']:.1f} | {h['ssim']:.3f} | "
              f"{n.get('f1', float('nan')):.3f} ({n.get('n_pred')}/{n.get('n_true')}) |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
