"""Choose a stain bundle's sampling defaults (steps, samples averaged, labels route) on its own validation regions.

    python benchmarks/choose_defaults.py runs/demo-stain configs/demo-stain.yaml --write \\
        -o benchmarks/results/defaults_demo-stain.json

Reads the training config, takes exactly the regions training held out for validation (``split_regions``: never the
held-out test frames), predicts them with every candidate setting and scores Pearson r / SSIM of each stain (truth's
1-99.8 % scale, as ``virtualstain evaluate``) and F1@0.5 of each labels set. Rules, in order:
- steps: the fewest whose mean stain r is within ``--tolerance`` of the best step count (k = 1);
- samples: the fewest k (at those steps) whose mean stain r is within the tolerance of the best k;
- labels: the route (boundaries or stain) with the higher F1 for the labels set the bundle can take from a stain.
``--write`` stores ``{"steps", "samples", "labels_from"}`` as the bundle's ``sampling`` (the id does not change: it
is the weights' hash).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.metrics import image_metrics, match_labels, normalize_pair
from napari_virtualstain.core.tasks.stain import labels_from_channels, predict_stain
from napari_virtualstain.train.data import load_config, split_regions


def score(bundle, regions, steps: int | None, samples: int, seed: int = 0) -> dict:
    """Mean stain r/SSIM and per-labels-set F1 (both routes) over the validation regions."""
    c = bundle.config
    stains = [o.name for o in c.output_channels if o.kind == "stain"]
    rs, ss, f1 = [], [], {}
    t0 = time.perf_counter()
    for im, xs in regions:
        res = predict_stain(bundle, im.inputs[:, :, xs] if im.inputs.shape[0] > 1 else im.inputs[0][:, xs],
                            channel_axis=0 if im.inputs.shape[0] > 1 else None, seed=seed, steps=steps,
                            samples=samples, make_labels=False)
        for i, name in enumerate(stains):
            p, t, _ = normalize_pair(res.channel(name), im.stains[i][:, xs])
            m = image_metrics(p, t)
            rs.append(m["pearson"])
            ss.append(m["ssim"])
        for route in (["boundaries", "stain"] if c.labels_from_stain else ["boundaries"]):
            for name, lab in labels_from_channels(c, res.image, route).items():
                if name in im.labels:
                    f1.setdefault(f"{name} ({route})", []).append(
                        (match_labels(im.labels[name][:, xs], lab, 0.5), len(np.unique(im.labels[name][:, xs])) - 1))
    pooled = {}
    for key, rows in f1.items():  # pool tp/fp/fn over regions
        tp = sum(r["tp"] for r, _ in rows)
        fp = sum(r["fp"] for r, _ in rows)
        fn = sum(r["fn"] for r, _ in rows)
        pooled[key] = 2 * tp / max(1, 2 * tp + fp + fn)
    return {"steps": steps, "samples": samples, "r": float(np.mean(rs)), "ssim": float(np.mean(ss)),
            "f1": pooled, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("config", help="the training config the bundle was trained from (its validation regions)")
    p.add_argument("--steps", default="1,2,3,4,8,15")
    p.add_argument("--samples", default="1,2,4,8")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--write", action="store_true", help="store the chosen defaults in the bundle's config.json")
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    _, regions = split_regions(load_config(args.config))
    T = bundle.config.scheduler["num_train_timesteps"]
    rows = [score(bundle, regions, s, 1) for s in (int(v) for v in args.steps.split(",")) if s <= T]
    best = max(r["r"] for r in rows)
    steps = min(r["steps"] for r in rows if r["r"] >= best - args.tolerance)
    krows = [next(r for r in rows if r["steps"] == steps)]
    krows += [score(bundle, regions, steps, k) for k in (int(v) for v in args.samples.split(",")) if k > 1]
    best_k = max(r["r"] for r in krows)
    samples = min(r["samples"] for r in krows if r["r"] >= best_k - args.tolerance)
    chosen = next(r for r in krows if r["samples"] == samples)
    routes = {k.split(" (")[1][:-1]: v for k, v in chosen["f1"].items()
              if k.split(" (")[0] in bundle.config.labels_from_stain}
    labels_from = max(routes, key=routes.get) if routes else "boundaries"
    result = {"bundle": args.bundle, "bundle_id": bundle.id, "validation_regions": len(regions),
              "chosen": {"steps": steps, "samples": samples, "labels_from": labels_from},
              "steps_sweep": rows, "samples_sweep": krows, "tolerance": args.tolerance}
    for r in rows + krows[1:]:
        print(f"steps {r['steps']:>2} k {r['samples']}: r {r['r']:.3f} SSIM {r['ssim']:.3f} "
              + " ".join(f"F1 {k} {v:.3f}" for k, v in r["f1"].items()) + f"  ({r['seconds']} s)")
    print("chosen:", result["chosen"])
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    if args.write:
        cfg_path = Path(bundle.path) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["sampling"] = result["chosen"] | {"chosen_by": "benchmarks/choose_defaults.py on the validation regions"}
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        load_bundle(bundle.path)  # still valid
    return 0


if __name__ == "__main__":
    sys.exit(main())
