"""Scores per image, channel and labels set, and their summary over images (``evaluate``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import VirtualStainError
from ..io import output_name, read_provenance
from ..metrics import (
    NORM_PERCENTILES,
    auroc,
    image_metrics,
    match_labels,
    matching_sweep,
    normalize_pair,
    pearson,
    pool_matching,
)
from .common import (
    COLUMNS,
    CONFIDENCE_BINS,
    TRUST_COLUMNS,
    ChannelPanel,
    DEFAULT_IOU_THRESHOLDS,
    ERROR_RANGE,
    EvaluationReport,
    FigureRow,
    HEADLINE_IOU,
    IMAGE_METRICS,
    ImagePreview,
    MATCHING_TEXT,
    NORMALISATION_TEXT,
    PRED_SUFFIX,
    SUMMARY_TEXT,
)
from .figures import (
    diverging,
    few,
    fmt_db,
    grey_rgb,
    input_thumb,
    label_colors,
    match_overlay,
    thumb,
    thumb_factor,
    yx,
)
from .pairing import files_by_stem, label_file_name, pair_channels, read_labels, read_prediction, read_truth



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
    truth_files = files_by_stem(Path(truth_dir), "truth") if truth_dir is not None else {}
    if truth_dir is not None and not truth_files:
        raise VirtualStainError(f"no matching files: truth folder {truth_dir} holds no images")
    label_truth = {}
    for name, d in label_dirs.items():
        if not Path(d).is_dir():
            raise VirtualStainError(f"labels folder {d} ({name!r}) does not exist")
        label_truth[name] = files_by_stem(Path(d), f"labels {name!r}")
        if not label_truth[name]:
            raise VirtualStainError(f"no matching files: labels folder {d} ({name!r}) holds no images")
    input_files = files_by_stem(Path(input_dir), "input") if input_dir is not None else {}
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
            truth = read_truth(truth_files[stem], truth_channels)
            scale = thumb_factor(truth[0].shape[-2:], figure_size)
        channel_rows: dict[str, FigureRow] = {}
        for method, folder in methods.items():
            pred_path = folder / f"{stem}{PRED_SUFFIX}"
            if truth is None:
                pass
            elif not pred_path.is_file():
                notes.append(f"method {method!r}: no {pred_path.name} in {folder} for truth {truth_files[stem].name}")
            else:
                pred, pred_names = read_prediction(pred_path)
                tarr, tnames = truth
                if pred.shape[1:] != tarr.shape[1:]:
                    raise VirtualStainError(
                        f"shape mismatch: prediction {pred_path} is {yx(pred.shape)} but truth "
                        f"{truth_files[stem]} is {yx(tarr.shape)} (Y x X); compare images of the same field and size"
                    )
                files.append({"method": method, "image": stem, "target": "stains", "prediction": str(pred_path),
                              "truth": str(truth_files[stem]), "provenance": _provenance(pred_path)})
                for name, pi, ti in pair_channels(method, pred_names, tnames, pred_path, truth_files[stem], notes):
                    try:
                        p_n, t_n, (lo, hi) = normalize_pair(pred[pi], tarr[ti], percentiles)
                    except VirtualStainError as exc:
                        notes.append(f"{stem} {name!r}: not scored - {exc}")
                        continue
                    m = image_metrics(p_n, t_n) | {"pearson_raw": pearson(pred[pi], tarr[ti])}
                    rows.append(_row(method, stem, name, "image", None, m, norm_low=lo, norm_high=hi))
                    rows += interval_rows(method, stem, name, pred, pred_names, tarr[ti])
                    compared[method] += 1
                    if preview is not None:
                        row = channel_rows.get(name)
                        if row is None:
                            row = channel_rows[name] = FigureRow(name, "image", grey_rgb(thumb(t_n, scale)),
                                                                 f"truth {name}")
                        err = diverging(thumb(p_n - t_n, scale))
                        cap = (f"r {m['pearson']:.3f} (raw {m['pearson_raw']:.3f})  SSIM {m['ssim']:.3f}  "
                               f"{fmt_db(m['psnr'])}")
                        row.panels.append(ChannelPanel(method, grey_rgb(thumb(p_n, scale)), err, cap))
        label_rows = []
        for name, truth_by_stem in label_truth.items():
            if stem not in truth_by_stem:
                continue
            t_lab = read_labels(truth_by_stem[stem], f"true labels {name!r}")
            lscale = thumb_factor(t_lab.shape, figure_size)
            frow = FigureRow(name, "instances", label_colors(thumb(t_lab, lscale, nearest=True)),
                             f"true {name} ({len(np.unique(t_lab)) - (t_lab.min() == 0)} objects)")
            for method, folder in methods.items():
                p_path = folder / label_file_name(stem, name)
                if not p_path.is_file():
                    notes.append(f"method {method!r}: no {p_path.name} in {folder} for true labels "
                                 f"{truth_by_stem[stem].name}")
                    continue
                p_lab = read_labels(p_path, f"predicted labels {name!r}")
                if p_lab.shape != t_lab.shape:
                    raise VirtualStainError(
                        f"shape mismatch: predicted labels {p_path} are {yx(p_lab.shape)} but true labels "
                        f"{truth_by_stem[stem]} are {yx(t_lab.shape)} (Y x X)"
                    )
                files.append({"method": method, "image": stem, "target": name, "prediction": str(p_path),
                              "truth": str(truth_by_stem[stem]), "provenance": _provenance(p_path)})
                sweep = matching_sweep(t_lab, p_lab, thresholds)
                for res in sweep:
                    rows.append(_row(method, stem, name, "instances", res["iou_threshold"], res))
                rows += confidence_rows(method, stem, name, folder / output_name("objects", stem, name), t_lab, p_lab,
                                        truth)
                compared[method] += 1
                if preview is not None:
                    head = match_labels(t_lab, p_lab, HEADLINE_IOU, return_matches=True)
                    overlay = match_overlay(t_lab, p_lab, head["matches"], lscale)
                    cap = f"F1 {head['f1']:.3f}  PQ {head['panoptic_quality']:.3f}  ({head['n_pred']} objects)"
                    frow.panels.append(ChannelPanel(method, label_colors(thumb(p_lab, lscale, nearest=True)),
                                                    overlay, cap))
            if frow.panels:
                label_rows.append(frow)
            scale = scale or lscale
        if preview is not None and (channel_rows or label_rows):
            preview.rows = list(channel_rows.values()) + label_rows
            if stem in input_files:
                preview.input = input_thumb(input_files[stem], preview.rows[0].truth.shape[:2], scale, notes)
            previews.append(preview)
    missing = [m for m, n in compared.items() if n == 0]
    if missing:
        wants = [f"<stem>{PRED_SUFFIX}"] if truth_files else []
        wants += [output_name("labels", "<stem>", n) for n in label_truth]
        raise VirtualStainError(
            f"no matching files: method(s) {', '.join(map(repr, missing))} ("
            f"{', '.join(str(methods[m]) for m in missing)}) have no {' or '.join(wants)} for any of the "
            f"{len(stems)} true image(s) ({few(stems)}); predictions must be named after the truth files' stems"
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


def interval_rows(method, stem, name, pred, pred_names, truth) -> list[dict]:
    """Coverage of the real stain by each calibrated interval predict wrote ('<name> low 90%' / 'high 90%')."""
    import re

    out = []
    for i, n in enumerate(pred_names or []):
        m = re.fullmatch(re.escape(name) + r" low ([0-9.]+)%", n)
        if not m or f"{name} high {m.group(1)}%" not in pred_names:
            continue
        lo, hi = pred[i], pred[pred_names.index(f"{name} high {m.group(1)}%")]
        y = np.asarray(truth, np.float64)
        out.append(_row(method, stem, name, "interval", None, {}, interval_level=float(m.group(1)) / 100,
                        coverage=float(((y >= lo) & (y <= hi)).mean()), interval_width=float((hi - lo).mean())))
    return out


def confidence_rows(method, stem, name, table: Path, true_lab, pred_lab, truth=None) -> list[dict]:
    """Per-object confidence (predict --objects): AUROC for 'matches a true object at IoU >= 0.5', and the
    fraction matched per confidence bin (reliability); with the real stains (``truth`` = (array, names)), the
    coverage of each object's mean-stain interval (predict --objects --interval)."""
    import csv

    if not table.is_file():
        return []
    with open(table) as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    records = list(csv.DictReader(lines))
    conf = {int(r["label"]): float(r["confidence"]) for r in records}
    matched = {p for _, p, _ in match_labels(true_lab, pred_lab, HEADLINE_IOU, return_matches=True)["matches"]}
    ids = sorted(conf)
    if not ids:
        return []
    c = np.array([conf[i] for i in ids])
    hit = np.array([i in matched for i in ids])
    out = [_row(method, stem, name, "confidence", HEADLINE_IOU, {"n_pred": len(ids)},
                confidence_auroc=auroc(c, hit) if 0 < hit.sum() < len(hit) else None,
                matched_fraction=float(hit.mean()))]
    for lo, hi in zip(CONFIDENCE_BINS, CONFIDENCE_BINS[1:]):
        inside = (c >= lo) & (c < hi)
        if inside.any():
            out.append(_row(method, stem, name, "reliability", HEADLINE_IOU, {"n_pred": int(inside.sum())},
                            confidence_bin=f"{lo:.1f}-{min(hi, 1.0):.1f}", matched_fraction=float(hit[inside].mean())))
    return out + object_interval_rows(method, stem, name, records, pred_lab, truth)


