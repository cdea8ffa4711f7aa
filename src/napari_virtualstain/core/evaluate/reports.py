"""Writing a report: metrics.csv, summary.csv, report.json, report.md and the figures."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from .common import COLUMNS, EvaluationReport, HEADLINE_IOU
from .figures import image_figure, metric_bars, sweep_figure



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
        figures.append(_save_png(fig_dir / f"{_safe(pv.stem)}.png", image_figure(pv)))
    bars = metric_bars(report)
    if bars is not None:
        figures.append(_save_png(fig_dir / "metrics_summary.png", bars))
    sweep = sweep_figure(report)
    if sweep is not None:
        figures.append(_save_png(fig_dir / "instances_vs_iou.png", sweep))
    md = out / "report.md"
    md.write_text(_markdown(report, [f.relative_to(out) for f in figures]), encoding="utf-8")
    return written + [md] + figures


def _save_png(path: Path, rgb: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path)
    return path


def _trust_lines(summary: list[dict]) -> list[str]:
    """Interval coverage and per-object confidence, when the predictions carry them (predict --interval/--objects)."""
    lines = []
    for kind, title, what, count in (
            ("interval", "Calibrated intervals (fraction of pixels whose real value lies inside):", "stain", False),
            ("object_interval", "Per-object intervals (fraction of predicted objects whose real mean stain lies "
                                "inside):", "labels", True)):
        rows = [r for r in summary if r["metric_type"] == kind]
        if not rows:
            continue
        lines += [title, "", f"| method | {what} | level |{' objects |' if count else ''} coverage | mean width |",
                  "|---|---|---|" + ("---|" if count else "") + "---|---|"]
        lines += [f"| {r['method']} | {r['target']} | {r['interval_level']:g} |"
                  + (f" {r['n_pred']} |" if count else "") + f" {r['coverage']:.3f} | {r['interval_width']:.4g} |"
                  for r in rows]
        lines.append("")
    conf = [r for r in summary if r["metric_type"] == "confidence"]
    if conf:
        lines += ["Per-object confidence (AUROC for matching a true object at IoU 0.5; reliability: summary.csv):", "",
                  "| method | labels | objects | matched | AUROC |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['target']} | {r['n_pred']} | {r['matched_fraction']:.3f} | "
                  + (f"{r['confidence_auroc']:.3f} |" if r.get("confidence_auroc") is not None else "– |")
                  for r in conf]
        rel = [r for r in summary if r["metric_type"] == "reliability"]
        lines += ["", "| method | labels | confidence | objects | fraction matched |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['target']} | {r['confidence_bin']} | {r['n_pred']} | "
                  f"{r['matched_fraction']:.3f} |" for r in rel]
        lines.append("")
    return lines


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
    lines += _trust_lines(report.summary)
    if report.notes:
        lines += ["## Notes", "", *(f"- {n}" for n in report.notes), ""]
    if figures:
        lines += ["## Figures", "", (f"Error panels: {s['error_panels']}. Label panels: green matched, red false "
                                     f"positive, blue missed (IoU {HEADLINE_IOU})."), "",
                  *(f"![{f.stem}]({f.as_posix()})" for f in figures), ""]
    return "\n".join(lines)
