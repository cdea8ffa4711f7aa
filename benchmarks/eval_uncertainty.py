"""Do the uncertainty maps help? DDPMavg vs final sample vs regression, std-map AUROC for large errors, flag hits,
and the time the maps cost — on held-out real data.

    python benchmarks/eval_uncertainty.py ndev --bundle demo-stain --bundle runs/demo-stain-ddpm \\
        --baseline demo-stain-regression -o benchmarks/results/uncertainty_ndev.json
    python benchmarks/eval_uncertainty.py isl --bundle demo-isl --baseline demo-isl-regression \\
        -o benchmarks/results/uncertainty_isl.json

Data: ndev scratch assay time points 8-9 (never used in training) or the ISL bottom-right quadrant (held out).
For every diffusion bundle and image, with seeds 0..k-1 run as one batch:
- PCC/SSIM (truth's 1-99.8 percentile scale, as ``virtualstain evaluate``) of the final sample (seed 0), of the
  single-run DDPMavg (seed 0, window 0.3-0.8) and of the k-seed avg; the regression baseline beside them;
- AUROC of std_steps / std_seeds at separating the top-10 % |final - truth| pixels from the rest;
- large error regions (connected top-10 % error pixels, median-filtered, >= 16 px): fraction touched by a flag, the
  number of flags and the fraction of the image flagged (flagging everything would touch every error), the fraction
  inside the regions' bounding boxes and their median side (what the review panel zooms to), for plain Otsu flags
  (min area 16) and for the reviewable defaults (``REVIEW_DEFAULTS``: merged, grouped into at most 20 regions);
- wall time: plain sampling, the same with step maps (one seed), k seeds batched with both maps.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.io import read_image
from napari_virtualstain.core.metrics import auroc, image_metrics, normalize_pair
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.uncertainty import REVIEW_DEFAULTS, flag_regions, predict_uncertainty

ROOT = Path(__file__).resolve().parents[2] / "shared/data"


def held_out(dataset: str, crop: int | None):
    """[(name, input, {stain name: truth})] of held-out images."""
    if dataset == "ndev":
        data = read_image(ROOT / "ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff")
        out = [(f"t{t}", data[1, t], {"Hoechst": data[0, t]}) for t in (8, 9)]
    else:
        q = (slice(512, 1024), slice(512, 1024))
        phase = np.stack([read_image(ROOT / f"isl_condition_b/phase_z{z:02d}.png")[q] for z in range(13)])
        truth = {n.upper(): read_image(ROOT / f"isl_condition_b/{n}.png")[q]
                 for n in ("dapi", "map2", "nfh")}
        out = [("q11", phase, truth)]
    if crop:
        out = [(n, x[..., :crop, :crop], {k: v[:crop, :crop] for k, v in t.items()}) for n, x, t in out]
    return out


def large_error_regions(err: np.ndarray, top: np.ndarray, min_area: int = 16) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.measure import label

    smooth = ndi.median_filter(top.astype(np.uint8), size=3).astype(bool)
    lab = label(smooth)
    areas = np.bincount(lab.ravel())
    keep = areas >= min_area
    keep[0] = False
    return np.where(keep[lab], lab, 0)


def review_extent(labels: np.ndarray) -> dict:
    """What a reviewer looks at: the regions' bounding boxes (the review panel zooms to them) — the fraction of the
    image inside any of them, and their median side."""
    from skimage.measure import regionprops

    boxes = [r.bbox for r in regionprops(labels)]
    inside = np.zeros(labels.shape, bool)
    for y0, x0, y1, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    sides = [max(y1 - y0, x1 - x0) for y0, x0, y1, x1 in boxes]
    return {"image_fraction_in_boxes": float(inside.mean()), "median_box_side": float(np.median(sides)) if sides else 0.0}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=["ndev", "isl"])
    p.add_argument("--bundle", action="append", required=True, help="diffusion bundle (repeat)")
    p.add_argument("--baseline", default=None, help="regression bundle to compare with")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--crop", type=int, default=None, help="top-left crop of each image (faster)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = held_out(args.dataset, args.crop)
    seeds = list(range(args.seeds))
    rows, timing = [], []
    baseline = load_bundle(args.baseline) if args.baseline else None
    for name, x, truths in images:
        base = predict_stain(baseline, x, make_labels=False) if baseline else None
        for bpath in args.bundle:
            b = load_bundle(bpath)
            plain, t_plain = timed(lambda: predict_stain(b, x, seed=0, make_labels=False))
            one, t_steps = timed(lambda: predict_uncertainty(b, x, mode="steps", seeds=[0], make_labels=False))
            both, t_both = timed(lambda: predict_uncertainty(b, x, mode="both", seeds=seeds, make_labels=False))
            timing.append({"image": name, "bundle": b.config.name, "sampler": both.provenance["sampler"],
                           "steps": both.provenance["steps"], "plain_s": t_plain, "with_step_maps_s": t_steps,
                           f"{len(seeds)}_seeds_batched_s": t_both,
                           "map_overhead": t_steps / t_plain - 1, "k_seeds_over_one": t_both / t_steps})
            for ch, truth in truths.items():
                c = b.config.output_names.index(ch)
                scores = {}
                for label, pred in (("final", one.stain.image[c]), ("avg_1seed", one.maps["avg"][c]),
                                    (f"avg_{len(seeds)}seeds", both.maps["avg"][c])):
                    pn, tn, _ = normalize_pair(pred, truth)
                    m = image_metrics(pn, tn)
                    scores[label] = {"pearson": m["pearson"], "ssim": m["ssim"], "psnr": m["psnr"]}
                if base is not None:
                    pn, tn, _ = normalize_pair(base.channel(ch), truth)
                    m = image_metrics(pn, tn)
                    scores["regression"] = {"pearson": m["pearson"], "ssim": m["ssim"], "psnr": m["psnr"]}
                pn, tn, _ = normalize_pair(one.stain.image[c], truth)
                err = np.abs(pn - tn)
                top = err >= np.quantile(err, 0.9)
                regions = large_error_regions(err, top)
                ids = np.unique(regions[regions > 0])
                maps = {"std_steps": both.maps["std_steps"][c], "std_seeds": both.maps["std_seeds"][c]}
                unc = {}
                for mname, m in maps.items():
                    unc[mname] = {"auroc_top10_error": auroc(m, top), "n_error_regions": int(ids.size)}
                    # plain Otsu flags, and the reviewable defaults of the CLI/widget (merged, at most 20)
                    for rule, extra in (("otsu", {}), ("review", REVIEW_DEFAULTS)):
                        fl = flag_regions(m, None, min_area=16, **extra)
                        flagged = fl.labels > 0
                        hit = [bool(flagged[regions == i].any()) for i in ids]
                        unc[mname][rule] = {"error_regions_flagged": float(np.mean(hit)) if hit else float("nan"),
                                            "image_fraction_flagged": float(flagged.mean()), "n_flags": len(fl.table),
                                            **review_extent(fl.labels)}
                rows.append({"image": name, "bundle": b.config.name, "objective": b.config.objective,
                             "sampler": both.provenance["sampler"], "steps": both.provenance["steps"], "channel": ch,
                             "scores": scores, "uncertainty": unc})
                print(json.dumps(rows[-1]), flush=True)
            print(json.dumps(timing[-1]), flush=True)
    result = {"dataset": args.dataset, "seeds": seeds, "window": [0.3, 0.8], "crop": args.crop,
              "threads": args.threads, "machine": platform.platform(), "cpu": platform.processor(),
              "rows": rows, "timing": timing}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
