"""``virtualstain``: train, predict, evaluate and inspect checkpoints from the command line (same core as the widgets).

Every user error (bad image, bad checkpoint, bad option) ends as one ``error: ...`` line and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from . import __version__
from .cli_files import (
    PRECISIONS,
    _compute,
    _parse_plane,
    _parse_window,
    _progress_printer,
    already_written,
    expand_files,
    expand_inputs,
    iter_planes,
    predict_item,
    prepare_outputs,
    settings_key,
)
from .core.errors import VirtualStainError

log = logging.getLogger("napari_virtualstain")


def cmd_predict(args) -> int:
    from .core.bundle import load_bundle
    from .core.io import check_output_folder
    from .core.uncertainty import check_request

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
        from .runner import run_distributed

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


def cmd_export_bioimageio(args) -> int:
    from .core.bundle import load_bundle
    from .core.io import read_image

    try:
        import bioimageio.core  # noqa: F401

        from .core.export import export_bioimageio, one_pass_network
    except ModuleNotFoundError:
        raise VirtualStainError("export-bioimageio needs bioimageio.core: pip install 'napari-virtualstain[bioimageio]'"
                                ) from None
    bundle = load_bundle(args.checkpoint)
    one_pass_network(bundle)  # refuse a diffusion-only checkpoint before reading anything
    if args.test_image:
        image, name = read_image(args.test_image), Path(args.test_image).name
        plane = _parse_plane(args.plane)
        if plane is not None:
            image = next(iter_planes(image, plane, False, 2))[1]
    elif "ndev-sampledata" in str(bundle.config.training.get("data", "")):
        from ._sample_data import scratch_assay_path

        image, name = read_image(scratch_assay_path())[1, 9], "scratch assay (ndev-sampledata), held-out time point 9"
    else:
        raise VirtualStainError("give a real image for the package's test input: --test-image FILE (one brightfield "
                                "plane; --plane picks one from a stack)")
    if image.ndim != 2:
        raise VirtualStainError(f"the test image has shape {image.shape}; pick one plane with --plane")
    out = export_bioimageio(bundle, image, args.output, test_name=name)
    print(f"wrote {out}")
    if not args.no_check:
        from bioimageio.core import test_model

        summary = test_model(out)
        print(f"bioimageio.core test: {summary.status}")
        if summary.status != "passed":
            raise VirtualStainError(f"the written package failed bioimageio.core's test:\n{summary.format()}")
    return 0


def _load_training_spec(args):
    """A paired-stain spec, or a class-conditional one (--task classcond, a 'task: classcond' config, or a CSV)."""
    from .train.classcond_data import load_class_csv, load_class_folders, load_classcond_config
    from .train.data import load_config, load_folder

    src = Path(args.data)
    names = _split_names(args.stain_names)
    if src.is_dir():
        if args.task == "classcond":
            return load_class_folders(src, names)
        return load_folder(src, _split_names(args.input_names), names, args.channel_axis)
    if not src.is_file():
        raise VirtualStainError(f"training data {src} is neither a folder nor a YAML/JSON/CSV file")
    if src.suffix.lower() == ".csv":
        return load_class_csv(src, names)
    raw = None
    if src.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            raw = yaml.safe_load(src.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise VirtualStainError(f"{src} is not valid YAML/JSON: {exc}") from None
    if isinstance(raw, dict) and (raw.get("task") == "classcond" or args.task == "classcond"):
        return load_classcond_config(src, raw)
    if args.task == "classcond":
        raise VirtualStainError(f"{src}: --task classcond needs class folders, a CSV (image,class) or a classcond config")
    return load_config(src)


def cmd_train(args) -> int:
    from .train.loop import TrainOptions, train

    spec = _load_training_spec(args)
    if args.name:
        spec.name = args.name
    elif Path(args.data).is_dir():  # a data folder is usually called 'train': name the bundle after its own folder
        spec.name = Path(args.output).resolve().name or spec.name
    if args.pixel_size:
        spec.pixel_size_um = args.pixel_size
    if args.val_fraction is not None and hasattr(spec, "val_fraction"):
        spec.val_fraction = args.val_fraction
    from .train.classcond_data import ClassCondSpec

    classcond = isinstance(spec, ClassCondSpec)
    if classcond and args.init:
        raise VirtualStainError("--init fine-tunes virtual-stain models; class-conditional training starts from scratch")
    if args.invariant is not None:
        if not classcond:
            raise VirtualStainError("--invariant is for class-conditional training (--task classcond): a stain model's "
                                    "inputs are already its conditioning")
        spec.invariant = _split_names(args.invariant) or []
        spec.check_invariant()
    opts = TrainOptions(
        objective=args.objective or ("ddpm" if classcond else "residual_shift"), steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size, lr=args.lr,
        ema_decay=args.ema_decay, val_every=args.val_every, seed=args.seed, device=args.device,
        block_out_channels=tuple(int(v) for v in args.channels.split(",")), layers_per_block=args.layers_per_block,
        tile_size=args.tile_size, tile_overlap=args.tile_overlap, half_weights=args.half_weights,
        command="virtualstain " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        prediction_type=args.prediction_type, precision=args.precision, lr_schedule=args.lr_schedule,
        residual_source=args.residual_source or "mean_input", mean_from=args.mean_from, kappa=args.kappa,
        max_minutes=args.max_minutes, init=args.init, loss=args.loss, distance_head=args.distance_head, augment=args.augment,
        extra={"cond_dropout": args.cond_dropout} if args.cond_dropout is not None else {},
    )
    from .train import distributed

    multi = distributed.launched_by_torchrun()
    recipe = (not classcond and args.objective is None and args.residual_source is None and not args.mean_from)
    if recipe:
        from .train.recipe import train_recommended

        bundle, history = train_recommended(spec, args.output, opts, resume=args.resume)
    else:
        bundle, history = train(spec, args.output, opts, resume=args.resume)
    if bundle is not None:  # under torchrun, rank 0 reports
        print(bundle.summary())
        if history and "val" in history[-1]:
            print("validation (held-out):", json.dumps(history[-1]["val"], indent=1))
    if multi:  # the bundle is written: leave without an interpreter shutdown that can hang on gloo's threads
        distributed.exit_now(0)
    return 0


def _split_names(text: str | None):
    return [s.strip() for s in text.split(",")] if text else None


def cmd_calibrate(args) -> int:
    """Split-conformal scale of the ensemble std (core/confidence.py) from images with ground truth."""
    from .core.bundle import load_bundle
    from .core.confidence import calibrate, save_calibration
    from .train.data import load_config, load_folder, split_regions

    bundle = load_bundle(args.checkpoint)
    src = Path(args.data)
    spec = (load_folder(src, _split_names(args.input_names), _split_names(args.stain_names)) if src.is_dir()
            else load_config(src))
    train_r, val_r = split_regions(spec)
    regions = val_r if args.regions == "val" else [(im, slice(None)) for im in spec.images]
    if not regions:
        raise VirtualStainError(f"{src} holds no validation regions; use --regions all")
    missing = [s for s in spec.stain_names if s not in bundle.config.output_names]
    if missing or not spec.stain_names:
        raise VirtualStainError(f"the data's stains ({', '.join(spec.stain_names) or 'none'}) must be named as the "
                                f"checkpoint's ({', '.join(bundle.config.output_names)}): --stain-names")

    def pairs():
        for im, xs in regions:
            multi = im.inputs.shape[0] > 1
            image = im.inputs[:, :, xs] if multi else im.inputs[0][:, xs]
            yield image, {s: im.stains[i][:, xs] for i, s in enumerate(spec.stain_names)}

    levels = tuple(float(v) for v in args.levels.split(","))
    multi_input = len(bundle.config.input_channels) > 1
    record = calibrate(bundle, pairs(), levels, args.members, args.seed, channel_axis=0 if multi_input else None,
                       **_compute(args))
    record["data"] = str(src)
    record["regions"] = args.regions
    path = save_calibration(bundle, record)
    for s, e in record["stains"].items():
        for g, qs in e["q"].items():
            print(f"{s} ({g}, {e['pixels'][g]} pixels): q " + ", ".join(f"{k}: {v:.3g}" for k, v in qs.items()))
    print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    from .core.bundle import bundled_checkpoints, load_bundle

    if not args.checkpoint:
        demos = bundled_checkpoints()
        print("bundled checkpoints:" if demos else "no bundled checkpoints installed")
        for name in demos:
            print(" ", load_bundle(name).summary().replace("\n", "\n  "))
        return 0
    print(load_bundle(args.checkpoint).summary())
    return 0


def cmd_demo(args) -> int:
    """Predict the bundled demo on the scratch-assay time point it never saw, and say how close it is."""
    from .core.bundle import load_bundle
    from .core.io import read_image, write_channels, write_labels
    from .core.metrics import image_metrics, normalize_pair
    from .core.tasks.stain import predict_stain
    from ._sample_data import scratch_assay_path

    try:
        path = scratch_assay_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise VirtualStainError(str(exc)) from None
    data = read_image(path)  # (C, T, Y, X): Hoechst, brightfield, nuclei labels, cell labels
    t = data.shape[1] - 1
    from .core.io import check_output_folder

    check_output_folder(args.output)
    bundle = load_bundle(args.checkpoint)
    res = predict_stain(bundle, data[1, t], seed=args.seed, device=args.device, **_compute(args),
                        input_name=f"scratch assay t={t}", progress=_progress_printer(f"scratch assay t={t}"))
    out = Path(args.output)
    written = [write_channels(out / "scratch_assay_virtualstain.tif", res.image, res.channel_names, res.provenance,
                              bundle.config.pixel_size_um)]
    for name, lab in res.labels.items():
        written.append(write_labels(out / f"scratch_assay_{name}_labels.tif", lab, res.provenance | {"labels": name}))
    print("\n".join(f"wrote {p}" for p in written))
    if "Hoechst" in res.channel_names:
        pred, truth, _ = normalize_pair(res.channel("Hoechst"), data[0, t])
        m = image_metrics(pred, truth)
        print(f"Hoechst vs the real stain (held-out t={t}): Pearson r {m['pearson']:.3f}, SSIM {m['ssim']:.3f}, "
              f"PSNR {m['psnr']:.1f} dB")
    return 0


def cmd_translate(args) -> int:
    """Invert each image under --from, regenerate under --to; write translation, control and difference."""
    from .core.bundle import load_bundle
    from .core.io import read_axes, read_image, write_channels
    from .core.io import check_output_folder
    from .core.tasks.classcond import translate

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
        image = read_image(path)
        for idx, arr in iter_planes(image, plane, False, plane_ndim, read_axes(path)):
            what = path.name + (f" plane {idx}" if idx else "")
            res = translate(bundle, arr, args.source, args.target, steps=args.steps, guidance=args.guidance,
                            strength=args.strength, channel_axis=args.channel_axis, tile_size=args.tile_size,
                            tile_overlap=args.tile_overlap, batch_size=args.batch_size, device=args.device,
                            **_compute(args),
                            progress=_progress_printer(what) if not args.quiet else None, input_name=what)
            prov = res.provenance | {"input_file": str(path), "plane": list(idx)}
            stem = path.name.split(".")[0] + ("_" + "-".join(map(str, idx)) if idx else "")
            for kind, arr_out in (("translated", res.translated), ("control", res.control), ("difference", res.difference)):
                written.append(write_channels(out / f"{stem}_{kind}.tif", arr_out, res.channel_names,
                                              prov | {"output": kind}, config.pixel_size_um))
            diffs.append((stem, res))
    shapes = {r.difference.shape for _, r in diffs}
    if len(diffs) > 1 and len(shapes) == 1:
        mean = np.mean([r.difference for _, r in diffs], axis=0)
        prov = diffs[0][1].provenance | {"output": "mean difference", "images": [s for s, _ in diffs]}
        written.append(write_channels(out / "mean_difference.tif", mean, diffs[0][1].channel_names, prov,
                                      config.pixel_size_um))
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def cmd_synthesize(args) -> int:
    from .core.bundle import load_bundle
    from .core.io import write_channels
    from .core.io import check_output_folder
    from .core.tasks.classcond import synthesize

    check_output_folder(args.output)
    bundle = load_bundle(args.checkpoint)
    condition = None
    if args.condition:
        from .core.io import read_image

        condition = read_image(args.condition)
        if args.size:
            raise VirtualStainError("--size and --condition exclude each other: the samples take the condition "
                                    "image's size")
    res = synthesize(bundle, args.class_name, args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                     size=args.size, condition=condition, channel_axis=args.channel_axis, batch_size=args.batch_size,
                     device=args.device, **_compute(args),
                     progress=_progress_printer(f"{args.n} x {args.class_name}") if not args.quiet else None)
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in args.class_name)
    path = write_channels(Path(args.output) / f"{name}_samples.tif", res.images, res.channel_names, res.provenance,
                          bundle.config.pixel_size_um)
    print(f"wrote {path}")
    return 0


def cmd_phenotype(args) -> int:
    """Per-cell nuclear/cytoplasmic marker ratios of groups of images (e.g. source, translated, real target)."""
    import csv
    import glob

    from .core.io import read_channel_names, read_image
    from .core.phenotype import compare, fraction_of_the_way, histogram_figure, measure_image

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


def cmd_evaluate(args) -> int:
    """Score one or more prediction folders against the real stains / true labels and write a report folder."""
    from .core.evaluate import evaluate, parse_named_folder, parse_thresholds, write_report

    methods: dict[str, Path] = {}
    for text in args.pred:
        name, folder = parse_named_folder(text, "--pred")
        if name in methods:
            raise VirtualStainError(f"two --pred folders are both called {name!r}; name them: --pred NAME=FOLDER")
        methods[name] = folder
    labels: dict[str, Path] = {}
    for text in args.labels:
        name, folder = parse_named_folder(text, "--labels", require_name=True)
        if name in labels:
            raise VirtualStainError(f"--labels {name!r} is given twice")
        labels[name] = folder
    if args.truth is not None and not Path(args.truth).is_dir():
        raise VirtualStainError(f"--truth folder {args.truth} does not exist")
    if args.input is not None and not Path(args.input).is_dir():
        raise VirtualStainError(f"--input folder {args.input} does not exist")
    if args.max_figures < 0:
        raise VirtualStainError("--max-figures must be 0 or more")
    report = evaluate(
        methods, args.truth, truth_channels=_split_names(args.truth_channels), label_dirs=labels,
        input_dir=args.input, iou_thresholds=parse_thresholds(args.iou_thresholds), max_figures=args.max_figures,
        progress=(lambda stem: log.info("evaluating %s", stem)),
    )
    written = write_report(report, args.output)
    for note, n in Counter(report.notes).items():  # one line per distinct note, not one per image
        print(f"note: {note}" + (f" ({n} images)" if n > 1 else ""))
    for r in report.summary:
        if r["metric_type"] == "image":
            print(f"{r['method']} {r['target']} ({r['n_images']} image(s)): Pearson r {r['pearson']:.3f} "
                  f"(raw {r['pearson_raw']:.3f}), SSIM {r['ssim']:.3f}, PSNR {r['psnr']:.1f} dB, MSE {r['mse']:.4g}")
        elif r["iou_threshold"] == 0.5:
            print(f"{r['method']} {r['target']} ({r['n_images']} image(s), {r['n_true']} true / {r['n_pred']} "
                  f"predicted objects) @ IoU 0.5: F1 {r['f1']:.3f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}, "
                  f"PQ {r['panoptic_quality']:.3f}")
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def _compute_options(parser: argparse.ArgumentParser) -> None:
    """Precision and CPU threads, the same on every command that runs a network."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                        help="auto: bf16 where the CPU/GPU runs it fast (AVX-512 bf16/AMX CPUs, bf16 GPUs; fp16 on "
                             "other GPUs), else float32; float32: the reference (slower)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS if set, else the cores that are idle at the start)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' so a new user sees what a plain run does; skips flags and unset (None) defaults,
    whose help says what happens instead ('(default: None)' tells nobody anything)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtualstain", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"napari-virtualstain {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

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
                         "stays bounded (default: blocks of at most 768 for a side over 2048; 0: always the whole "
                         "field at once)")
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
    pr.add_argument("--boundary-threshold", type=float, default=0.5)
    pr.add_argument("--foreground-threshold", type=float, default=0.5)
    pr.add_argument("--sampler", choices=["ddim", "ddpm"], default=None,
                    help="ddpm checkpoints: ddim (default, --steps 50) or ddpm (every training step)")
    pr.add_argument("--steps", type=int, default=None,
                    help="sampling steps: ddpm checkpoints (DDIM default 50); residual-shift checkpoints: an evenly "
                         "spaced subset of their chain (default: the checkpoint's validated count, else all)")
    pr.add_argument("--samples", type=int, default=None,
                    help="average this many samples (seeds SEED..SEED+k-1, one batch): more accurate, less textured; "
                         "default: the checkpoint's validated count (else 1)")
    pr.add_argument("--objects", action="store_true",
                    help="also write <stem>_<labels>_objects.csv: one row per predicted nucleus/cell (id, centroid, "
                         "area, mean stain, ensemble std, confidence = mean IoU with the nuclei of the --members "
                         "flipped/turned (and, for diffusion checkpoints, reseeded) predictions)")
    pr.add_argument("--interval", type=float, default=None, metavar="LEVEL",
                    help="add calibrated LEVEL intervals (e.g. 0.9) as '<stain> low 90%%' / '<stain> high 90%%' "
                         "channels; needs a calibrated checkpoint (virtualstain calibrate)")
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
    _compute_options(pr)
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

    tr = sub.add_parser(
        "train", help="train a bundle on your own images", formatter_class=_DefaultsFormatter,
        description="Train a bundle on your own images (docs/training.md). Validation: images marked 'split: val' "
                    "in a config are held out whole; otherwise the right-hand --val-fraction (0.15) of every image "
                    "is held out and never trained on. Training starts by printing which regions train and which "
                    "are held out. Progress goes to stderr: a bar on a terminal, a plain line every 5 percent in a log.",
    )
    tr.add_argument("data", help="folder (input/, target/, labels/NAME/) or YAML/JSON training config")
    tr.add_argument("--output", "-o", required=True, help="bundle folder to write (and resume from)")
    tr.add_argument("--objective", choices=["residual_shift", "ddpm", "regression"], default=None,
                    help="none given (stain): the recommended recipe in one bundle - mean network, refinement on it, "
                         "sampling defaults chosen on validation (docs/training.md); residual_shift: the 15-step "
                         "CellResDM model as published; ddpm (classcond: the only one): epsilon DDPM (DDIM/DDPM "
                         "sampling, uncertainty maps); regression: the one-pass network alone")
    tr.add_argument("--task", choices=["stain", "classcond"], default=None,
                    help="stain (default): paired input -> stain model; classcond: class-conditional DDPM for translate/"
                         "synthesize (implied by a CSV or a config with task: classcond)")
    tr.add_argument("--cond-dropout", type=float, default=None,
                    help="classcond: fraction of labels replaced by the null class (default 0.1), for guidance")
    tr.add_argument("--invariant", default=None, metavar="NAMES",
                    help="classcond: comma-separated channels a condition does not change (e.g. DNA): given to the "
                         "network as conditioning, never generated, kept exactly by translate (default: the config's "
                         "invariant:, else none = whole-image translation as PhenDiff)")
    tr.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon",
                    help="ddpm stain models: the UNet predicts the noise (epsilon, as DM4ISL) or v; v learns to use "
                         "the brightfield much sooner (docs/benchmarks.md)")
    tr.add_argument("--residual-source", choices=["mean_input", "mean_prediction"], default=None,
                    help="residual_shift: where the chain starts. mean_input: the mean input plane (CellResDM as "
                         "published); mean_prediction: mu(x) of the regression bundle given with --mean-from (predict, "
                         "then refine: the chain only adds what mu cannot know)")
    tr.add_argument("--mean-from", default=None, metavar="BUNDLE",
                    help="--residual-source mean_prediction: a regression bundle trained on the same data; its network "
                         "is frozen and stored inside the new bundle")
    tr.add_argument("--kappa", type=float, default=2.0, help="residual_shift: noise scale kappa of eq. (1)")
    tr.add_argument("--max-minutes", type=float, default=None,
                    help="time budget: after 20 steps, train only as many steps as fit (the lr schedule follows)")
    tr.add_argument("--init", default=None, metavar="BUNDLE",
                    help="fine-tune: start from this bundle's weights (a folder or a bundled name, e.g. demo-stain); "
                         "its architecture is kept (--channels is ignored) and so are its outputs when the data has "
                         "the same (else a new last layer); the input planes must match; recorded in the new bundle's "
                         "training.init_from")
    tr.add_argument("--loss", choices=["mse", "l1_msssim", "spotlight"], default="mse",
                    help="loss on the predicted stain/labels maps: mse; l1_msssim (0.5 L1 + 0.5 (1 - MS-SSIM), "
                         "Cytoland); spotlight (foreground-weighted MSE + soft Dice on the foreground, Spotlight)")
    tr.add_argument("--distance-head", action="store_true",
                    help="also learn a per-nucleus centre map ('<set> distance': distance to the boundary, 1 at the "
                         "centre) from the labels; predict --labels-from distance seeds nuclei at its peaks")
    tr.add_argument("--augment", action="store_true",
                    help="rotation (any angle), zoom 0.8-1.25, gamma/contrast/gain, noise and blur of the input, on "
                         "top of the flips and quarter turns (for few training images)")
    tr.add_argument("--steps", type=int, default=2000, help="optimiser steps in all (a resumed run counts on)")
    tr.add_argument("--batch-size", type=int, default=8, help="random crops per step")
    tr.add_argument("--crop-size", type=int, default=128,
                    help="side of the square training crops in pixels (a multiple of the UNet's downsampling)")
    tr.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (the peak with --lr-schedule cosine)")
    tr.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                    help="cosine: 100-step warm-up, then cosine decay to 0 at --steps")
    tr.add_argument("--ema-decay", type=float, default=0.999,
                    help="decay of the exponential moving average of the weights; the EMA weights are saved")
    tr.add_argument("--val-every", type=int, default=500,
                    help="every N steps: validate on the held-out regions, save the bundle and the resume state")
    tr.add_argument("--val-fraction", type=float, default=None,
                    help="hold out this right-hand fraction of every image when no image is marked split: val "
                         "(default: the config's val_fraction, else 0.15; 0 holds nothing out)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and noise (same seed, same run)")
    tr.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu")
    tr.add_argument("--channels", default="16,32,64,128", help="UNet widths per level")
    tr.add_argument("--layers-per-block", type=int, default=1, help="UNet ResNet blocks per level")
    tr.add_argument("--tile-size", type=int, default=256, help="tile side the bundle predicts with (stored in it)")
    tr.add_argument("--tile-overlap", type=int, default=32, help="overlap of neighbouring tiles (stored in the bundle)")
    tr.add_argument("--half-weights", action="store_true", help="store fp16 weights (half the size)")
    tr.add_argument("--precision", choices=["auto", "bf16", "float32"], default="auto",
                    help="auto: bf16 autocast where the CPU/GPU runs it fast (AVX-512 bf16, AMX, bf16 GPUs), "
                         "else float32; weights, optimiser and EMA stay float32")
    tr.add_argument("--resume", action="store_true",
                    help="continue from OUTPUT/training_state (raise --steps to train longer); the log's seconds "
                         "and the bundle's training.commands carry on")
    tr.add_argument("--name", default=None,
                    help="bundle name (default: a data folder gives the --output folder's name; a config its name:)")
    tr.add_argument("--pixel-size", type=float, default=None,
                    help="pixel size in um, stored in the bundle (default: the config's pixel_size_um, else none)")
    tr.add_argument("--input-names", default=None,
                    help="folder mode: comma-separated input channel names; name them (e.g. brightfield, phase), "
                         "else they are recorded as 'input' (or 'input 0', 'input 1', ...)")
    tr.add_argument("--stain-names", default=None,
                    help="folder mode: comma-separated target channel names (classcond: the image channel names); "
                         "default 'stain 0', 'stain 1', ...")
    tr.add_argument("--channel-axis", type=int, default=0, help="folder mode: channel axis of multi-channel files")
    tr.set_defaults(func=cmd_train)

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
    _compute_options(tl)
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
    _compute_options(sy)
    sy.add_argument("--quiet", "-q", action="store_true")
    sy.set_defaults(func=cmd_synthesize)

    bz = sub.add_parser("export-bioimageio", help="write a checkpoint's one-pass network as a bioimage.io model (.zip)",
                        description="The regression network (or the mean predictor of a mean-anchored checkpoint) as "
                                    "a bioimage.io 0.5 model with TorchScript weights, its normalisation as pre/post-"
                                    "processing, and a real test image; validated with bioimageio.core. The diffusion "
                                    "refinement cannot be expressed in the spec. Needs the bioimageio extra.")
    bz.add_argument("checkpoint", help="bundle folder or bundled demo name")
    bz.add_argument("--output", "-o", required=True, help="the .zip to write")
    bz.add_argument("--test-image", default=None,
                    help="a real brightfield image for the package's test input (default for checkpoints trained on "
                         "the scratch-assay sample: its held-out time point 9)")
    bz.add_argument("--plane", default=None, help="indices of leading axes of --test-image to pick (see predict)")
    bz.add_argument("--no-check", action="store_true", help="skip the bioimageio.core test of the written package")
    bz.set_defaults(func=cmd_export_bioimageio)

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

    ca = sub.add_parser("calibrate", help="calibrate a checkpoint's intervals (split conformal) on images with truth",
                        formatter_class=_DefaultsFormatter)
    ca.add_argument("checkpoint", help="bundle folder (calibration.json is written into it)")
    ca.add_argument("data", help="training-style data with ground truth: a folder (input/, target/) or a config")
    ca.add_argument("--regions", choices=["all", "val"], default="all",
                    help="all pixels of the data, or only its validation regions (a training config's held-out "
                         "strip: never pixels the model trained on)")
    ca.add_argument("--levels", default="0.8,0.9,0.95", help="interval levels to calibrate")
    ca.add_argument("--members", type=int, default=4, help="ensemble size; predict --interval must use the same")
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--input-names", default=None, help="data folder: input channel names")
    ca.add_argument("--stain-names", default=None, help="data folder: target channel names (as the checkpoint's)")
    _compute_options(ca)
    ca.set_defaults(func=cmd_calibrate)

    info = sub.add_parser("info", help="describe a checkpoint, or list the bundled ones")
    info.add_argument("checkpoint", nargs="?")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="predict the bundled demo on the scratch-assay sample (needs ndev-sampledata)")
    demo.add_argument("--checkpoint", "-c", default="demo-stain")
    demo.add_argument("--output", "-o", default="virtualstain-demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto")
    _compute_options(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser(
        "evaluate", help="score predictions (one or more methods) against real stains / true labels; writes a report",
        description="Match files by stem: truth TRUTH/<stem>.tif <-> PRED/<stem>_virtualstain.tif (channels by name); "
                    "true labels LABELS/<stem>.tif <-> PRED/<stem>_NAME_labels.tif. Stains are scored on the truth's "
                    "1-99.8 percentile scale (clipped), and Pearson r also on the raw values (pearson_raw), which "
                    "shows failures the clipping hides; instances are matched one-to-one by IoU.",
    )
    ev.add_argument("--pred", action="append", required=True, metavar="METHOD=FOLDER",
                    help="a folder of 'virtualstain predict' outputs, named METHOD in the report (repeat to compare "
                         "methods); a bare FOLDER is named after the folder")
    ev.add_argument("--truth", default=None, metavar="FOLDER",
                    help="real stains <stem>.tif: 2D (one channel) or CYX (name the channels with --truth-channels)")
    ev.add_argument("--truth-channels", default=None, metavar="NAMES",
                    help="comma-separated names of the truth channels in order, as the predictions name them "
                         "(e.g. Hoechst); default: the truth's ImageJ channel names")
    ev.add_argument("--labels", action="append", default=[], metavar="NAME=FOLDER",
                    help="true instance labels FOLDER/<stem>.tif, compared with each method's <stem>_NAME_labels.tif "
                         "(e.g. nuclei=truth_labels/); repeat for more label sets")
    ev.add_argument("--input", default=None, metavar="FOLDER", help="input images <stem>.tif shown in the figures")
    ev.add_argument("--iou-thresholds", default=None, metavar="LIST",
                    help="comma-separated IoU thresholds for the instance sweep (default 0.5,0.55,...,0.9)")
    ev.add_argument("--max-figures", type=int, default=20, help="per-image figures for at most this many images")
    ev.add_argument("--output", "-o", required=True, help="report folder (CSV, JSON, Markdown, PNG figures)")
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except VirtualStainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
