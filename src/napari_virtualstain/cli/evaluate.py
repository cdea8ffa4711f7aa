"""``virtualstain evaluate``: predictions against real stains and true labels -> CSV, JSON, markdown, figures."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from ..core.errors import VirtualStainError
from .common import split_names

log = logging.getLogger("napari_virtualstain")


def parse_named_folder(text: str, option: str, require_name: bool = False) -> tuple[str, Path]:
    """``NAME=FOLDER`` (or just ``FOLDER``, named after the folder unless ``require_name``)."""
    name, sep, folder = text.partition("=")
    if not sep:
        if require_name:
            raise VirtualStainError(f"{option} takes NAME=FOLDER (e.g. {option} nuclei=truth_labels/); got {text!r}")
        name, folder = "", text
    name, folder = name.strip(), folder.strip()
    if not folder:
        raise VirtualStainError(f"{option} {text!r} names no folder; use {option} NAME=FOLDER")
    path = Path(folder)
    if not path.is_dir():
        raise VirtualStainError(f"{option} {text!r}: folder {path} does not exist")
    return (name or path.resolve().name), path


def parse_thresholds(text: str | None) -> tuple[float, ...]:
    from ..core.evaluate import DEFAULT_IOU_THRESHOLDS

    if not text:
        return DEFAULT_IOU_THRESHOLDS
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VirtualStainError(
            f"--iou-thresholds takes comma-separated numbers (e.g. 0.5,0.7,0.9); got {text!r}"
        ) from None
    for v in values:
        if not 0 < v <= 1:
            raise VirtualStainError(f"IoU thresholds must be in (0, 1]; got {v:g}")
    return values


def cmd_evaluate(args) -> int:
    """Score one or more prediction folders against the real stains / true labels and write a report folder."""
    from ..core.evaluate import evaluate, write_report

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
        methods, args.truth, truth_channels=split_names(args.truth_channels), label_dirs=labels,
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
        elif r["metric_type"] == "instances" and r["iou_threshold"] == 0.5:
            print(f"{r['method']} {r['target']} ({r['n_images']} image(s), {r['n_true']} true / {r['n_pred']} "
                  f"predicted objects) @ IoU 0.5: F1 {r['f1']:.3f}, precision {r['precision']:.3f}, recall {r['recall']:.3f}, "
                  f"PQ {r['panoptic_quality']:.3f}")
        elif r["metric_type"] == "interval":
            print(f"{r['method']} {r['target']}: {100 * r['interval_level']:g} % intervals cover "
                  f"{100 * r['coverage']:.1f} % of the real values (mean width {r['interval_width']:.4g})")
        elif r["metric_type"] == "confidence" and r.get("confidence_auroc") is not None:
            print(f"{r['method']} {r['target']}: per-object confidence AUROC {r['confidence_auroc']:.3f} "
                  f"({r['n_pred']} objects, {100 * r['matched_fraction']:.0f} % matched at IoU 0.5)")
    print("\n".join(f"wrote {p}" for p in written))
    return 0


def add_parsers(sub) -> None:
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
