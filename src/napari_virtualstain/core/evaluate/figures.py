"""Figures of a report drawn with numpy and Pillow (no matplotlib): thumbnails, error panels, bar charts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import VirtualStainError
from ..io import read_image
from ..metrics import (
    NORM_PERCENTILES,
)
from .common import ERROR_RANGE, EvaluationReport, HEADLINE_IOU, ImagePreview



def yx(shape) -> str:
    return " x ".join(str(s) for s in shape[-2:])


def few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def fmt_db(v: float) -> str:
    return "PSNR inf" if math.isinf(v) else f"PSNR {v:.1f} dB"


def thumb_factor(shape, size: int) -> float:
    """Display scale: big images shrink to ``size`` pixels a side, tiny ones grow by an integer factor."""
    side = max(shape)
    return size / side if side > size else float(max(1, min(8, (size // 2) // max(side, 1))))


def thumb(a: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
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


def grey_rgb(a: np.ndarray) -> np.ndarray:
    g = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def diverging(err: np.ndarray) -> np.ndarray:
    e = np.clip(err / ERROR_RANGE, -1, 1)
    pos, neg = np.clip(e, 0, 1), np.clip(-e, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def label_colors(lab: np.ndarray) -> np.ndarray:
    lab = np.asarray(lab).astype(np.int64)
    h = (lab * 2654435761) % (2**32)
    rgb = np.stack([(h >> s) & 255 for s in (0, 8, 16)], axis=-1).astype(np.float64)
    rgb = 70 + rgb * (185 / 255)  # no colour too dark to see on the black background
    rgb[lab == 0] = 0
    return rgb.astype(np.uint8)


def match_overlay(true: np.ndarray, pred: np.ndarray, matches, scale: float) -> np.ndarray:
    """Green: matched predicted objects; red: false positives; blue: missed true objects (at the headline IoU)."""
    matched_pred = np.array(sorted({p for _, p, _ in matches}), dtype=np.int64)
    matched_true = np.array(sorted({t for t, _, _ in matches}), dtype=np.int64)
    status = np.zeros(true.shape, np.uint8)
    status[(true > 0) & ~np.isin(true, matched_true)] = 3
    status[pred > 0] = 2
    status[np.isin(pred, matched_pred) & (pred > 0)] = 1
    palette = np.array([[0, 0, 0], [60, 200, 80], [230, 60, 50], [70, 110, 255]], np.uint8)
    return palette[thumb(status, scale, nearest=True)]


def input_thumb(path: Path, shape, scale: float, notes: list[str]) -> np.ndarray | None:
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
    t = grey_rgb(thumb((arr - lo) / (hi - lo) if hi > lo else arr * 0, scale))
    if t.shape[:2] != tuple(shape):
        notes.append(f"input {path.name} is {yx(arr.shape)}, not the size of the truth; not shown")
        return None
    return t


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


def image_figure(pv: ImagePreview) -> np.ndarray:
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


def metric_bars(report: EvaluationReport) -> np.ndarray | None:
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(report.methods))]
    charts = []
    spec_img = [("pearson", "Pearson r", 1.0, ".3f"), ("ssim", "SSIM", 1.0, ".3f"), ("psnr", "PSNR (dB)", None, ".1f"),
                ("mse", "MSE", None, ".3g")]
    spec_inst = [("f1", "F1"), ("panoptic_quality", "panoptic quality"), ("precision", "precision"),
                 ("recall", "recall"), ("mean_matched_iou", "mean matched IoU")]
    targets = list(dict.fromkeys((r["target"], r["metric_type"]) for r in report.summary
                                 if r["metric_type"] in ("image", "instances")))

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


def sweep_figure(report: EvaluationReport) -> np.ndarray | None:
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
