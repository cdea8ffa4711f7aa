"""``virtualstain predict``: images, folders and OME-Zarr plates in, stains + labels (+ tables, intervals) out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_files import (
    _parse_plane,
    _parse_window,
    already_written,
    expand_inputs,
    predict_item,
    prepare_outputs,
    settings_key,
)
from ..core.errors import VirtualStainError
from .common import compute_options


def cmd_predict(args) -> int:
    from ..core.bundle import load_bundle
    from ..core.io import check_output_folder
    from ..core.uncertainty import check_request

    check_output_folder(args.output)  # a bad -o is refused before the model loads
    bundle = load_bundle(args.checkpoint)
    _parse_plane(args.plane)  # a bad --plane is refused before any work
    uncertainty = args.uncertainty
    seeds = [args.seed + k for k in range(args.seeds)]
    if uncertainty:  # refuse bad settings before any image is read
        check_request(bundle, uncertainty, seeds, _parse_window(args.window), args.sampler, args.steps)
    elif args.seeds != 1:
        raise VirtualStainError("--seeds is for --uncertainty seeds|both (to average samples, use --samples K)")
    if uncertainty and args.rescale:
        raise VirtualStainError("--rescale is for plain predictions; resample the image to the checkpoint's pixel size "
                                "(see 'virtualstain info') before --uncertainty")
    if uncertainty and args.samples is not None:
        raise VirtualStainError("--samples averages plain predictions; with --uncertainty use --seeds K "
                                "(the 'avg' map is the mean over seeds)")
    images = expand_inputs(args.images)
    prepare_outputs(images, args)
    key = settings_key(bundle, args)
    todo = [p for p in images if not already_written(Path(args.output), p, key, args)]
    if len(todo) < len(images):
        print(f"skipped {len(images) - len(todo)} file(s)/field(s) already written with the same checkpoint and "
              f"settings (delete their outputs to recompute)", file=sys.stderr)
    if args.workers or args.scheduler:
        from ..runner import run_distributed

        failed = run_distributed(todo, args, key)
        if failed:
            raise VirtualStainError(f"{len(failed)} of {len(todo)} file(s) failed (after retries); the others are "
                                    "written, and a rerun does only what is missing:\n"
                                    + "\n".join(f"  {name}: {why}" for name, why in failed))
        return 0
    for path in todo:
        written = predict_item(path, bundle, args, key)
        print("\n".join(f"wrote {p}" for p in written))
    return 0


def _area_fraction(text: str) -> float:
    """--flag-max-area: a fraction of the image in (0, 1], refused by the parser (before any model runs)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction of the image in (0, 1] (1: keep every group), not {text!r}")
    return value


