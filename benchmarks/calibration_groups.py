"""Which pixel groups should split-conformal intervals be calibrated in? Leave-one-region-out on validation data.

    python benchmarks/calibration_groups.py demo-isl --isl -o benchmarks/results/calibration_groups_isl.json
    python benchmarks/calibration_groups.py demo-stain -o benchmarks/results/calibration_groups_ndev.json

Every validation region of the bundle's training config (the ISL strips of quadrants 00/01/10, or the scratch
assay's right-hand strips of t0-t7 — never trained on, and never the held-out quadrant / frames) is predicted once
as a 4-member ensemble (``core.confidence.predict_ensemble``). Then each region in turn is left out: q̂ is
calibrated on the others and the 90 % interval's coverage is measured on it, for three groupings of the pixels
(Mondrian conformal: one q̂ per group) and one rule over fields:

- ``one``: a single q̂ for every pixel (marginal);
- ``foreground``: inside / outside the predicted nuclei foreground (what ``calibrate`` does where the bundle has a
  foreground channel; ``one`` otherwise);
- ``intensity``: pixels whose predicted stain is above / below the Otsu level of the calibration regions'
  predictions (bright structures — nuclei, dendrites — are where the error is large);
- ``field_max`` (not a grouping): the largest of the calibration regions' own q̂ — pixels of one field are not
  independent, so the spread between fields, not the pixel count, decides how a new field is covered.

``--sigma-floors`` sweeps σ0 of the score |y − ŷ| / (σ + σ0), as a fraction of the stain's fixed scale (the
shipped ``core.confidence.SIGMA_FLOOR`` is one of them; ``inf`` = a constant-width interval, q̂ in stain units),
with one q̂ for all pixels: how much of the interval should follow the ensemble's spread when the spread is 5-10x
smaller than the error? Each floor reports the left-out regions' coverage and the mean half-width (stain units).

A grouping that matches how the error varies keeps the coverage near 90 % on a region whose mix of bright and dim
pixels differs from the calibration regions' — the failure the ISL quadrant showed (DAPI 82–83 %).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_study import _frames, isl_regions  # noqa: E402

from napari_virtualstain.core.bundle import load_bundle  # noqa: E402
from napari_virtualstain.core.confidence import (  # noqa: E402
    SIGMA_FLOOR,
    _sigma0,
    conformal_quantile,
    conformity_scores,
    pixel_groups,
    predict_ensemble,
)
from napari_virtualstain.core.settings import RunSettings  # noqa: E402

LEVEL = 0.9
STAINS_ISL = ("DAPI", "MAP2", "NFH")  # configs/demo-isl.yaml's stains, in order


def otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(np.asarray(values, np.float64)))


def regions(isl: bool):
    """(name, image, {stain: truth}, channel_axis) per validation region."""
    if isl:
        for im, xs, ys in isl_regions()["val"]:
            yield im.name, im.inputs[:, ys, xs], {n: im.stains[i][ys, xs] for i, n in enumerate(STAINS_ISL)}, 0
    else:
        for t, (bf, hoechst, _) in enumerate(_frames()["val"]):
            yield f"t{t}", bf, {"Hoechst": hoechst}, None


def sweep_floors(items, stain: str, floors) -> dict:
    """Leave-one-region-out 90 % coverage and mean half-width per σ0 fraction (one q̂ for all pixels)."""
    out = {}
    for f in floors:
        def score(d):
            return d["err"] if math.isinf(f) else d["err"] / (d["std"] + f * d["unit"])

        def half(d, q):
            return np.full(d["err"].shape, q) if math.isinf(f) else q * (d["std"] + f * d["unit"])

        cov, width = [], []
        for k, (_, per) in enumerate(items):
            cal = np.concatenate([score(it[1][stain]) for j, it in enumerate(items) if j != k])
            q = conformal_quantile(cal, LEVEL)
            test = per[stain]
            cov.append(float(np.mean(score(test) <= q)))
            width.append(float(np.mean(half(test, q))))
        out[f"{f:g}"] = {"per_region": [round(v, 4) for v in cov], "mean": round(float(np.mean(cov)), 4),
                         "min": round(float(np.min(cov)), 4),
                         "mean_abs_error": round(float(np.mean(np.abs(np.array(cov) - LEVEL))), 4),
                         "half_width": round(float(np.mean(width)), 2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--isl", action="store_true", help="the ISL config's validation strips (else the scratch assay's)")
    p.add_argument("--sigma-floors", default="", help="comma-separated σ0 fractions to sweep, e.g. 0,0.01,0.1,inf")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    floors = [float(f) for f in args.sigma_floors.split(",") if f.strip()]
    bundle = load_bundle(args.bundle)
    items = []
    for name, image, truths, axis in regions(args.isl):
        ens = predict_ensemble(bundle, image, 4, seed=0, make_labels=False, channel_axis=axis,
                               settings=RunSettings(threads=1))
        pred = ens.prediction
        fg = pixel_groups(bundle, pred).ravel()
        per = {s: {"score": conformity_scores(bundle, ens, s, truth).ravel(), "pred": pred.channel(s).ravel(), "fg": fg,
                   "err": np.abs(np.asarray(truth, np.float64) - pred.channel(s)).ravel(),
                   "std": ens.std[pred.channel_names.index(s)].ravel().astype(np.float64),
                   "unit": _sigma0(bundle, s) / SIGMA_FLOOR}
               for s, truth in truths.items()}
        items.append((name, per))
        print("predicted", name, flush=True)
    stains = list(items[0][1])
    out = {"bundle": bundle.config.name, "bundle_id": bundle.id, "level": LEVEL, "regions": [n for n, _ in items],
           "coverage": {}}
    for s in stains:
        rows = {g: [] for g in ("one", "foreground", "intensity", "field_max")}
        for k, (name, per) in enumerate(items):
            cal = [it[1][s] for j, it in enumerate(items) if j != k]
            test = per[s]
            score = np.concatenate([c["score"] for c in cal])
            level_cut = otsu(np.concatenate([c["pred"] for c in cal]))
            splits = {"one": (np.zeros(score.size, bool), np.zeros(test["score"].size, bool)),
                      "foreground": (np.concatenate([c["fg"] for c in cal]) > 0, test["fg"] > 0),
                      "intensity": (np.concatenate([c["pred"] for c in cal]) > level_cut, test["pred"] > level_cut)}
            # the largest of the calibration regions' own q̂ (each region a unit: fields, not pixels, vary)
            rows["field_max"].append(float(np.mean(
                test["score"] <= max(conformal_quantile(c["score"], LEVEL) for c in cal))))
            for g, (cal_in, test_in) in splits.items():
                q = np.empty(test["score"].size)
                for flag in (False, True):
                    part = score[cal_in == flag]
                    q[test_in == flag] = conformal_quantile(part if part.size else score, LEVEL)
                rows[g].append(float(np.mean(test["score"] <= q)))
        out["coverage"][s] = {g: {"per_region": [round(v, 4) for v in vs], "mean": round(float(np.mean(vs)), 4),
                                  "min": round(float(np.min(vs)), 4),
                                  "mean_abs_error": round(float(np.mean(np.abs(np.array(vs) - LEVEL))), 4)}
                              for g, vs in rows.items()}
        print(s, json.dumps({g: (v["mean"], v["min"], v["mean_abs_error"]) for g, v in out["coverage"][s].items()}))
        if floors:
            out.setdefault("sigma_floor", {})[s] = sweep_floors(items, s, floors)
            print(s, "sigma floors", json.dumps({f: (v["mean"], v["min"], v["half_width"])
                                                 for f, v in out["sigma_floor"][s].items()}))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
