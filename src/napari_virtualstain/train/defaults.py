"""Choose a stain bundle's sampling defaults on its own validation regions (never the held-out test data).

The candidates are predicted on exactly the regions training held out (``split_regions``) and scored with Pearson r
of each stain (truth's 1–99.8 % scale, as ``virtualstain evaluate``) and nuclei/cell F1@0.5 of each labels route.
Rules, in order (fewest network passes that are within ``tolerance`` of the best):
- steps (diffusion bundles): the fewest whose mean stain r is within the tolerance of the best step count (k = 1);
  a mean-anchored residual-shift bundle also offers 0 steps, its mean network alone: predict-then-refine refines
  only where refining pays on the user's own validation regions (on the scratch assay a better mean network left
  the refinement nothing to add, docs/benchmarks.md);
- samples: the fewest k at those steps whose mean stain r is within the tolerance of the best k;
- labels route: boundaries, stain or distance — the one with the highest F1 for the first labels set;
- labels thresholds, model-free on the predictions: per route, the foreground threshold (0.3-0.6) and, for the
  distance route, the centre threshold (0.3-0.6); the route and thresholds with the highest F1 (kept at 0.5 unless
  another wins by the tolerance) — swept at every flips/turns count below, since the best route can change with them;
- test-time augmentation: among the flips/turns (1, 4, 8) that keep the stain r within the tolerance of no TTA's,
  the fewest whose best-route, best-threshold F1 is within the tolerance of the best;
  (A regression network's foreground map is underconfident at nuclei edges: 0.3-0.4 measured best on the demos.)
The result is stored as the bundle's ``sampling`` (the id does not change: it is the weights' hash).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..core.bundle import Bundle, load_bundle
from ..core.errors import VirtualStainError
from ..core.io import atomic_write
from ..core.metrics import image_metrics, match_labels, normalize_pair, pool_matching
from ..core.tasks.stain import labels_from_channels, predict_stain
from .data import TrainingSpec, split_regions

TTA_CANDIDATES = (1, 4, 8)


def score_sampling(bundle: Bundle, regions, *, steps: int | None = None, samples: int = 1, tta: int = 1,
                   seed: int = 0, predictions: list | None = None) -> dict:
    """Mean stain r / SSIM and pooled F1@0.5 per 'labels set (route)' over the validation regions; each region's
    prediction is appended to ``predictions`` when given (the threshold sweep reuses them)."""
    c = bundle.config
    stains = [o.name for o in c.output_channels if o.kind == "stain"]
    rs, ss, matches = [], [], {}
    t0 = time.perf_counter()
    for im, xs in regions:
        multi = im.inputs.shape[0] > 1
        res = predict_stain(bundle, im.inputs[:, :, xs] if multi else im.inputs[0][:, xs],
                            channel_axis=0 if multi else None, seed=seed, steps=steps, samples=samples, tta=tta,
                            make_labels=False)
        if predictions is not None:
            predictions.append(res.image)
        for i, name in enumerate(stains):
            try:
                p, t, _ = normalize_pair(res.channel(name), im.stains[i][:, xs])
            except VirtualStainError:  # no stain in this region (a constant truth): nothing to correlate with
                continue
            m = image_metrics(p, t)
            rs.append(m["pearson"])
            ss.append(m["ssim"])
        for route in c.label_routes():
            for name, lab in labels_from_channels(c, res.image, route).items():
                if name in im.labels:
                    matches.setdefault(f"{name} ({route})", []).append(match_labels(im.labels[name][:, xs], lab, 0.5))
    return {"steps": steps, "samples": samples, "tta": tta, "r": float(np.mean(rs)) if rs else None,
            "ssim": float(np.mean(ss)) if ss else None,
            "f1": {k: pool_matching(v)["f1"] for k, v in matches.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def _fewest(rows: list[dict], key: str, value: Callable[[dict], float], tolerance: float):
    best = max(value(r) for r in rows)
    return min(r[key] for r in rows if value(r) >= best - tolerance)


def choose_sampling(bundle: Bundle, spec: TrainingSpec, *, steps=(1, 2, 3, 4, 8, 15), samples=(1, 2, 4, 8),
                    tta=TTA_CANDIDATES, tolerance: float = 0.01, log: Callable[[str], None] | None = None) -> dict:
    """The sweep and the chosen ``{"steps", "samples", "labels_from", "tta"}`` (module doc) for ``bundle``."""
    _, regions = split_regions(spec)
    if not regions:
        raise VirtualStainError("choosing defaults needs validation regions: the data holds nothing out (val "
                                "fraction 0 and no image marked split: val)")
    c = bundle.config
    say = log or (lambda text: None)

    predictions: dict[tuple, list] = {}  # (steps, samples, tta) -> each region's prediction

    def run(steps=None, samples=1, tta=1) -> dict:
        row = score_sampling(bundle, regions, steps=steps, samples=samples, tta=tta,
                             predictions=predictions.setdefault((steps, samples, tta), []))
        say(f"steps {row['steps']} k {row['samples']} tta {row['tta']}: r {row['r'] if row['r'] is None else round(row['r'], 3)} "
            + " ".join(f"F1 {k} {v:.3f}" for k, v in row["f1"].items()) + f" ({row['seconds']} s)")
        return row

    def r_of(row):  # no stain channel, or none in the validation regions: r does not decide
        return row["r"] if row["r"] is not None else 0.0

    diffusion = c.objective != "regression"
    if diffusion and c.objective == "residual_shift":
        T = c.scheduler["num_train_timesteps"]
        candidates = ((0,) if c.takes_zero_steps else ()) + tuple(s for s in steps if 1 <= s <= T)
        rows = [run(steps=s) for s in candidates]
        n_steps = _fewest(rows, "steps", r_of, tolerance)
    else:
        rows, n_steps = [run()], None
    krows = [next(r for r in rows if r["steps"] == n_steps)]
    if diffusion and n_steps != 0:  # the mean network alone draws no noise: every sample is the same
        krows += [run(steps=n_steps, samples=k) for k in samples if k > 1]
    n_samples = _fewest(krows, "samples", r_of, tolerance)
    chosen = next(r for r in krows if r["samples"] == n_samples)
    first_set = next((o.labels for o in c.output_channels if o.kind == "boundary"), None)
    routes = {k.split(" (")[1][:-1]: v for k, v in chosen["f1"].items() if k.split(" (")[0] == first_set}
    route = max(routes, key=routes.get) if routes else "boundaries"

    def f1_of(row):
        return row["f1"].get(f"{first_set} ({route})", 0.0)

    trows = [chosen] + [run(steps=n_steps, samples=n_samples, tta=n) for n in tta if n > 1]
    keeps_r = [r for r in trows if r_of(r) >= r_of(chosen) - tolerance]  # never trade stain r for F1
    tuned: dict[int, tuple[dict, list]] = {}
    if first_set is not None:  # route and thresholds chosen at every TTA: the tuned F1 decides how many passes
        for row in keeps_r:
            tuned[row["tta"]] = sweep_thresholds(bundle, regions, first_set, tolerance,
                                                 predictions=predictions[(n_steps, n_samples, row["tta"])])
            row["f1_tuned"] = max((g["f1"] for g in tuned[row["tta"]][1]), default=f1_of(row))
            say(f"tta {row['tta']}: F1 {first_set} with the best route and thresholds {row['f1_tuned']:.3f}")
    n_tta = _fewest(keeps_r, "tta", lambda r: r.get("f1_tuned", f1_of(r)), tolerance)
    picked = {"samples": n_samples, "labels_from": route, "tta": n_tta} | ({"steps": n_steps} if n_steps is not None
                                                                          else {})
    result = {"bundle_id": bundle.id, "validation_regions": len(regions), "chosen": picked, "steps_sweep": rows,
              "samples_sweep": krows, "tta_sweep": trows, "tolerance": tolerance}
    if n_tta in tuned:
        best, grid = tuned[n_tta]
        picked.update(best)
        result["threshold_sweep"] = grid
        say(f"labels: {best}")
    return result


THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


def sweep_thresholds(bundle: Bundle, regions, labels_set: str, tolerance: float, predictions: list | None = None,
                     **predict_kw) -> tuple[dict, list]:
    """Route and thresholds with the best pooled F1@0.5 of ``labels_set`` (model-free on one set of predictions:
    ``predictions`` of the regions, in their order, or predicted here with ``predict_kw``)."""
    c = bundle.config
    preds = []
    for i, (im, xs) in enumerate(regions):
        if labels_set not in im.labels:
            continue
        if predictions is not None:
            image = predictions[i]
        else:
            multi = im.inputs.shape[0] > 1
            image = predict_stain(bundle, im.inputs[:, :, xs] if multi else im.inputs[0][:, xs],
                                  channel_axis=0 if multi else None, make_labels=False, **predict_kw).image
        preds.append((image, im.labels[labels_set][:, xs]))
    rows = []
    for route in c.label_routes():
        centres = THRESHOLDS if route == "distance" else (None,)
        fgs = THRESHOLDS if route != "stain" else (None,)
        for fg in fgs:
            for ct in centres:
                ms = [match_labels(truth, labels_from_channels(c, img, route, foreground_threshold=fg,
                                                               center_threshold=ct)[labels_set], 0.5)
                      for img, truth in preds]
                rows.append({"labels_from": route, "foreground_threshold": fg, "center_threshold": ct,
                             "f1": pool_matching(ms)["f1"] if ms else 0.0})
    if not rows or not preds:
        return {}, rows
    best = max(rows, key=lambda r: r["f1"])
    plain = [r for r in rows if r["labels_from"] == best["labels_from"] and r["foreground_threshold"] in (None, 0.5)
             and r["center_threshold"] in (None, 0.5)]
    if plain and plain[0]["f1"] >= best["f1"] - tolerance:  # the defaults unless another setting clearly wins
        best = plain[0]
    return {k: v for k, v in best.items() if k != "f1" and v is not None}, rows


def write_sampling(bundle_path: str | Path, chosen: dict, note: str) -> Bundle:
    """Store ``chosen`` as the bundle's ``sampling`` in config.json (atomically) and check it still loads."""
    cfg_path = Path(bundle_path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sampling"] = dict(chosen) | {"chosen_by": note}
    with atomic_write(cfg_path) as part:
        part.write_text(json.dumps(cfg, indent=2) + "\n")
    return load_bundle(bundle_path)
