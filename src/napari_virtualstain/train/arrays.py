"""Training data from arrays in memory (napari layers): fields of one input, their stains and labels, and a
validation rectangle — the same ``TrainingSpec`` a folder or a config gives.

A validation rectangle (y0, y1, x0, x1) holds its pixels out of every field: each field becomes the rectangle
(``split: val``) and the up to four rectangles around it that train (above, below, left, right; pieces thinner than
``MIN_PIECE`` pixels are left out rather than trained as slivers), so no training crop touches a validation pixel.
Without a rectangle the right-hand ``val_fraction`` strip of every field is held out, as in ``virtualstain train``.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import VirtualStainError
from ..core.normalize import as_float
from .data import TrainingImage, TrainingSpec

MIN_PIECE = 16


def _fields(arr: np.ndarray, n_channels: int, what: str) -> list[np.ndarray]:
    """(Y, X), (C, Y, X) or (N, [C,] Y, X) -> N arrays of (C, Y, X)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return [arr[None]]
    if n_channels > 1:
        if arr.ndim == 3 and arr.shape[0] == n_channels:
            return [arr]
        if arr.ndim == 4 and arr.shape[1] == n_channels:
            return [a for a in arr]
        raise VirtualStainError(f"{what}: shape {arr.shape} does not hold {n_channels} channels as (C, Y, X) or "
                                "(N, C, Y, X)")
    if arr.ndim == 3:
        return [a[None] for a in arr]
    raise VirtualStainError(f"{what}: expected a 2D image or a stack of 2D fields (N, Y, X); got shape {arr.shape}")


def _pieces(box: tuple[int, int, int, int], h: int, w: int) -> tuple[tuple[slice, slice], list[tuple[slice, slice]]]:
    y0, y1, x0, x1 = (int(round(v)) for v in box)
    y0, y1, x0, x1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
    if y1 - y0 < MIN_PIECE or x1 - x0 < MIN_PIECE:
        raise VirtualStainError(f"the validation rectangle is {max(0, y1 - y0)} x {max(0, x1 - x0)} px inside the "
                                f"image; draw one at least {MIN_PIECE} x {MIN_PIECE} px over the image")
    around = [(slice(0, y0), slice(0, w)), (slice(y1, h), slice(0, w)),
              (slice(y0, y1), slice(0, x0)), (slice(y0, y1), slice(x1, w))]
    keep = [(ys, xs) for ys, xs in around if ys.stop - ys.start >= MIN_PIECE and xs.stop - xs.start >= MIN_PIECE]
    return (slice(y0, y1), slice(x0, x1)), keep


def spec_from_arrays(name: str, inputs, input_names: list[str], stains: dict | None = None, labels: dict | None = None,
                     *, val_box: tuple[int, int, int, int] | None = None, val_fraction: float = 0.15,
                     pixel_size_um: float | None = None, source: str = "napari layers") -> TrainingSpec:
    """A TrainingSpec from an input array (one field or a stack of fields), stain arrays and instance-label arrays
    of the same fields (module doc for the split)."""
    stains, labels = dict(stains or {}), dict(labels or {})
    if not stains and not labels:
        raise VirtualStainError("pick at least one target: an image layer with the real stain, or a labels layer with "
                                "the nuclei (or cells)")
    fields = _fields(inputs, len(input_names), "the input")
    per_stain = {n: _fields(a, 1, f"stain {n!r}") for n, a in stains.items()}
    per_label = {n: [f[0] for f in _fields(a, 1, f"labels {n!r}")] for n, a in labels.items()}
    shape = fields[0].shape[1:]
    for what, arrs in [*(("stain " + repr(n), a) for n, a in per_stain.items()),
                       *(("labels " + repr(n), [x[None] for x in a]) for n, a in per_label.items())]:
        if len(arrs) != len(fields) or any(a.shape[-2:] != f.shape[1:] for a, f in zip(arrs, fields)):
            raise VirtualStainError(f"{what} has {len(arrs)} field(s) of {arrs[0].shape[-2:]} px; the input has "
                                    f"{len(fields)} of {shape}: targets must be registered to the input, field by field")
    for n, arrs in per_label.items():
        if any(not np.issubdtype(np.asarray(a).dtype, np.integer) for a in arrs):
            raise VirtualStainError(f"labels {n!r} must hold integer instance ids (a Labels layer); got "
                                    f"{np.asarray(arrs[0]).dtype}")
    images = []
    for i, f in enumerate(fields):
        st = np.stack([per_stain[n][i][0] for n in stains]) if stains else np.zeros((0, *f.shape[1:]), np.float32)
        lab = {n: np.asarray(per_label[n][i]) for n in labels}
        if not np.isfinite(as_float(st)).all():
            raise VirtualStainError(f"the stain of field {i} holds NaN or infinite pixels; fill or crop them first")
        whole = TrainingImage(f"field {i}", as_float(f), as_float(st), lab)
        if val_box is None:
            images.append(whole)
            continue
        (vy, vx), train_parts = _pieces(val_box, *f.shape[1:])
        images.append(_part(whole, vy, vx, "val", "val"))
        images += [_part(whole, ys, xs, "train", f"train {k}") for k, (ys, xs) in enumerate(train_parts)]
        if not train_parts:
            raise VirtualStainError("the validation rectangle leaves no training pixels; draw a smaller one")
    return TrainingSpec(name, list(input_names), list(stains), list(labels), images, pixel_size_um=pixel_size_um,
                        val_fraction=val_fraction, source=source)


def _part(im: TrainingImage, ys: slice, xs: slice, split: str, tag: str) -> TrainingImage:
    return TrainingImage(f"{im.name} {tag} [{ys.start}:{ys.stop}, {xs.start}:{xs.stop}]", im.inputs[:, ys, xs],
                         im.stains[:, ys, xs], {k: v[ys, xs] for k, v in im.labels.items()}, split)
