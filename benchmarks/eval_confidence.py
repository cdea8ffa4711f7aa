"""Trust per nucleus and per pixel, held out: per-nucleus confidence AUROC, calibrated-interval coverage, CRPS.

    python benchmarks/eval_confidence.py demo-stain-regression demo-stain -o benchmarks/results/confidence.json
    python benchmarks/eval_confidence.py demo-isl --isl -o benchmarks/results/confidence_isl.json
    python benchmarks/eval_confidence.py B --isl --config configs/demo-isl-tiles.yaml -o ...  # bundles trained there
    python benchmarks/eval_confidence.py demo-isl-regression --isl --own-field -o ...  # + a user's own calibration

Each bundle is copied to a scratch folder and calibrated there (``core.confidence.calibrate``) on its validation
regions only — the scratch assay's right-hand strip of t0-t7, or the ISL config's strips (never trained on) — then
scored once on the held-out data (ndev t8/t9; the ISL bottom-right quadrant):

- per-nucleus confidence AUROC for "this predicted nucleus matches a true nucleus at IoU >= 0.5" (nuclei bundles),
  for ``agreement`` (the shipped confidence), ``found_by`` and the (negated) stain std inside the nucleus;
- per-nucleus intervals: the fraction of predicted nuclei whose real mean Hoechst (inside the predicted outline)
  lies in the nucleus table's calibrated 80/90/95 % interval, and the mean width;
- coverage of the 80/90/95 % intervals (fraction of held-out pixels whose real stain lies inside), and the mean
  interval width in the stain's units;
- CRPS of the ensemble beside the MAE of the prediction, and the spread-skill ratio (mean std / RMSE);
- where the guarantee breaks: the same intervals on a held-out frame whose brightfield is out of focus (a 2.5 px
  blur) and noisier — no longer exchangeable with the calibration pixels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_virtualstain.core.bundle import load_bundle, resolve_bundle_path
from napari_virtualstain.core.confidence import (
    calibrate,
    crps_ensemble,
    interval_channels,
    load_calibration,
    nucleus_table,
    object_tables,
    predict_ensemble,
    save_calibration,
)
from napari_virtualstain.core.metrics import auroc, match_labels
from napari_virtualstain.train.data import load_config, split_regions
from napari_virtualstain.core.settings import RunSettings

ROOT = Path(__file__).resolve().parents[1]
NDEV = ROOT.parent / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"
LEVELS = (0.8, 0.9, 0.95)


def ndev_sets():
    d = tifffile.imread(NDEV)
    val = [(d[1, t][:, 490:], {"Hoechst": d[0, t][:, 490:]}, d[2, t][:, 490:]) for t in range(8)]
    test = [(d[1, t], {"Hoechst": d[0, t]}, d[2, t]) for t in (8, 9)]
    from scipy import ndimage as ndi

    # out of focus (a blur of 2.5 px) and noisier than the calibration frames: not exchangeable with them
    # (a global gain or gamma would not do: the input's percentile normalisation removes it)
    bf = d[1, 9].astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.05 * bf.std(), bf.shape)
    shifted = ndi.gaussian_filter(bf, 2.5) + noise.astype(np.float32)
    return val, test, [(shifted, {"Hoechst": d[0, 9]}, d[2, 9])]


def isl_sets(config: Path):
    """Calibration on ``config``'s validation regions (the bundle's own: never its training pixels), the held-out
    quadrant [512:, 512:] to score."""
    spec = load_config(config)
    _, val_r = split_regions(spec)
    val = [(im.inputs[:, :, xs], {s: im.stains[i][:, xs] for i, s in enumerate(spec.stain_names)}, None)
           for im, xs in val_r]
    base = ROOT.parent / "shared/data/isl_condition_b"
    from napari_virtualstain.core.io import read_image

    phase = np.stack([read_image(base / f"phase_z{z:02d}.png") for z in range(13)])[:, 512:, 512:]
    truth = {s: read_image(base / f"{f}.png")[512:, 512:] for s, f in zip(spec.stain_names, ("dapi", "map2", "nfh"))}
    return val, [(phase, truth, None)], []


def score(bundle, items, members: int, seed: int, multi: bool) -> dict:
    stains = [c.name for c in bundle.config.output_channels if c.kind == "stain"]
    cover = {s: {f"{lv:g}": [] for lv in LEVELS} for s in stains}
    cover_in = {s: {f"{lv:g}": [] for lv in LEVELS} for s in stains}  # inside the true nuclei only
    width = {s: {f"{lv:g}": [] for lv in LEVELS} for s in stains}
    crps, mae, spread, rmse = ({s: [] for s in stains} for _ in range(4))
    conf_rows, matched = [], []
    obj_cover, obj_width = {}, {}  # per predicted nucleus, per level: its mean Hoechst inside its interval?
    for image, truths, nuclei in items:
        ens = predict_ensemble(bundle, image, members, seed=seed, make_labels=nuclei is not None,
                               channel_axis=0 if multi else None, settings=RunSettings(threads=1))
        pred = ens.prediction
        std = ens.std
        for s in stains:
            c = pred.channel_names.index(s)
            y = np.asarray(truths[s], np.float64)
            m = np.stack(ens.members)[:, c]
            crps[s].append(crps_ensemble(m, y))
            mae[s].append(float(np.abs(pred.image[c] - y).mean()))
            spread[s].append(float(std[c].mean()))
            rmse[s].append(float(np.sqrt(((pred.image[c] - y) ** 2).mean())))
        for lv in LEVELS:
            planes, names = interval_channels(bundle, ens, lv)
            for s in stains:
                lo, hi = planes[names.index(f"{s} low {100 * lv:g}%")], planes[names.index(f"{s} high {100 * lv:g}%")]
                y = np.asarray(truths[s], np.float64)
                inside = (y >= lo) & (y <= hi)
                cover[s][f"{lv:g}"].append(float(inside.mean()))
                if nuclei is not None:
                    cover_in[s][f"{lv:g}"].append(float(inside[nuclei > 0].mean()))
                width[s][f"{lv:g}"].append(float((hi - lo).mean()))
        if nuclei is not None and "nuclei" in pred.labels:
            rows = nucleus_table(ens, "nuclei", "Hoechst")
            hits = {p for _, p, _ in match_labels(nuclei, pred.labels["nuclei"], 0.5, return_matches=True)["matches"]}
            conf_rows += rows
            matched += [r["label"] in hits for r in rows]
            if rows and "objects" in load_calibration(bundle):  # per-nucleus intervals of the mean Hoechst
                from scipy import ndimage as ndi

                real = ndi.mean(np.asarray(truths["Hoechst"], np.float64), pred.labels["nuclei"],
                                [r["label"] for r in rows])
                for lv in LEVELS:
                    tab = object_tables(bundle, ens, lv)["nuclei"]
                    low, high = f"Hoechst_low_{100 * lv:g}", f"Hoechst_high_{100 * lv:g}"
                    for r, y in zip(tab, real):
                        obj_cover.setdefault(f"{lv:g}", []).append(r[low] <= y <= r[high])
                        obj_width.setdefault(f"{lv:g}", []).append(r[high] - r[low])
    out = {"stains": {s: {"coverage": {k: float(np.mean(v)) for k, v in cover[s].items()},
                          "coverage_in_nuclei": {k: float(np.mean(v)) for k, v in cover_in[s].items() if v},
                          "mean_width": {k: float(np.mean(v)) for k, v in width[s].items()},
                          "crps": float(np.mean(crps[s])), "mae": float(np.mean(mae[s])),
                          "spread_skill": float(np.mean(spread[s]) / max(np.mean(rmse[s]), 1e-12))}
                      for s in stains}}
    if conf_rows:
        pos = np.array(matched)
        out["nuclei"] = {"n": len(pos), "matched_fraction": float(pos.mean()),
                         "auroc": {k: auroc(np.array([(-1 if k.startswith("std") else 1) * r[k] for r in conf_rows],
                                                     float), pos) for k in ("agreement", "found_by", "std_Hoechst")}}
        if obj_cover:
            out["nuclei"]["interval_coverage"] = {k: float(np.mean(v)) for k, v in obj_cover.items()}
            out["nuclei"]["interval_mean_width"] = {k: float(np.mean(v)) for k, v in obj_width.items()}
    return out


def own_field(bundle, test, members: int, seed: int, multi: bool) -> dict:
    """Calibrate on the held-out field's top half, cover its bottom half, and the other way round: the guarantee
    when the calibration pixels are exchangeable with the new ones (the same field, as a user's own calibration
    images would be). Leaves the bundle calibrated on the last half: call it after the held-out scores."""
    out = {}
    for cal_half, test_half in (("top", "bottom"), ("bottom", "top")):
        def rows(item, half):
            image, truths, nuclei = item
            h = image.shape[-2] // 2
            ys = slice(0, h) if half == "top" else slice(h, None)
            return (image[..., ys, :], {k: v[ys] for k, v in truths.items()},
                    None if nuclei is None else nuclei[ys])

        cal = [rows(it, cal_half) for it in test]
        record = calibrate(bundle, ((im, tr) for im, tr, _ in cal), LEVELS, members, seed,
                           channel_axis=0 if multi else None, settings=RunSettings(threads=1))
        save_calibration(bundle, record)
        out[f"calibrated on {cal_half}, covering {test_half}"] = score(
            bundle, [rows(it, test_half) for it in test], members, seed, multi)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--isl", action="store_true", help="the ISL quadrant (demo-isl bundles) instead of the scratch assay")
    p.add_argument("--config", default=None,
                   help="with --isl: the bundles' training config, whose validation regions calibrate "
                        "(default configs/demo-isl.yaml; configs/demo-isl-tiles.yaml for bundles trained on it)")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--own-field", action="store_true",
                   help="also recalibrate on one half of the held-out field (rows, top/bottom) and cover the other, "
                        "both ways: what 'virtualstain calibrate' on a user's own images of a new field gives")
    args = p.parse_args(argv)
    val, test, shifted = isl_sets(Path(args.config or ROOT / "configs/demo-isl.yaml")) if args.isl else ndev_sets()
    results = {}
    for name in args.bundles:
        t0 = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="vs-conf-")) / Path(name).name
        shutil.copytree(resolve_bundle_path(name), work)
        bundle = load_bundle(work)
        multi = len(bundle.config.input_channels) > 1
        record = calibrate(bundle, ((im, tr) for im, tr, _ in val), LEVELS, args.members, args.seed,
                           channel_axis=0 if multi else None, settings=RunSettings(threads=1))
        save_calibration(bundle, record)
        res = {"calibration": record, "held_out": score(bundle, test, args.members, args.seed, multi)}
        if shifted:
            res["shifted_input"] = score(bundle, shifted, args.members, args.seed, multi)
        if args.own_field:
            res["own_field"] = own_field(bundle, test, args.members, args.seed, multi)
            for half, r in res["own_field"].items():
                print(f"{name} {half}: coverage " + "; ".join(
                    f"{s} " + ", ".join(f"{k}: {v:.3f}" for k, v in m["coverage"].items())
                    for s, m in r["stains"].items()))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        h = res["held_out"]
        for s, m in h["stains"].items():
            print(f"{name} {s}: coverage " + ", ".join(f"{k}: {v:.3f}" for k, v in m["coverage"].items())
                  + f"; CRPS {m['crps']:.2f} vs MAE {m['mae']:.2f}; spread/skill {m['spread_skill']:.2f}"
                  + (f"; in nuclei: {m['coverage_in_nuclei']}" if m["coverage_in_nuclei"] else ""))
            if shifted:
                sc = res["shifted_input"]["stains"][s]["coverage"]
                print("   shifted input: coverage " + ", ".join(f"{k}: {v:.3f}" for k, v in sc.items()))
        if "nuclei" in h:
            print(f"{name} nuclei: n {h['nuclei']['n']}, AUROC " +
                  ", ".join(f"{k} {v:.3f}" for k, v in h["nuclei"]["auroc"].items()) +
                  "".join(f"; mean Hoechst interval coverage {k}: {v:.3f}"
                          for k, v in h["nuclei"].get("interval_coverage", {}).items()))
        shutil.rmtree(work.parent, ignore_errors=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
