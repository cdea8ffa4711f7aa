"""Compare predictions of one or more methods with the real stains and true instance labels; write a report.

Files are matched by stem, the way ``virtualstain predict`` names its outputs:

* truth stains ``TRUTH/<stem>.tif`` (2D = one channel, or CYX) <-> ``PRED/<stem>_virtualstain.tif`` (CYX, channel
  names in the ImageJ metadata); channels are matched by name (``truth_channels`` names the truth's channels in
  order, or the truth's own ImageJ channel names are used);
* true labels ``LABELS/<stem>.tif`` for a label name (e.g. ``nuclei``) <-> ``PRED/<stem>_nuclei_labels.tif``;
* an optional input image ``INPUT/<stem>.tif`` is shown in the figures.

Every stain channel is scored on one stated scale: prediction and truth are both mapped by the truth's 1st/99.8th
percentiles to [0, 1] and clipped (``normalize_pair``); ``pearson_raw`` is Pearson r of the raw values beside it, since
clipping can hide a failure on a low-signal image. Instances are matched one-to-one by IoU (see
``core/metrics.py`` for the exact definitions). :func:`evaluate` returns an :class:`EvaluationReport`;
:func:`write_report` writes ``metrics.csv``, ``summary.csv``, ``report.json``, ``report.md`` and PNG figures.
No Qt, no napari, no matplotlib: figures are drawn with numpy and Pillow.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .errors import VirtualStainError
from .io import list_images, read_channel_names, read_image, read_provenance
from .metrics import (
    NORM_PERCENTILES,
    image_metrics,
    match_labels,
    matching_sweep,
    normalize_pair,
    pearson,
    pool_matching,
)

PRED_SUFFIX = "_virtualstain.tif"
DEFAULT_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5, 0.55, ..., 0.9
HEADLINE_IOU = 0.5
# pearson_raw: Pearson r of the raw values; the clipped scale can hide a failure on a low-signal image
IMAGE_METRICS = ("pearson", "pearson_raw", "mse", "psnr", "ssim")
INSTANCE_COLUMNS = ("n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "mean_matched_iou",
                    "panoptic_quality")
COLUMNS = ("method", "image", "target", "metric_type", "iou_threshold", "n_images", *IMAGE_METRICS,
           *INSTANCE_COLUMNS, "norm_low", "norm_high")
ERROR_RANGE = 0.25  # error panels: pred - truth on the [0, 1] scale, white at 0, saturated at +-0.25

NORMALISATION_TEXT = (
    "Each stain channel: prediction and truth are both scaled by the truth's percentiles {lo:g} and {hi:g} to "
    "[0, 1] (low percentile -> 0, high -> 1) and clipped; Pearson r, MSE, PSNR (data range 1) and SSIM "
    "(scikit-image, 7x7 window) are computed on that scale. norm_low/norm_high are the percentiles in the truth's "
    "units. pearson_raw is Pearson r of the raw values (no scaling, no clipping): clipping can hide a failure on a "
    "low-signal image (noise and outliers squeezed into [0, 1]), so a large gap between the two is worth a look."
)
MATCHING_TEXT = (
    "Instances: true and predicted objects are matched one-to-one among pairs with IoU >= threshold, maximising "
    "the number of matches, then the summed IoU (Hungarian algorithm; unique above 0.5). tp = matches, "
    "fp = n_pred - tp, fn = n_true - tp, precision = tp/(tp+fp), recall = tp/(tp+fn), f1 = 2tp/(2tp+fp+fn), "
    "mean_matched_iou = mean IoU of matches, panoptic_quality = sum(IoU of matches)/(tp + fp/2 + fn/2); "
    "0 where a denominator is 0."
)
SUMMARY_TEXT = (
    "summary.csv: image metrics are the mean over images; instance metrics pool tp/fp/fn and matched IoU over "
    "all images of a method, then take the ratios."
)


@dataclass
class ChannelPanel:
    method: str
    prediction: np.ndarray  # RGB uint8 thumbnail
    error: np.ndarray | None
    caption: str


@dataclass
class FigureRow:
    """One row of an image's figure: a stain channel or a label set, truth first, then each method."""

    target: str
    kind: str  # "image" | "instances"
    truth: np.ndarray
    truth_title: str
    panels: list[ChannelPanel] = field(default_factory=list)


@dataclass
class ImagePreview:
    stem: str
    input: np.ndarray | None = None
    rows: list[FigureRow] = field(default_factory=list)


