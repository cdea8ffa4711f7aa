"""Image-quality and instance-segmentation metrics.

Image metrics (:func:`image_metrics`) take images already on a stated common scale; :func:`normalize_pair` is the
scale the evaluation report uses (prediction and truth both mapped by the truth's 1st/99.8th percentiles to [0, 1]
and clipped).

Instance metrics (:func:`match_labels`, :func:`matching_sweep`) match true and predicted objects one-to-one by IoU,
the semantics of StarDist's ``matching`` (written here from the definitions):

* a pair (true object, predicted object) may match when its IoU >= the threshold; among those pairs a one-to-one
  assignment is chosen that has the most matches and, among those, the largest summed IoU (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment``). For thresholds > 0.5 every object has at most one candidate, so the
  matching is unique and no assignment problem is solved;
* ``tp`` = matched pairs, ``fp = n_pred - tp``, ``fn = n_true - tp``;
  ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)``,
  ``mean_matched_iou`` = mean IoU of the matched pairs,
  ``panoptic_quality = sum(IoU of matched pairs) / (tp + fp / 2 + fn / 2)``;
  a ratio whose denominator is 0 is reported as 0 (as StarDist does).

Label 0 is background; IoU is counted in pixels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .errors import VirtualStainError

NORM_PERCENTILES = (1.0, 99.8)
INSTANCE_METRICS = ("precision", "recall", "f1", "mean_matched_iou", "panoptic_quality")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _ssim(truth: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    """SSIM with scikit-image's defaults (7x7 uniform window); smaller windows for images under 7 pixels a side."""
    side = min(truth.shape[-2:])
    if side >= 7:
        return float(structural_similarity(truth, pred, data_range=data_range))
    win = side if side % 2 else side - 1
    if win < 3:
        return float("nan")
    return float(structural_similarity(truth, pred, data_range=data_range, win_size=win))