def add_parsers(sub) -> None:
    pr = sub.add_parser("predict", help="predict stains/boundaries for images or folders")
    pr.add_argument("images", nargs="+", help="image files (TIFF/OME-TIFF/PNG) or folders of them")
    pr.add_argument("--checkpoint", "-c", required=True, help="bundle folder or bundled demo name (see 'info')")
    pr.add_argument("--output", "-o", required=True, help="output folder")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--tile-size", type=int, default=None, help="default: the checkpoint's")
    pr.add_argument("--tile-overlap", type=int, default=None, help="default: the checkpoint's")
    pr.add_argument("--batch-size", type=int, default=4, help="tiles per network call")
    pr.add_argument("--block-size", type=int, default=None,
                    help="fields with a side longer than twice this run in blocks of at most this side, so memory "
                         "stays bounded (default: blocks of at most 1024, sized so the network's tiles fill them, "
                         "for a side over 2048; 0: always the whole field at once)")
    pr.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    pr.add_argument("--channel-axis", type=int, default=None, help="axis that holds the input channels")
    pr.add_argument("--pixel-size", type=float, default=None, metavar="UM",
                    help="the images' pixel size in um (default: from the OME/ImageJ metadata); compared with the "
                         "checkpoint's, a warning beyond +-20 %%")
    pr.add_argument("--rescale", action="store_true",
                    help="resample each image to the checkpoint's pixel size, predict, and resample the prediction back")
    pr.add_argument("--plane", default=None,
                    help="indices of leading axes to pick, e.g. '3' (t=3) or '1,0' (C=1, T=0 of a CTYX file)")
    pr.add_argument("--all-planes", action="store_true", help="predict every plane of a stack")
    pr.add_argument("--no-labels", action="store_true", help="skip instance labels from boundary channels")
    pr.add_argument("--boundary-threshold", type=float, default=None,
                    help="labels: boundary probability that separates objects (default: the checkpoint's validated "
                         "value, else 0.5)")
    pr.add_argument("--foreground-threshold", type=float, default=None,
                    help="labels: foreground probability inside an object (default: the checkpoint's, else 0.5)")
    pr.add_argument("--center-threshold", type=float, default=None,
                    help="labels from distance: centre-map value that seeds an object (default: the checkpoint's, "
                         "else 0.5)")
    pr.add_argument("--sampler", choices=["ddim", "ddpm"], default=None,
                    help="ddpm checkpoints: ddim (default, --steps 50) or ddpm (every training step)")
    pr.add_argument("--steps", type=int, default=None,
                    help="sampling steps: ddpm checkpoints (DDIM default 50); residual-shift checkpoints: an evenly "
                         "spaced subset of their chain, 0 = a mean-anchored checkpoint's mean network alone (default: the "
                         "checkpoint's validated count, else all)")
    pr.add_argument("--samples", type=int, default=None,
                    help="average this many samples (seeds SEED..SEED+k-1, one batch): more accurate, less textured; "
                         "default: the checkpoint's validated count (else 1)")
    pr.add_argument("--fill-nan", action="store_true",
                    help="give NaN/Inf pixels the value of their nearest finite pixel (any hole size) instead of "
                         "refusing the image")
    pr.add_argument("--objects", action="store_true",
                    help="also write <stem>_<labels>_objects.csv: one row per predicted nucleus/cell (id, centroid, "
                         "area, mean stain, ensemble std, confidence = mean IoU with the nuclei of the --members "
                         "flipped/turned (and, for diffusion checkpoints, reseeded) predictions)")
    pr.add_argument("--interval", type=float, default=None, metavar="LEVEL",
                    help="add calibrated LEVEL intervals (e.g. 0.9) as '<stain> low 90%%' / '<stain> high 90%%' "
                         "channels and, with --objects, each nucleus's <stain>_low_90 / _high_90 for its mean stain; "
                         "needs a calibrated checkpoint (virtualstain calibrate)")
    pr.add_argument("--members", type=int, default=4,
                    help="--objects / --interval: ensemble size (2-8; the prediction itself is one)")
    pr.add_argument("--tta", type=int, choices=[1, 2, 4, 8], default=None,
                    help="test-time augmentation: average the network over 1, 2, 4 (quarter turns) or 8 (+ mirrors) "
                         "transforms of every tile; costs that many passes (default: the checkpoint's validated "
                         "value, else 1)")
    pr.add_argument("--labels-from", choices=["boundaries", "stain", "distance"], default=None,
                    help="nuclei labels from the predicted boundary channels, by segmenting the predicted stain, or "
                         "seeded at the peaks of a distance (centre) channel (default: the checkpoint's validated route)")
    pr.add_argument("--uncertainty", choices=["steps", "seeds", "both"], default=None,
                    help="also write DDPMavg + std maps (<stem>_uncertainty.tif) and flagged regions (<stem>_flags_*)")
    pr.add_argument("--seeds", type=int, default=1, help="--uncertainty seeds|both: number of seeds (>= 2), batched")
    pr.add_argument("--window", default="0.3,0.8",
                    help="x̂0 averaging window as fractions of the schedule t/T in [LOW,HIGH) (DM4ISL: 0.3,0.8)")
    pr.add_argument("--flag-map", choices=["std_steps", "std_seeds"], default=None,
                    help="map to flag (default: std_seeds if computed, else std_steps)")
    pr.add_argument("--flag-threshold", type=float, default=None,
                    help="flag pixels above this std (in the channel's units); default: Otsu threshold of the map")
    pr.add_argument("--flag-otsu", action="store_true", help="Otsu again among the values above --flag-threshold")
    pr.add_argument("--flag-min-area", type=int, default=16, help="drop flagged regions smaller than this (pixels)")
    pr.add_argument("--flag-merge", type=int, default=3, help="join flagged fragments closer than this (pixels)")
    pr.add_argument("--flag-max-regions", type=int, default=20,
                    help="at most N regions per map (0: no limit): neighbours grouped, or the rest dropped with "
                         "--no-flag-group")
    compute_options(pr)
    pr.add_argument("--flag-max-area", type=_area_fraction, default=0.5,
                    help="the flag groups' boxes (the fields of view to review) cover at most this fraction of the "
                         "image; beyond it the flagged fragments that stretch a box most per unit of excess "
                         "uncertainty are dropped first (default 0.5; 1: keep all)")
    pr.add_argument("--flag-group", action=argparse.BooleanOptionalAction, default=True,
                    help="beyond --flag-max-regions: join neighbouring regions into that many compact groups (fields "
                         "of view to review; nothing dropped); --no-flag-group keeps the most uncertain and drops the rest")
    pr.add_argument("--workers", type=int, default=None,
                    help="predict the files as tasks on a local Dask cluster of N worker processes (a file per task, "
                         "retried on failure; a rerun skips files already written with the same checkpoint and "
                         "settings)")
    pr.add_argument("--scheduler", default=None, metavar="ADDRESS",
                    help="run the tasks on an existing Dask cluster (e.g. tcp://host:8786; dask-jobqueue, Kubernetes)")
    pr.add_argument("--retries", type=int, default=1, help="with --workers/--scheduler: retries of a failed file")
    pr.add_argument("--quiet", "-q", action="store_true")
    pr.set_defaults(func=cmd_predict)

