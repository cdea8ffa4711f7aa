"""Commands about checkpoints: ``info``, ``demo``, ``export-bioimageio``, ``calibrate``."""

from __future__ import annotations

from pathlib import Path

from ..cli_files import (
    _parse_plane,
    iter_planes,
    run_settings,
)
from ..core.errors import VirtualStainError
from .common import DefaultsFormatter, compute_options, split_names


def cmd_info(args) -> int:
    from ..core.bundle import bundled_checkpoints, load_bundle

    if not args.checkpoint:
        demos = bundled_checkpoints()
        print("bundled checkpoints:" if demos else "no bundled checkpoints installed")
        for name in demos:
            print(" ", load_bundle(name).summary().replace("\n", "\n  "))
        return 0
    print(load_bundle(args.checkpoint).summary())
    return 0


def cmd_napari(args) -> int:
    """The public door to ``python -m napari_virtualstain._widgets``: napari, the sample, the widgets."""
    try:
        import napari  # noqa: F401
    except ModuleNotFoundError:
        raise VirtualStainError("napari is not installed: pip install 'napari-virtualstain[gui]'") from None
    from .._widgets.__main__ import main as open_napari

    known = {"Virtual stain", "Uncertainty", "Translate condition", "Synthesize", "Train"}
    unknown = [w for w in args.widgets if w not in known]
    if unknown:
        raise VirtualStainError(f"unknown widget {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    return open_napari(args.widgets)


def cmd_demo(args) -> int:
    """Predict the bundled demo on the scratch-assay time point it never saw, and say how close it is."""
    from ..core.bundle import load_bundle
    from ..core.io import output_name, read_image, write_channels, write_labels
    from ..core.metrics import image_metrics, normalize_pair
    from ..core.tasks.stain import predict_stain
    from .._sample_data import scratch_assay_path

    try:
        path = scratch_assay_path()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise VirtualStainError(str(exc)) from None
    data = read_image(path)  # (C, T, Y, X): Hoechst, brightfield, nuclei labels, cell labels
    t = data.shape[1] - 1
    from ..core.io import check_output_folder

    check_output_folder(args.output)
    bundle = load_bundle(args.checkpoint)
    res = predict_stain(bundle, data[1, t], seed=args.seed, input_name=f"scratch assay t={t}",
                        settings=run_settings(args, f"scratch assay t={t}"))
    out = Path(args.output)
    written = [write_channels(out / output_name("stain", "scratch_assay"), res.image, res.channel_names, res.provenance,
                              bundle.config.pixel_size_um)]
    for name, lab in res.labels.items():
        written.append(write_labels(out / output_name("labels", "scratch_assay", name), lab, res.provenance | {"labels": name}))
    print("\n".join(f"wrote {p}" for p in written))
    if "Hoechst" in res.channel_names:
        pred, truth, _ = normalize_pair(res.channel("Hoechst"), data[0, t])
        m = image_metrics(pred, truth)
        print(f"Hoechst vs the real stain (held-out t={t}): Pearson r {m['pearson']:.3f}, SSIM {m['ssim']:.3f}, "
              f"PSNR {m['psnr']:.1f} dB")
    return 0


def cmd_export_bioimageio(args) -> int:
    from ..core.bundle import load_bundle
    from ..core.io import read_image

    try:
        import bioimageio.core  # noqa: F401

        from ..core.export import export_bioimageio, one_pass_network
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
        from .._sample_data import scratch_assay_path

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


def cmd_calibrate(args) -> int:
    """Split-conformal scale of the ensemble std (core/confidence.py) from images with ground truth."""
    from ..core.bundle import load_bundle
    from ..core.confidence import calibrate, save_calibration
    from ..train.data import load_config, load_folder, split_regions

    bundle = load_bundle(args.checkpoint)
    src = Path(args.data)
    spec = (load_folder(src, split_names(args.input_names), split_names(args.stain_names)) if src.is_dir()
            else load_config(src))
    regions = split_regions(spec)[1] if args.regions == "val" else [(im, slice(None)) for im in spec.images]
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
                       settings=run_settings(args))
    record["data"] = str(src)
    record["regions"] = args.regions
    path = save_calibration(bundle, record)
    for s, e in record["stains"].items():
        for g, qs in e["q"].items():
            print(f"{s} ({g}, {e['pixels'][g]} pixels): q " + ", ".join(f"{k}: {v:.3g}" for k, v in qs.items()))
    for name, e in record.get("objects", {}).items():
        print(f"{name} (mean {e['stain']} of {e['objects']} predicted objects): "
              + ("q " + ", ".join(f"{k}: {v:.3g}" for k, v in e["q"].items()) if e["q"] else
                 "none in these images, so their tables get no interval"))
    print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
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


    ca = sub.add_parser("calibrate", help="calibrate a checkpoint's intervals (split conformal) on images with truth",
                        formatter_class=DefaultsFormatter)
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
    compute_options(ca)
    ca.set_defaults(func=cmd_calibrate)


    info = sub.add_parser("info", help="describe a checkpoint, or list the bundled ones")
    info.add_argument("checkpoint", nargs="?")
    info.set_defaults(func=cmd_info)


    demo = sub.add_parser("demo", help="predict the bundled demo on the scratch-assay sample (needs ndev-sampledata)")
    demo.add_argument("--checkpoint", "-c", default="demo-stain")
    demo.add_argument("--output", "-o", default="virtualstain-demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto")
    compute_options(demo)
    demo.set_defaults(func=cmd_demo)

    nap = sub.add_parser("napari", help="open napari with the scratch-assay sample and the plugin's widgets docked")
    nap.add_argument("widgets", nargs="*", metavar="WIDGET",
                     help="menu names to dock: 'Virtual stain' (default), Uncertainty, 'Translate condition', "
                          "Synthesize, Train")
    nap.set_defaults(func=cmd_napari)