def object_interval_rows(method, stem, name, records: list[dict], pred_lab, truth) -> list[dict]:
    """Coverage of each object's calibrated mean-stain interval ('<stain>_low_90' / '_high_90' columns): does the
    real stain's mean inside the predicted object lie inside?"""
    import re

    from scipy import ndimage as ndi

    if truth is None or not records:
        return []
    tarr, tnames = truth
    out = []
    for col in records[0]:
        m = re.fullmatch(r"(.+)_low_([0-9.]+)", col)
        if not m or f"{m.group(1)}_high_{m.group(2)}" not in records[0] or m.group(1) not in tnames:
            continue
        ids = [int(r["label"]) for r in records]
        real = np.asarray(ndi.mean(np.asarray(tarr[tnames.index(m.group(1))], np.float64), pred_lab, ids))
        lo = np.array([float(r[col]) for r in records])
        hi = np.array([float(r[f"{m.group(1)}_high_{m.group(2)}"]) for r in records])
        out.append(_row(method, stem, name, "object_interval", None, {"n_pred": len(ids)},
                        interval_level=float(m.group(2)) / 100, coverage=float(((real >= lo) & (real <= hi)).mean()),
                        interval_width=float((hi - lo).mean())))
    return out


def _summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r["target"], r["metric_type"], r["iou_threshold"], r.get("interval_level"),
               r.get("confidence_bin"))
        groups.setdefault(key, []).append(r)
    order = {m: i for i, m in enumerate(methods)}
    out = []
    for (method, target, kind, thr, level, cbin), rs in sorted(
            groups.items(), key=lambda kv: (kv[0][2] != "image", kv[0][1], kv[0][3] or 0, str(kv[0][4]),
                                            str(kv[0][5]), order[kv[0][0]])):
        if kind == "image":
            vals = {k: float(np.mean([r[k] for r in rs])) for k in IMAGE_METRICS}
        elif kind == "instances":
            vals = pool_matching(rs)
        else:  # trust rows: object-weighted (or image-averaged) means of what each row holds
            weights = np.array([r.get("n_pred") or 1 for r in rs], float)
            vals = {"n_pred": int(weights.sum()) if kind != "interval" else None}
            for k in ("coverage", "interval_width", "confidence_auroc", "matched_fraction"):
                got = [(r[k], w) for r, w in zip(rs, weights) if r.get(k) is not None]
                if got:
                    vals[k] = float(np.average([g for g, _ in got], weights=[w for _, w in got]))
        out.append(_row(method, "ALL", target, kind, thr, {k: v for k, v in vals.items() if k not in TRUST_COLUMNS},
                        n_images=len(rs), interval_level=level, confidence_bin=cbin,
                        **{k: v for k, v in vals.items() if k in TRUST_COLUMNS}))
    return out


def _provenance(path: Path) -> dict:
    try:
        return read_provenance(path)
    except Exception:  # noqa: BLE001 - a file from another tool simply has none
        return {}
