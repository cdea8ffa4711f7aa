"""Image-quality metrics on a stated common scale (callers pass images already mapped to [0, 1])."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def image_metrics(pred: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> dict[str, float]:
    """Pearson r, MSE, PSNR (dB) and SSIM of one 2D channel pair."""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    mse = float(np.mean((pred - truth) ** 2))
    return {
        "pearson": pearson(pred, truth),
        "mse": mse,
        "psnr": float(peak_signal_noise_ratio(truth, pred, data_range=data_range)) if mse > 0 else float("inf"),
        "ssim": float(structural_similarity(truth, pred, data_range=data_range)),
    }
