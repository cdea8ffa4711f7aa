"""Turn a chosen training snapshot into a shippable demo bundle: named, fp16 weights, sampling defaults chosen on
the validation regions of its training config (never the held-out frames).

    python benchmarks/ship_demo.py runs/scaling/w16_c128/step_09600 -o runs/ship/demo-stain-regression \\
        --name demo-stain-regression --config configs/demo-stain.yaml

The bundle keeps its training record (``training``: every command, the validation history) and gains
``training.shipped_from`` (the snapshot and why). Then, for the mean-anchored ``demo-stain``, train the refinement on
it (docs/training.md, "Mean-anchored models") and run ``choose_defaults.py`` on that bundle. ``--network`` adds
independently trained snapshots of the same recipe: the shipped network is then the mean of all (a deep ensemble).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.train.data import load_config
from napari_virtualstain.train.defaults import choose_sampling, write_sampling
from napari_virtualstain.train.ensemble import join_networks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("snapshot")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--description", default=None)
    p.add_argument("--config", default="configs/demo-stain.yaml", help="its training config (validation regions)")
    p.add_argument("--note", default="", help="why this snapshot (e.g. the scaling study's validation winner)")
    p.add_argument("--results", default=None, help="write the defaults sweep (JSON) here")
    p.add_argument("--network", action="append", default=[],
                   help="a snapshot of the same recipe trained independently (another seed): its one-pass network "
                        "joins the bundle's, which then answers as their mean (a deep ensemble); repeatable")
    args = p.parse_args(argv)
    src = load_bundle(args.snapshot)
    config = src.config
    config.name = args.name
    if args.description:
        config.description = args.description
    config.training = {**config.training, "shipped_from": {"snapshot": str(args.snapshot), "id": src.id,
                                                           "note": args.note}}
    config.sampling = {}
    # each further network's own record (its recipe, seed, validation history) lands in training.networks
    bundle = join_networks(src, args.network, args.output, config=config, half=True)
    result = choose_sampling(bundle, load_config(args.config), log=print)
    bundle = write_sampling(args.output, result["chosen"], "napari_virtualstain.train.defaults on the validation "
                                                          "regions (benchmarks/ship_demo.py)")
    if args.results:
        Path(args.results).write_text(json.dumps(result, indent=1))
    print(bundle.summary())
    print("sampling:", bundle.config.sampling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
