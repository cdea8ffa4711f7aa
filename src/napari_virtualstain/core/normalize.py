"""Intensity normalisation: every input dtype ends up on the same scale, and predictions map back to target units.

Inputs are normalised per image and per channel with percentiles (robust to uint8/uint16/float and to a few hot
pixels): ``low`` percentile -> -1, ``high`` percentile -> +1. Targets are normalised with fixed per-channel values
measured on the training set and stored in the bundle, so predictions can be mapped back to the intensity range of
the training stains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import VirtualStainError


@dataclass(frozen=True)
class PercentileNorm:
    """Per-image percentile normalisation to [-1, 1] (values outside are kept, not clipped)."""

    low: float = 1.0
    high: float = 99.8

    def to_dict(self) -> dict:
        return {"method": "percentile", **asdict(self)}


@dataclass(frozen=True)
class FixedNorm:
    """Fixed affine normalisation: ``vmin`` -> -1, ``vmax`` -> +1 (stored per target channel in the bundle)."""

    vmin: float
    vmax: float

    def to_dict(self) -> dict:
        return {"method": "fixed", **asdict(self)}


def norm_from_dict(d: dict):
    method = d.get("method")
    if method == "percentile":
        return PercentileNorm(float(d.get("low", 1.0)), float(d.get("high", 99.8)))
    if method == "fixed":
        return FixedNorm(float(d["vmin"]), float(d["vmax"]))
    raise VirtualStainError(f"unknown normalisation method {method!r}; use 'percentile' or 'fixed'")


def as_float(image: np.ndarray, what: str = "image") -> np.ndarray:
    """float32 copy; refuses non-numeric dtypes and non-finite values with a message that says what to do."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.float32)
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise VirtualStainError(f"{what} has dtype {image.dtype}; expected an integer or floating-point image")
    out = image.astype(np.float32, copy=True)
    bad = ~np.isfinite(out)
    if bad.any():
        raise VirtualStainError(
            f"{what} contains {int(bad.sum())} NaN/Inf pixel(s); fill them before predicting: 'virtualstain predict "
            "--fill-nan' gives each the value of its nearest finite pixel (holes of any size), as does "
            "napari_virtualstain.core.normalize.fill_non_finite(image) in Python"
        )
    return out


def fill_non_finite(image: np.ndarray) -> np.ndarray:
    """A float32 copy with every NaN/Inf pixel set to its nearest finite pixel in the same 2D plane (Euclidean
    distance transform with indices: any hole size, unlike a median filter that only closes 1-2 px gaps)."""
    from scipy import ndimage as ndi

    out = np.array(image, dtype=np.float32)
    planes = out.reshape(-1, *out.shape[-2:]) if out.ndim >= 2 else out.reshape(1, 1, -1)
    for plane in planes:
        bad = ~np.isfinite(plane)
        if not bad.any():
            continue
        if bad.all():
            raise VirtualStainError("a plane holds no finite pixel at all; nothing to fill it from")
        idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        plane[...] = plane[tuple(idx)]
    return out


def percentile_levels(channel: np.ndarray, norm: PercentileNorm = PercentileNorm(), what: str = "image") -> tuple:
    """The (low, high) values one channel is normalised between: its ``norm`` percentiles (its min/max when they
    coincide). A constant channel carries no information about the specimen; it is refused rather than divided by 0."""
    lo, hi = np.percentile(channel, [norm.low, norm.high])
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = float(channel.min()), float(channel.max())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            raise VirtualStainError(
                f"{what} is constant (all pixels = {lo:g}); there is nothing to predict from. "
                "Check that the right channel/plane was chosen and that the image is not empty"
            )
    return lo, hi


def percentile_normalize(channels: np.ndarray, norm: PercentileNorm = PercentileNorm(), what: str = "image",
                         levels: list[tuple] | None = None) -> np.ndarray:
    """Normalise each channel of a (C, Y, X) float array to [-1, 1] between its own percentiles — or between the
    given per-channel ``levels`` (:func:`percentile_levels` of a whole field, applied to one block of it)."""
    out = np.empty_like(channels, dtype=np.float32)
    for c, ch in enumerate(channels):
        lo, hi = levels[c] if levels is not None else percentile_levels(ch, norm, f"{what} channel {c}")
        out[c] = (ch - lo) / (hi - lo) * 2.0 - 1.0
    return out


def fixed_normalize(channels: np.ndarray, norms: list[FixedNorm]) -> np.ndarray:
    out = np.empty_like(channels, dtype=np.float32)
    for c, (ch, n) in enumerate(zip(channels, norms)):
        out[c] = (ch - n.vmin) / (n.vmax - n.vmin) * 2.0 - 1.0
    return out


def fixed_denormalize(channels: np.ndarray, norms: list[FixedNorm], inplace: bool = False) -> np.ndarray:
    """[-1, 1] -> units, per channel; ``inplace`` (a float32 array) reuses the input's memory, as a big field's
    output would otherwise exist twice."""
    out = channels if inplace and channels.dtype == np.float32 else np.empty_like(channels, dtype=np.float32)
    for c, (ch, n) in enumerate(zip(channels, norms)):
        if out is not channels:
            out[c] = ch
        out[c] += 1.0
        out[c] *= (n.vmax - n.vmin) / 2.0
        out[c] += n.vmin
    return out


def fit_fixed_norm(images: list[np.ndarray], low: float = 1.0, high: float = 99.8) -> FixedNorm:
    """Dataset-wide percentiles of one target channel (over all its training images)."""
    values = np.concatenate([np.asarray(im, dtype=np.float32).ravel() for im in images])
    if values.size > 4_000_000:  # percentiles of a random subset are plenty
        values = np.random.default_rng(0).choice(values, 4_000_000, replace=False)
    lo, hi = np.percentile(values, [low, high])
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = float(values.min()), float(values.max())
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            hi = lo + 1.0
    return FixedNorm(float(lo), float(hi))