def image_metrics(pred: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> dict[str, float]:
    """Pearson r, MSE, PSNR (dB; inf when the images are equal) and SSIM of one 2D channel pair."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    mse = float(np.mean((pred - truth) ** 2))
    return {
        "pearson": pearson(pred, truth),
        "mse": mse,
        "psnr": float(peak_signal_noise_ratio(truth, pred, data_range=data_range)) if mse > 0 else float("inf"),
        "ssim": _ssim(truth, pred, data_range),
    }


def percentile_range(truth: np.ndarray, percentiles: tuple[float, float] = NORM_PERCENTILES) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(truth, np.float64), percentiles)
    return float(lo), float(hi)


def normalize_pair(
    pred: np.ndarray, truth: np.ndarray, percentiles: tuple[float, float] = NORM_PERCENTILES
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Both images scaled by the truth's percentiles (default 1st/99.8th) to [0, 1] and clipped.

    Returns (pred, truth, (low, high)) with low/high in the truth's units. A truth whose percentiles coincide
    (a constant image) has no scale: :class:`VirtualStainError`.
    """
    lo, hi = percentile_range(truth, percentiles)
    if not hi > lo:
        raise VirtualStainError(
            f"the true image is constant between its {percentiles[0]:g}th and {percentiles[1]:g}th percentiles "
            f"(both {lo:g}), so it gives no scale to compare against"
        )

    def scale(a):
        return np.clip((np.asarray(a, np.float64) - lo) / (hi - lo), 0.0, 1.0)

    return scale(pred), scale(truth), (lo, hi)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` pixels from the rest (Mann-Whitney U with
    average ranks for ties; 0.5 = no better than chance). NaN when one class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64).ravel()
    pos = np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------------------------
# instances


@dataclass
class LabelOverlap:
    """Every overlapping (true, predicted) object pair of two label images, with its IoU.

    ``true_ids``/``pred_ids`` are the object ids present (background 0 excluded); ``pair_true``/``pair_pred`` index
    into them, ``pair_iou`` is the pair's IoU (> 0).
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_iou: np.ndarray


def _as_label_image(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise VirtualStainError(f"{what} must be a 2D label image (Y, X); got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise VirtualStainError(f"{what} must hold integer object ids; got dtype {labels.dtype}")
    if labels.min(initial=0) < 0:
        raise VirtualStainError(f"{what} holds negative ids; labels are 0 (background) or positive object ids")
    return labels


def label_overlap(true: np.ndarray, pred: np.ndarray) -> LabelOverlap:
    """IoU of every overlapping pair of objects (sparse: objects that do not touch are never compared)."""
    true = _as_label_image(true, "the true labels")
    pred = _as_label_image(pred, "the predicted labels")
    if true.shape != pred.shape:
        raise VirtualStainError(f"label images differ in shape: true {true.shape}, predicted {pred.shape}")
    t_ids, t_inv, t_area = np.unique(true.ravel(), return_inverse=True, return_counts=True)
    p_ids, p_inv, p_area = np.unique(pred.ravel(), return_inverse=True, return_counts=True)
    # drop background (id 0 sorts first when present)
    t_off = 1 if t_ids[0] == 0 else 0
    p_off = 1 if p_ids[0] == 0 else 0
    t_inv = t_inv.ravel() - t_off
    p_inv = p_inv.ravel() - p_off
    both = (t_inv >= 0) & (p_inv >= 0)
    n_p = len(p_ids) - p_off
    key = t_inv[both].astype(np.int64) * max(n_p, 1) + p_inv[both]
    keys, inter = np.unique(key, return_counts=True)
    pt, pp = keys // max(n_p, 1), keys % max(n_p, 1)
    t_area, p_area = t_area[t_off:], p_area[p_off:]
    iou = inter / (t_area[pt] + p_area[pp] - inter)
    return LabelOverlap(t_ids[t_off:], p_ids[p_off:], pt, pp, iou.astype(np.float64))


def match_pairs(pair_true, pair_pred, pair_iou, thresh: float) -> np.ndarray:
    """Indices (into the pair arrays) of a one-to-one matching among pairs with IoU >= ``thresh``: the most matches,
    then the largest summed IoU. Unique candidates (always the case for ``thresh`` > 0.5) are taken as they are."""
    if not 0 < thresh <= 1:
        raise VirtualStainError(f"IoU thresholds must be in (0, 1]; got {thresh}")
    pair_true, pair_pred, pair_iou = (np.asarray(a) for a in (pair_true, pair_pred, pair_iou))
    cand = np.flatnonzero(pair_iou >= thresh)
    if len(cand) == 0:
        return cand
    ct, cp = pair_true[cand], pair_pred[cand]
    if len(np.unique(ct)) == len(cand) and len(np.unique(cp)) == len(cand):
        return cand
    from scipy.optimize import linear_sum_assignment

    rows, r_inv = np.unique(ct, return_inverse=True)
    cols, c_inv = np.unique(cp, return_inverse=True)
    k = min(len(rows), len(cols)) + 1  # summed IoU / k < 1: one more match always beats any IoU gain
    cost = np.zeros((len(rows), len(cols)))
    cost[r_inv, c_inv] = -(1.0 + pair_iou[cand] / k)
    where = np.full((len(rows), len(cols)), -1, dtype=np.int64)
    where[r_inv, c_inv] = cand
    r, c = linear_sum_assignment(cost)
    chosen = where[r, c]
    return np.sort(chosen[chosen >= 0])


def _scores(tp: int, n_true: int, n_pred: int, sum_iou: float) -> dict:
    fp, fn = n_pred - tp, n_true - tp

    def ratio(a, b):
        return float(a / b) if b > 0 else 0.0

    return {
        "n_true": int(n_true), "n_pred": int(n_pred), "tp": int(tp), "fp": int(fp), "fn": int(fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "mean_matched_iou": ratio(sum_iou, tp),
        "panoptic_quality": ratio(sum_iou, tp + fp / 2 + fn / 2),
    }


def match_labels(true: np.ndarray, pred: np.ndarray, thresh: float = 0.5, *, overlap: LabelOverlap | None = None,
                 return_matches: bool = False) -> dict:
    """Precision, recall, F1, mean matched IoU and panoptic quality at one IoU threshold (definitions: module doc).

    With ``return_matches`` the result also holds ``matches``: a list of (true id, predicted id, IoU).
    """
    ov = overlap if overlap is not None else label_overlap(true, pred)
    chosen = match_pairs(ov.pair_true, ov.pair_pred, ov.pair_iou, thresh)
    out = {"iou_threshold": float(thresh),
           **_scores(len(chosen), len(ov.true_ids), len(ov.pred_ids), float(ov.pair_iou[chosen].sum()))}
    if return_matches:
        out["matches"] = [(int(ov.true_ids[ov.pair_true[i]]), int(ov.pred_ids[ov.pair_pred[i]]), float(ov.pair_iou[i]))
                          for i in chosen]
    return out


def matching_sweep(true: np.ndarray, pred: np.ndarray, thresholds: Iterable[float]) -> list[dict]:
    """:func:`match_labels` at every threshold, the overlaps computed once."""
    ov = label_overlap(true, pred)
    return [match_labels(true, pred, t, overlap=ov) for t in thresholds]


def pool_matching(results: Iterable[dict]) -> dict:
    """Scores of several images together: tp, fp, fn and matched IoU summed over images, then the ratios."""
    tp = n_true = n_pred = 0
    sum_iou = 0.0
    for r in results:
        tp += r["tp"]
        n_true += r["n_true"]
        n_pred += r["n_pred"]
        sum_iou += r["mean_matched_iou"] * r["tp"]
    return _scores(tp, n_true, n_pred, sum_iou)


def background_leak(pred: np.ndarray, truth: np.ndarray, image: np.ndarray, margin: int = 3) -> dict:
    """How much structure a virtual stain draws where the real stain has none (e.g. cell outlines copied from the
    brightfield), measured in the real stain's background.

    Background: pixels farther than ``margin`` px from the real stain's foreground (Otsu on a sigma=1 Gaussian).
    Structure: a band-pass (Gaussian sigma=1 minus sigma=4: the width of an outline, not pixel noise), on the truth's
    1-99.8 % scale. ``bg_structure`` = std of the prediction's band-pass in the background / the real stain's (1 = as
    much structure as the real stain, > 1 = extra structure). ``bg_input_r`` = Pearson r between the magnitudes of the
    prediction's and the input's band-pass in the background: whether the prediction has structure where the input has
    edges (outlines copied from the brightfield, bright or dark); the real stain's own value is ``bg_input_r_truth``.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    p, t, _ = normalize_pair(pred, truth)
    smooth = ndi.gaussian_filter(t, 1.0)
    fg = smooth > threshold_otsu(smooth)
    bg = ~ndi.binary_dilation(fg, iterations=margin)
    if bg.sum() < 100:
        return {"bg_structure": float("nan"), "bg_input_r": float("nan"), "bg_input_r_truth": float("nan"),
                "bg_fraction": float(bg.mean())}

    def band(a):
        a = np.asarray(a, np.float64)
        return ndi.gaussian_filter(a, 1.0) - ndi.gaussian_filter(a, 4.0)

    bp, bt, bi = band(p)[bg], band(t)[bg], band(image)[bg]
    return {
        "bg_structure": float(bp.std() / max(bt.std(), 1e-12)),
        "bg_input_r": pearson(np.abs(bp), np.abs(bi)),
        "bg_input_r_truth": pearson(np.abs(bt), np.abs(bi)),
        "bg_fraction": float(bg.mean()),
    }