@dataclass
class EvaluationReport:
    """Every number of an evaluation: ``rows`` per (method, image, target[, IoU threshold]), ``summary`` per
    (method, target[, IoU threshold]); ``settings`` (folders, normalisation, thresholds), ``files`` (each compared
    file with the provenance it carries), ``notes`` (what was skipped and why) and small ``previews`` for figures."""

    methods: list[str]
    rows: list[dict]
    summary: list[dict]
    settings: dict
    files: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    previews: list[ImagePreview] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"package_version": __version__, "methods": self.methods, "settings": self.settings,
                "summary": self.summary, "rows": self.rows, "files": self.files, "notes": self.notes}

    def summary_value(self, method: str, target: str, metric: str, iou_threshold: float | None = None):
        for r in self.summary:
            if r["method"] == method and r["target"] == target and r.get("iou_threshold") == iou_threshold:
                return r.get(metric)
        raise KeyError((method, target, metric, iou_threshold))


# --------------------------------------------------------------------------------------------------------------
# options


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


def _stem(path: Path) -> str:
    return path.name.split(".")[0]  # as `virtualstain predict` names its outputs (a.ome.tif -> a)


def _files_by_stem(folder: Path, what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in list_images(folder):
        s = _stem(p)
        if s in out:
            raise VirtualStainError(f"{what} folder {folder} has two files for the image {s!r}: {out[s].name} and "
                                    f"{p.name}; keep one")
        out[s] = p
    return out


def _label_file_name(stem: str, name: str) -> str:
    return f"{stem}_{name.replace(' ', '_')}_labels.tif"


# --------------------------------------------------------------------------------------------------------------
# reading


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise VirtualStainError(f"{what} has dtype {a.dtype}; expected a numeric image")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise VirtualStainError(f"{what} holds {int(bad.sum())} NaN/Inf pixel(s); it cannot be scored")
    return a


def _read_prediction(path: Path) -> tuple[np.ndarray, list[str] | None]:
    arr = read_image(path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise VirtualStainError(
            f"prediction {path} has shape {arr.shape}; evaluate compares one plane (C, Y, X) per file. Predict a "
            "stack plane by plane with --plane (not --all-planes), one file per plane"
        )
    names = read_channel_names(path) if path.suffix.lower() in (".tif", ".tiff") else []
    return _finite(arr, f"prediction {path}"), (names if len(names) == arr.shape[0] else None)


def _read_truth(path: Path, truth_channels: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    arr = read_image(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        raise VirtualStainError(f"truth {path} looks like an RGB image {arr.shape}; save each stain as a grey "
                                "channel (2D, or CYX with --truth-channels)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise VirtualStainError(f"truth {path} has shape {arr.shape}; expected 2D (one channel) or (C, Y, X)")
    if truth_channels:
        if len(truth_channels) != arr.shape[0]:
            raise VirtualStainError(
                f"--truth-channels names {len(truth_channels)} channel(s) ({', '.join(truth_channels)}) but truth "
                f"{path} has {arr.shape[0]} (shape {arr.shape}); name every channel, in order"
            )
        names = list(truth_channels)
    else:
        names = read_channel_names(path) if path.suffix.lower() in (".tif", ".tiff") else []
        if len(names) != arr.shape[0]:
            names = None
            if arr.shape[0] > 1:
                raise VirtualStainError(
                    f"truth {path} has {arr.shape[0]} channels (shape {arr.shape}) and no channel names; name them "
                    "in order with --truth-channels (e.g. --truth-channels Hoechst,Actin) as the predictions name them"
                )
    return _finite(arr, f"truth {path}"), names


def _read_labels(path: Path, what: str) -> np.ndarray:
    arr = read_image(path)
    if arr.ndim != 2:
        raise VirtualStainError(f"{what} {path} has shape {arr.shape}; expected one 2D label image (Y, X)")
    return arr


def _pair_channels(method, pred_names, truth_names, pred_path, truth_path, notes) -> list[tuple[str, int, int]]:
    """(name, prediction index, truth index) for channels present in both; the rest is noted."""
    if truth_names is None and pred_names is None:
        return [("channel 0", 0, 0)]
    if truth_names is None:  # a 2D truth without a name: the prediction's first channel
        notes.append(f"truth images without a channel name are compared with the prediction's first channel "
                     f"{pred_names[0]!r} (name them with --truth-channels to choose)")
        return [(pred_names[0], 0, 0)]
    if pred_names is None:
        if len(truth_names) == 1:
            return [(truth_names[0], 0, 0)]
        raise VirtualStainError(f"prediction {pred_path} has one unnamed channel but the truth has "
                                f"{len(truth_names)} ({', '.join(truth_names)}); write predictions with channel names")
    pairs = [(n, pred_names.index(n), i) for i, n in enumerate(truth_names) if n in pred_names]
    if not pairs:  # forgive case only
        low = [p.lower() for p in pred_names]
        pairs = [(pred_names[low.index(n.lower())], low.index(n.lower()), i)
                 for i, n in enumerate(truth_names) if n.lower() in low]
    if not pairs:
        raise VirtualStainError(
            f"unknown channel names: truth {truth_path.name} has channel(s) {', '.join(map(repr, truth_names))} but "
            f"prediction {pred_path} has {', '.join(map(repr, pred_names))}; name the truth channels with "
            "--truth-channels as the predictions name them"
        )
    matched = {p[0].lower() for p in pairs}
    missing = [n for n in truth_names if n.lower() not in matched]
    extra = [n for n in pred_names if n.lower() not in matched]
    if missing:
        notes.append(f"truth channel(s) {', '.join(map(repr, missing))} not predicted by method {method!r}: not scored")
    if extra:
        notes.append(f"method {method!r}: channel(s) {', '.join(map(repr, extra))} have no truth channel: not scored "
                     "(instance labels are scored with --labels)")
    return pairs


# --------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    pred_dirs: Mapping[str, str | Path],
    truth_dir: str | Path | None = None,
    *,
    truth_channels: list[str] | None = None,
    label_dirs: Mapping[str, str | Path] | None = None,
    input_dir: str | Path | None = None,
    iou_thresholds: Iterable[float] = DEFAULT_IOU_THRESHOLDS,
    percentiles: tuple[float, float] = NORM_PERCENTILES,
    max_figures: int = 20,
    figure_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Score every method's predictions against the truth (stains and/or instance labels), matched by file stem.

    ``pred_dirs``: method name -> folder of ``virtualstain predict`` outputs. ``truth_dir``: real stains
    ``<stem>.tif``; ``truth_channels``: their channel names in order. ``label_dirs``: label name (as in
    ``<stem>_<name>_labels.tif``) -> folder of true labels ``<stem>.tif``. ``input_dir``: input images for the figures.
    """
    if not pred_dirs:
        raise VirtualStainError("no predictions to evaluate; give at least one --pred METHOD=FOLDER")
    label_dirs = dict(label_dirs or {})
    if truth_dir is None and not label_dirs:
        raise VirtualStainError("nothing to compare with: give the real stains (--truth FOLDER) and/or true labels "
                                "(--labels NAME=FOLDER)")
    if truth_channels and truth_dir is None:
        raise VirtualStainError("--truth-channels names the channels of --truth files; give --truth FOLDER too")
    thresholds = sorted({round(float(t), 6) for t in iou_thresholds} | {HEADLINE_IOU})
    for t in thresholds:
        if not 0 < t <= 1:
            raise VirtualStainError(f"IoU thresholds must be in (0, 1]; got {t:g}")
    methods = {str(m): Path(d) for m, d in pred_dirs.items()}
    for m, d in methods.items():
        if not d.is_dir():
            raise VirtualStainError(f"prediction folder {d} (method {m!r}) does not exist")
    truth_files = _files_by_stem(Path(truth_dir), "truth") if truth_dir is not None else {}
    if truth_dir is not None and not truth_files:
        raise VirtualStainError(f"no matching files: truth folder {truth_dir} holds no images")
    label_truth = {}
    for name, d in label_dirs.items():
        if not Path(d).is_dir():
            raise VirtualStainError(f"labels folder {d} ({name!r}) does not exist")
        label_truth[name] = _files_by_stem(Path(d), f"labels {name!r}")
        if not label_truth[name]:
            raise VirtualStainError(f"no matching files: labels folder {d} ({name!r}) holds no images")
    input_files = _files_by_stem(Path(input_dir), "input") if input_dir is not None else {}
    stems = sorted(set(truth_files).union(*[set(v) for v in label_truth.values()]))

    notes: list[str] = []
    rows: list[dict] = []
    files: list[dict] = []
    previews: list[ImagePreview] = []
    compared = {m: 0 for m in methods}
    for stem in stems:
        if progress:
            progress(stem)
        preview = ImagePreview(stem) if len(previews) < max_figures else None
        scale = None
        truth = None
        if stem in truth_files:
            truth = _read_truth(truth_files[stem], truth_channels)
            scale = _thumb_factor(truth[0].shape[-2:], figure_size)
        channel_rows: dict[str, FigureRow] = {}
        for method, folder in methods.items():
            pred_path = folder / f"{stem}{PRED_SUFFIX}"
            if truth is None:
                pass
            elif not pred_path.is_file():
                notes.append(f"method {method!r}: no {pred_path.name} in {folder} for truth {truth_files[stem].name}")
            else:
                pred, pred_names = _read_prediction(pred_path)
                tarr, tnames = truth
                if pred.shape[1:] != tarr.shape[1:]:
                    raise VirtualStainError(
                        f"shape mismatch: prediction {pred_path} is {_yx(pred.shape)} but truth "
                        f"{truth_files[stem]} is {_yx(tarr.shape)} (Y x X); compare images of the same field and size"
                    )
                files.append({"method": method, "image": stem, "target": "stains", "prediction": str(pred_path),
                              "truth": str(truth_files[stem]), "provenance": _provenance(pred_path)})
                for name, pi, ti in _pair_channels(method, pred_names, tnames, pred_path, truth_files[stem], notes):
                    try:
                        p_n, t_n, (lo, hi) = normalize_pair(pred[pi], tarr[ti], percentiles)
                    except VirtualStainError as exc:
                        notes.append(f"{stem} {name!r}: not scored - {exc}")
                        continue
                    m = image_metrics(p_n, t_n) | {"pearson_raw": pearson(pred[pi], tarr[ti])}
                    rows.append(_row(method, stem, name, "image", None, m, norm_low=lo, norm_high=hi))
                    compared[method] += 1
                    if preview is not None:
                        row = channel_rows.get(name)
                        if row is None:
                            row = channel_rows[name] = FigureRow(name, "image", _grey(_thumb(t_n, scale)),
                                                                 f"truth {name}")
                        err = _diverging(_thumb(p_n - t_n, scale))
                        cap = (f"r {m['pearson']:.3f} (raw {m['pearson_raw']:.3f})  SSIM {m['ssim']:.3f}  "
                               f"{_fmt_db(m['psnr'])}")
                        row.panels.append(ChannelPanel(method, _grey(_thumb(p_n, scale)), err, cap))
        label_rows = []
        for name, truth_by_stem in label_truth.items():
            if stem not in truth_by_stem:
                continue
            t_lab = _read_labels(truth_by_stem[stem], f"true labels {name!r}")
            lscale = _thumb_factor(t_lab.shape, figure_size)
            frow = FigureRow(name, "instances", _label_colors(_thumb(t_lab, lscale, nearest=True)),
                             f"true {name} ({len(np.unique(t_lab)) - (t_lab.min() == 0)} objects)")
            for method, folder in methods.items():
                p_path = folder / _label_file_name(stem, name)
                if not p_path.is_file():
                    notes.append(f"method {method!r}: no {p_path.name} in {folder} for true labels "
                                 f"{truth_by_stem[stem].name}")
                    continue
                p_lab = _read_labels(p_path, f"predicted labels {name!r}")
                if p_lab.shape != t_lab.shape:
                    raise VirtualStainError(
                        f"shape mismatch: predicted labels {p_path} are {_yx(p_lab.shape)} but true labels "
                        f"{truth_by_stem[stem]} are {_yx(t_lab.shape)} (Y x X)"
                    )
                files.append({"method": method, "image": stem, "target": name, "prediction": str(p_path),
                              "truth": str(truth_by_stem[stem]), "provenance": _provenance(p_path)})
                sweep = matching_sweep(t_lab, p_lab, thresholds)
                for res in sweep:
                    rows.append(_row(method, stem, name, "instances", res["iou_threshold"], res))
                compared[method] += 1
                if preview is not None:
                    head = match_labels(t_lab, p_lab, HEADLINE_IOU, return_matches=True)
                    overlay = _match_overlay(t_lab, p_lab, head["matches"], lscale)
                    cap = f"F1 {head['f1']:.3f}  PQ {head['panoptic_quality']:.3f}  ({head['n_pred']} objects)"
                    frow.panels.append(ChannelPanel(method, _label_colors(_thumb(p_lab, lscale, nearest=True)),
                                                    overlay, cap))
            if frow.panels:
                label_rows.append(frow)
            scale = scale or lscale
        if preview is not None and (channel_rows or label_rows):
            preview.rows = list(channel_rows.values()) + label_rows
            if stem in input_files:
                preview.input = _input_thumb(input_files[stem], preview.rows[0].truth.shape[:2], scale, notes)
            previews.append(preview)
    missing = [m for m, n in compared.items() if n == 0]
    if missing:
        wants = [f"<stem>{PRED_SUFFIX}"] if truth_files else []
        wants += [f"<stem>_{n.replace(' ', '_')}_labels.tif" for n in label_truth]
        raise VirtualStainError(
            f"no matching files: method(s) {', '.join(map(repr, missing))} ("
            f"{', '.join(str(methods[m]) for m in missing)}) have no {' or '.join(wants)} for any of the "
            f"{len(stems)} true image(s) ({_few(stems)}); predictions must be named after the truth files' stems"
        )
    for stem in stems:
        if not any(r["image"] == stem for r in rows):
            notes.append(f"{stem}: no method has a prediction for it")
    if len(stems) > max_figures:
        notes.append(f"figures show the first {max_figures} of {len(stems)} images; every image is in metrics.csv")
    settings = {
        "truth_dir": str(truth_dir) if truth_dir is not None else None,
        "truth_channels": list(truth_channels) if truth_channels else None,
        "prediction_dirs": {m: str(d) for m, d in methods.items()},
        "label_dirs": {n: str(d) for n, d in label_dirs.items()},
        "input_dir": str(input_dir) if input_dir is not None else None,
        "normalisation": NORMALISATION_TEXT.format(lo=percentiles[0], hi=percentiles[1]),
        "norm_percentiles": list(percentiles),
        "matching": MATCHING_TEXT,
        "iou_thresholds": thresholds,
        "headline_iou_threshold": HEADLINE_IOU,
        "summary": SUMMARY_TEXT,
        "error_panels": f"prediction - truth on the [0, 1] scale; blue < 0 < red, saturated at +-{ERROR_RANGE}",
    }
    return EvaluationReport(list(methods), rows, _summarise(rows, list(methods)), settings, files,
                            list(dict.fromkeys(notes)), previews)


def _row(method, image, target, metric_type, thr, values: dict, **extra) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(method=method, image=image, target=target, metric_type=metric_type, iou_threshold=thr, n_images=1)
    row.update({k: v for k, v in values.items() if k in row and k != "iou_threshold"})
    row.update(extra)
    return row


def _summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"], r["metric_type"], r["iou_threshold"]), []).append(r)
    order = {m: i for i, m in enumerate(methods)}
    out = []
    for (method, target, kind, thr), rs in sorted(groups.items(), key=lambda kv: (kv[0][2] != "image", kv[0][1],
                                                                                   kv[0][3] or 0, order[kv[0][0]])):
        if kind == "image":
            vals = {k: float(np.mean([r[k] for r in rs])) for k in IMAGE_METRICS}
        else:
            vals = pool_matching(rs)
        out.append(_row(method, "ALL", target, kind, thr, vals, n_images=len(rs)))
    return out


def _provenance(path: Path) -> dict:
    try:
        return read_provenance(path)
    except Exception:  # noqa: BLE001 - a file from another tool simply has none
        return {}


def _yx(shape) -> str:
    return " x ".join(str(s) for s in shape[-2:])


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _fmt_db(v: float) -> str:
    return "PSNR inf" if math.isinf(v) else f"PSNR {v:.1f} dB"


# --------------------------------------------------------------------------------------------------------------
# thumbnails (numpy only)


def _thumb_factor(shape, size: int) -> float:
    """Display scale: big images shrink to ``size`` pixels a side, tiny ones grow by an integer factor."""
    side = max(shape)
    return size / side if side > size else float(max(1, min(8, (size // 2) // max(side, 1))))


def _thumb(a: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    a = np.asarray(a)
    h, w = a.shape[-2:]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return a
    if nearest or scale > 1:
        ys = np.minimum((np.arange(nh) + 0.5) * h / nh, h - 1).astype(int)
        xs = np.minimum((np.arange(nw) + 0.5) * w / nw, w - 1).astype(int)
        return a[ys][:, xs]
    from skimage.transform import resize

    return resize(a.astype(np.float64), (nh, nw), order=1, anti_aliasing=True, preserve_range=True)


def _grey(a: np.ndarray) -> np.ndarray:
    g = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _diverging(err: np.ndarray) -> np.ndarray:
    e = np.clip(err / ERROR_RANGE, -1, 1)
    pos, neg = np.clip(e, 0, 1), np.clip(-e, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def _label_colors(lab: np.ndarray) -> np.ndarray:
    lab = np.asarray(lab).astype(np.int64)
    h = (lab * 2654435761) % (2**32)
    rgb = np.stack([(h >> s) & 255 for s in (0, 8, 16)], axis=-1).astype(np.float64)
    rgb = 70 + rgb * (185 / 255)  # no colour too dark to see on the black background
    rgb[lab == 0] = 0
    return rgb.astype(np.uint8)


def _match_overlay(true: np.ndarray, pred: np.ndarray, matches, scale: float) -> np.ndarray:
    """Green: matched predicted objects; red: false positives; blue: missed true objects (at the headline IoU)."""
    matched_pred = np.array(sorted({p for _, p, _ in matches}), dtype=np.int64)
    matched_true = np.array(sorted({t for t, _, _ in matches}), dtype=np.int64)
    status = np.zeros(true.shape, np.uint8)
    status[(true > 0) & ~np.isin(true, matched_true)] = 3
    status[pred > 0] = 2
    status[np.isin(pred, matched_pred) & (pred > 0)] = 1
    palette = np.array([[0, 0, 0], [60, 200, 80], [230, 60, 50], [70, 110, 255]], np.uint8)
    return palette[_thumb(status, scale, nearest=True)]


def _input_thumb(path: Path, shape, scale: float, notes: list[str]) -> np.ndarray | None:
    try:
        arr = read_image(path)
    except VirtualStainError as exc:
        notes.append(f"input {path.name} not shown: {exc}")
        return None
    arr = np.asarray(arr, np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
        arr = arr[..., :3].mean(-1)
    while arr.ndim > 2:
        arr = arr[arr.shape[0] // 2]  # middle plane of a stack
    lo, hi = np.percentile(arr, NORM_PERCENTILES)
    t = _grey(_thumb((arr - lo) / (hi - lo) if hi > lo else arr * 0, scale))
    if t.shape[:2] != tuple(shape):
        notes.append(f"input {path.name} is {_yx(arr.shape)}, not the size of the truth; not shown")
        return None
    return t


# --------------------------------------------------------------------------------------------------------------
# writing


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf (PSNR is inf for an exact prediction: see metrics.csv)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    return str(v)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_csv_value(r.get(c)) for c in COLUMNS])
    return path


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def write_report(report: EvaluationReport, out_dir: str | Path) -> list[Path]:
    """``metrics.csv`` (per image), ``summary.csv`` (per method), ``report.json`` (everything), ``report.md`` and
    ``figures/*.png`` (per image: input | truth | each method's prediction and error; metric bars per method)."""
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = [_write_csv(out / "metrics.csv", report.rows), _write_csv(out / "summary.csv", report.summary)]
    js = out / "report.json"
    js.write_text(json.dumps(_clean(report.to_dict()), indent=1, default=str, allow_nan=False), encoding="utf-8")
    written.append(js)
    figures = []
    for pv in report.previews:
        figures.append(_save_png(fig_dir / f"{_safe(pv.stem)}.png", _image_figure(pv)))
    bars = _metric_bars(report)
    if bars is not None:
        figures.append(_save_png(fig_dir / "metrics_summary.png", bars))
    sweep = _sweep_figure(report)
    if sweep is not None:
        figures.append(_save_png(fig_dir / "instances_vs_iou.png", sweep))
    md = out / "report.md"
    md.write_text(_markdown(report, [f.relative_to(out) for f in figures]), encoding="utf-8")
    return written + [md] + figures


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def _markdown(report: EvaluationReport, figures: list[Path]) -> str:
    s = report.settings
    channels = f" (channels {', '.join(s['truth_channels'])})" if s["truth_channels"] else ""
    lines = [f"# Evaluation: {', '.join(report.methods)}", "", f"- truth: {s['truth_dir']}{channels}",
             *(f"- prediction `{m}`: {d}" for m, d in s["prediction_dirs"].items()),
             *(f"- true labels `{n}`: {d}" for n, d in s["label_dirs"].items()), "",
             f"**Normalisation.** {s['normalisation']}", "", f"**Matching.** {s['matching']}", "", s["summary"], ""]
    img = [r for r in report.summary if r["metric_type"] == "image"]
    if img:
        lines += ["| method | channel | images | Pearson r | Pearson r (raw) | MSE | PSNR (dB) | SSIM |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['target']} | {r['n_images']} | {r['pearson']:.3f} | "
                  f"{r['pearson_raw']:.3f} | {r['mse']:.4g} | "
                  f"{r['psnr']:.2f} | {r['ssim']:.3f} |" for r in img]
        lines.append("")
    inst = [r for r in report.summary if r["metric_type"] == "instances" and r["iou_threshold"] == HEADLINE_IOU]
    if inst:
        lines += [f"Instances at IoU {HEADLINE_IOU} (every threshold: summary.csv):", "",
                  ("| method | labels | images | true | predicted | TP | FP | FN | precision | recall | F1 | "
                   "mean matched IoU | PQ |"), "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['target']} | {r['n_images']} | {r['n_true']} | {r['n_pred']} | {r['tp']} | "
                  f"{r['fp']} | {r['fn']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | "
                  f"{r['mean_matched_iou']:.3f} | {r['panoptic_quality']:.3f} |" for r in inst]
        lines.append("")
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    if figures:
        lines += ["## Figures", "", (f"Error panels: {s['error_panels']}. Label panels: green matched, red false "
                                     f"positive, blue missed (IoU {HEADLINE_IOU})."), "",
                  *(f"![{f.stem}]({f.as_posix()})" for f in figures), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# figures (Pillow draws; no matplotlib)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
PAD, HEAD = 6, 18


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _image_figure(pv: ImagePreview) -> np.ndarray:
    from PIL import Image, ImageDraw

    cells_per_row = []
    for row in pv.rows:
        cells = []
        if pv.input is not None:
            cells.append(("input", pv.input, ""))
        cells.append((row.truth_title, row.truth, ""))
        for p in row.panels:
            what = "labels" if row.kind == "instances" else "prediction"
            cells.append((f"{p.method}: {row.target} {what}", p.prediction, p.caption))
            if p.error is not None:
                sub = "matched / false pos. / missed" if row.kind == "instances" else "error (pred - truth)"
                cells.append((f"{p.method}: {sub}", p.error, ""))
        cells_per_row.append(cells)
    ph = max(c[1].shape[0] for cells in cells_per_row for c in cells)
    pw = max(c[1].shape[1] for cells in cells_per_row for c in cells)
    cw = max(pw, 200)
    ncol = max(len(c) for c in cells_per_row)
    W = PAD + ncol * (cw + PAD)
    rh = HEAD + ph + HEAD + PAD
    top = 2 * HEAD + 6
    H = top + len(cells_per_row) * rh
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, big = _font(11), _font(13)
    draw.text((PAD, 3), _fit(draw, f"{pv.stem}: stains on the truth's {NORM_PERCENTILES[0]:g}-{NORM_PERCENTILES[1]:g} "
                                   "percentile scale (0-1)", big, W - 2 * PAD), fill=(0, 0, 0), font=big)
    draw.text((PAD, HEAD + 3), _fit(draw, f"error = prediction - truth: blue -{ERROR_RANGE} ... white 0 ... red "
                                          f"+{ERROR_RANGE}.  Labels: green matched, red false positive, blue missed "
                                          f"(IoU >= {HEADLINE_IOU})", font, W - 2 * PAD), fill=(60, 60, 60), font=font)
    y = top
    for cells in cells_per_row:
        for i, (title, img, cap) in enumerate(cells):
            x = PAD + i * (cw + PAD)
            draw.text((x, y + 3), _fit(draw, title, font, cw), fill=(20, 20, 20), font=font)
            canvas.paste(Image.fromarray(np.ascontiguousarray(img)), (x, y + HEAD))
            if cap:
                draw.text((x, y + HEAD + img.shape[0] + 3), _fit(draw, cap, font, cw), fill=(20, 20, 20), font=font)
        y += rh
    return np.asarray(canvas)


def _chart(title: str, labels: list[str], values: list[float], colors, vmax: float | None, fmt: str,
           size=(300, 210)) -> np.ndarray:
    from PIL import Image, ImageDraw

    W, H = size
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font, big = _font(11), _font(12)
    d.text((8, 4), _fit(d, title, big, W - 16), fill=(0, 0, 0), font=big)
    x0, x1, y0, y1 = 40, W - 10, 40, H - 34  # plot box
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) * 1.15 if finite and max(finite) > 0 else 1.0)
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        yy = y1 - frac * (y1 - y0)
        d.line([(x0 - 3, yy), (x0, yy)], fill=(0, 0, 0))
        d.text((2, yy - 6), f"{top * frac:.3g}", fill=(60, 60, 60), font=font)
    n = max(len(values), 1)
    slot = (x1 - x0) / n
    bw = min(60, slot * 0.7)
    for i, (lab, v, col) in enumerate(zip(labels, values, colors)):
        cx = x0 + slot * (i + 0.5)
        if v is None or not math.isfinite(v):
            txt = "inf" if v is not None and v > 0 else "n/a"
            h = (y1 - y0) if txt == "inf" else 0
        else:
            txt = format(v, fmt)
            h = max(0.0, min(v, top)) / top * (y1 - y0)
        if h > 0:
            d.rectangle([cx - bw / 2, y1 - h, cx + bw / 2, y1], fill=col)
        tw = d.textlength(txt, font=font)
        d.text((cx - tw / 2, max(y0, y1 - h - 14)), txt, fill=(0, 0, 0), font=font)
        name = _fit(d, lab, font, slot - 2)
        d.text((cx - d.textlength(name, font=font) / 2, y1 + 4), name, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def _grid(charts: list[np.ndarray], ncol: int = 3) -> np.ndarray:
    h, w = charts[0].shape[:2]
    nrow = math.ceil(len(charts) / ncol)
    out = np.full((nrow * h, min(ncol, len(charts)) * w, 3), 255, np.uint8)
    for i, c in enumerate(charts):
        r, k = divmod(i, ncol)
        out[r * h:(r + 1) * h, k * w:(k + 1) * w] = c
    return out


def _metric_bars(report: EvaluationReport) -> np.ndarray | None:
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(report.methods))]
    charts = []
    spec_img = [("pearson", "Pearson r", 1.0, ".3f"), ("ssim", "SSIM", 1.0, ".3f"), ("psnr", "PSNR (dB)", None, ".1f"),
                ("mse", "MSE", None, ".3g")]
    spec_inst = [("f1", "F1"), ("panoptic_quality", "panoptic quality"), ("precision", "precision"),
                 ("recall", "recall"), ("mean_matched_iou", "mean matched IoU")]
    targets = list(dict.fromkeys((r["target"], r["metric_type"]) for r in report.summary))
    def value(method, target, key, thr=None):
        try:
            return report.summary_value(method, target, key, thr)
        except KeyError:
            return None

    for target, kind in targets:
        if kind == "image":
            for key, name, vmax, fmt in spec_img:
                charts.append(_chart(f"{target}: {name}", report.methods,
                                     [value(m, target, key) for m in report.methods], colors, vmax, fmt))
        else:
            for key, name in spec_inst:
                charts.append(_chart(f"{target}: {name} @ IoU {HEADLINE_IOU}", report.methods,
                                     [value(m, target, key, HEADLINE_IOU) for m in report.methods], colors, 1.0, ".3f"))
    return _grid(charts, 4 if any(k == "image" for _, k in targets) else 5) if charts else None


def _sweep_figure(report: EvaluationReport) -> np.ndarray | None:
    """F1 and panoptic quality against the IoU threshold, one line per method, per label set."""
    from PIL import Image, ImageDraw

    targets = list(dict.fromkeys(r["target"] for r in report.summary if r["metric_type"] == "instances"))
    thr = report.settings["iou_thresholds"]
    if not targets or len(thr) < 2:
        return None
    charts = []
    for target in targets:
        for key, name in (("f1", "F1"), ("panoptic_quality", "panoptic quality")):
            W, H = 360, 240
            img = Image.new("RGB", (W, H), (255, 255, 255))
            d = ImageDraw.Draw(img)
            font, big = _font(11), _font(12)
            d.text((8, 4), f"{target}: {name} vs IoU threshold", fill=(0, 0, 0), font=big)
            x0, x1, y0, y1 = 40, W - 110, 26, H - 30
            d.line([(x0, y0), (x0, y1), (x1, y1)], fill=(0, 0, 0))
            lo, hi = min(thr), max(thr)

            def px(t, x0=x0, x1=x1, lo=lo, hi=hi):
                return x0 + (t - lo) / (hi - lo) * (x1 - x0)

            for frac in (0.0, 0.5, 1.0):
                yy = y1 - frac * (y1 - y0)
                d.line([(x0 - 3, yy), (x0, yy)], fill=(0, 0, 0))
                d.text((8, yy - 6), f"{frac:.1f}", fill=(60, 60, 60), font=font)
            for t in (lo, (lo + hi) / 2, hi):
                d.text((px(t) - 10, y1 + 5), f"{t:.2f}", fill=(60, 60, 60), font=font)
            for i, m in enumerate(report.methods):
                col = PALETTE[i % len(PALETTE)]
                pts = []
                for t in thr:
                    try:
                        v = report.summary_value(m, target, key, t)
                    except KeyError:
                        continue
                    pts.append((px(t), y1 - v * (y1 - y0)))
                if len(pts) > 1:
                    d.line(pts, fill=col, width=2)
                for p in pts:
                    d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=col)
                if pts:
                    d.rectangle([x1 + 10, y0 + 4 + 16 * i, x1 + 20, y0 + 14 + 16 * i], fill=col)
                    d.text((x1 + 24, y0 + 3 + 16 * i), _fit(d, m, font, W - x1 - 28), fill=(0, 0, 0), font=font)
            charts.append(np.asarray(img))
    return _grid(charts, 2)
