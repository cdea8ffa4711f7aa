"""``virtualstain translate`` / ``synthesize`` (class-conditional checkpoints) and ``phenotype`` (per-cell ratios)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..cli_files import (
    _parse_plane,
    expand_files,
    iter_planes,
    run_settings,
)
from ..core.errors import VirtualStainError
from .common import compute_options


def cmd_translate(args) -> int:
    """Invert each image under --from, regenerate under --to; write translation, control and difference."""
    from ..core.bundle import load_bundle
    from ..core.io import check_output_folder, output_name, read_image_file, write_channels
    from ..core.tasks.classcond import translate

    check_output_folder(args.output)
    bundle = load_bundle(args.checkpoint)
    config = bundle.config
    if config.task != "classcond":
        raise VirtualStainError(f"checkpoint {config.name!r} is a {config.task!r} model without classes; translate "
                                "needs a class-conditional checkpoint (see 'virtualstain info')")
    config.class_index(args.source), config.class_index(args.target)
    if args.source == args.target:
        print(f"note: --from and --to are both {args.source!r}: the output is the reconstruction control "
              "(inversion + regeneration error only)", file=sys.stderr)
    out = Path(args.output)
    plane = _parse_plane(args.plane)
    diffs, written = [], []
    plane_ndim = 2 if len(config.image_names) == 1 and args.channel_axis is None else 3
    for path in expand_files(args.images):
        f = read_image_file(path)  # the image and its axis letters from one open
        for idx, arr in iter_planes(f.data, plane, False, plane_ndim, f.axes):
            what = path.name + (f" plane {idx}" if idx else "")
            res = translate(bundle, arr, args.source, args.target, steps=args.steps, guidance=args.guidance,
                            strength=args.strength, channel_axis=args.channel_axis, input_name=what,
                            settings=run_settings(args, what))
            prov = res.provenance | {"input_file": str(path), "plane": list(idx)}
            stem = path.name.split(".")[0] + ("_" + "-".join(map(str, idx)) if idx else "")
            for kind, arr_out in (("translated", res.translated), ("control", res.control), ("difference", res.difference)):
                written.append(write_channels(out / output_name(kind, stem), arr_out, res.channel_names,
                                              prov | {"output": kind}, config.pixel_size_um))
            diffs.append((stem, res))
    shapes = {r.difference.shape for _, r in diffs}
    if len(diffs) > 1 and len(shapes) == 1:
        mean = np.mean([r.difference for _, r in diffs], axis=0)
        prov = diffs[0][1].provenance | {"output": "mean difference", "images": [s for s, _ in diffs]}
        written.append(write_channels(out / output_name("mean_difference", ""), mean, diffs[0][1].channel_names, prov,
                                      config.pixel_size_um))
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def cmd_synthesize(args) -> int:
    from ..core.bundle import load_bundle
    from ..core.io import check_output_folder, output_name, write_channels
    from ..core.tasks.classcond import synthesize

    check_output_folder(args.output)
    bundle = load_bundle(args.checkpoint)
    condition = None
    if args.condition:
        from ..core.io import read_image

        condition = read_image(args.condition)
        if args.size:
            raise VirtualStainError("--size and --condition exclude each other: the samples take the condition "
                                    "image's size")
    res = synthesize(bundle, args.class_name, args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                     size=args.size, condition=condition, channel_axis=args.channel_axis,
                     settings=run_settings(args, f"{args.n} x {args.class_name}"))
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in args.class_name)
    path = write_channels(Path(args.output) / output_name("samples", name), res.images, res.channel_names, res.provenance,
                          bundle.config.pixel_size_um)
    print(f"wrote {path}")
    return 0


def cmd_phenotype(args) -> int:
    """Per-cell nuclear/cytoplasmic marker ratios of groups of images (e.g. source, translated, real target)."""
    import csv
    import glob

    from ..core.io import read_channel_names, read_image
    from ..core.phenotype import compare, fraction_of_the_way, histogram_figure, measure_image

    groups: dict[str, list[Path]] = {}
    for text in args.group:
        name, sep, where = text.partition("=")
        if not sep or not name or not where:
            raise VirtualStainError(f"--group takes NAME=FOLDER, NAME=FILE or NAME='GLOB', got {text!r}")
        files = [Path(f) for f in sorted(glob.glob(where))] if any(c in where for c in "*?[") else \
            expand_files([where])
        if not files:
            raise VirtualStainError(f"--group {name}: nothing matches {where!r}")
        groups[name] = files

    def channel(path: Path, which: str, n: int) -> int:
        if which.isdigit():
            return int(which)
        names = read_channel_names(path) if path.suffix.lower() in (".tif", ".tiff") else []
        if which in names:
            return names.index(which)
        raise VirtualStainError(f"{path.name} has no channel named {which!r} (its channels: {names or 'unnamed'}); "
                                f"give --marker / --dna as a name it has or as an index 0-{n - 1}")

    rows, ratios = [], {}
    for name, files in groups.items():
        values = []
        for path in files:
            image = read_image(path)
            if image.ndim != 3:
                raise VirtualStainError(f"{path.name}: expected a multi-channel (C, Y, X) image, got {image.shape}")
            cells = measure_image(image, channel(path, args.marker, image.shape[0]), channel(path, args.dna, image.shape[0]),
                                  ring_width=args.ring_width)
            values.append(cells.ratio)
            rows += [{"group": name, "file": path.name, **r} for r in cells.rows()]
        ratios[name] = np.concatenate(values) if values else np.zeros(0)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cells.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["group", "file", "cell", "area", "nuclear_mean", "ring_mean", "ratio"])
        w.writeheader()
        w.writerows(rows)
    names = list(ratios)
    summary = {"marker": args.marker, "dna": args.dna, "ring_width": args.ring_width,
               "groups": {k: {"cells": int(len(v)), "median_ratio": float(np.median(v)) if len(v) else None}
                          for k, v in ratios.items()},
               "pairs": {f"{a} vs {b}": compare(ratios[a], ratios[b]) for i, a in enumerate(names) for b in names[i + 1:]}}
    if {"source", "translated", "target"} <= set(ratios):
        summary["fraction_of_the_way"] = fraction_of_the_way(ratios["source"], ratios["translated"], ratios["target"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    histogram_figure(ratios, out / "ratios.png", f"{args.marker} nuclear / cytoplasmic ratio")
    for k, g in summary["groups"].items():
        print(f"{k}: {g['cells']} cells, median ratio {g['median_ratio']:.3f}" if g["cells"] else f"{k}: no cells")
    for pair, c in summary["pairs"].items():
        if "ks" in c:
            print(f"{pair}: KS {c['ks']:.3f}, Wasserstein {c['wasserstein']:.3f}")
    if "fraction_of_the_way" in summary:
        print(f"translated moved {100 * summary['fraction_of_the_way']:.0f} % of the way from source to target")
    print(f"wrote {out / 'cells.csv'}, {out / 'summary.json'}, {out / 'ratios.png'}")
    return 0


def add_parsers(sub) -> None:
    tl = sub.add_parser("translate", help="condition translation: invert under --from, regenerate under --to (+ control)")
    tl.add_argument("images", nargs="+", help="images (channels as the checkpoint lists them) or folders")
    tl.add_argument("--checkpoint", "-c", required=True, help="class-conditional bundle folder or demo name")
    tl.add_argument("--from", dest="source", required=True, help="the images' own class")
    tl.add_argument("--to", dest="target", required=True, help="class to translate to")
    tl.add_argument("--output", "-o", required=True)
    tl.add_argument("--steps", type=int, default=50, help="DDIM steps for inversion and for regeneration")
    tl.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance scale (1 = none; default: the checkpoint's validated setting, else 1)")
    tl.add_argument("--strength", type=float, default=None,
                    help="how far to invert, as a fraction of the schedule (1 = to noise, as PhenDiff)")
    tl.add_argument("--tile-size", type=int, default=None)
    tl.add_argument("--tile-overlap", type=int, default=None)
    tl.add_argument("--batch-size", type=int, default=4)
    tl.add_argument("--device", default="auto")
    tl.add_argument("--channel-axis", type=int, default=None)
    tl.add_argument("--plane", default=None, help="indices of leading axes to pick (see predict)")
    compute_options(tl)
    tl.add_argument("--quiet", "-q", action="store_true")
    tl.set_defaults(func=cmd_translate)


    sy = sub.add_parser("synthesize", help="generate samples of a class from a class-conditional checkpoint")
    sy.add_argument("--checkpoint", "-c", required=True)
    sy.add_argument("--class", dest="class_name", required=True)
    sy.add_argument("-n", type=int, default=16, help="number of samples")
    sy.add_argument("--output", "-o", required=True)
    sy.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    sy.add_argument("--steps", type=int, default=50)
    sy.add_argument("--guidance", type=float, default=1.0)
    sy.add_argument("--size", type=int, default=None, help="side in pixels (default: the training crop size)")
    sy.add_argument("--condition", default=None, metavar="FILE",
                    help="checkpoints with invariant channels (NF-kB given DNA): the image of those channels to "
                         "generate for; the samples take its size and keep it as it is")
    sy.add_argument("--channel-axis", type=int, default=None,
                    help="--condition with several invariant channels: their axis in the file")
    sy.add_argument("--batch-size", type=int, default=4)
    sy.add_argument("--device", default="auto")
    compute_options(sy)
    sy.add_argument("--quiet", "-q", action="store_true")
    sy.set_defaults(func=cmd_synthesize)


    ph = sub.add_parser("phenotype", help="per-cell nuclear/cytoplasmic marker ratios of groups of images",
                        description="Nuclei from the DNA channel (Otsu + watershed), a cytoplasmic ring around each, "
                                    "the marker's nuclear/ring ratio per cell; per-group medians, KS and Wasserstein "
                                    "distances between groups, a histogram figure. Groups named source, translated "
                                    "and target also give the fraction of the way the translation moved.")
    ph.add_argument("--group", action="append", required=True, metavar="NAME=PATH",
                    help="a folder, a file or a quoted glob (e.g. translated='out/*_translated.tif'); repeat")
    ph.add_argument("--marker", default="NF-kB", help="marker channel: a name the files carry, or an index")
    ph.add_argument("--dna", default="DNA", help="nuclear channel: a name the files carry, or an index")
    ph.add_argument("--ring-width", type=int, default=6, help="cytoplasmic ring width in pixels")
    ph.add_argument("--output", "-o", required=True, help="report folder (cells.csv, summary.json, ratios.png)")
    ph.set_defaults(func=cmd_phenotype)

