"""Boundary channels <-> instance labels. Cheap and model-free, so thresholds can be changed and re-run at once.

Training targets: for a set of instance labels, a ``boundary`` map (1 on the pixels where two instances or an
instance and the background meet, ``thick`` mode, 0 elsewhere) and a ``foreground`` map (1 inside any instance).
Prediction: seeds are the connected parts of the foreground that are far from a boundary; a watershed on the
boundary map grows them until they meet at the predicted boundaries, inside the predicted foreground.

Distance head (an instance map that pins down centres): per instance, the distance to its own boundary divided by
the instance's largest such distance (1 at the centre, ~0 at the edge; Naylor et al., IEEE TMI 2019). Seeds are the
regions where the predicted map is high, so each nucleus is seeded at its centre, not wherever a boundary map
happens to leave a gap; a watershed on the negated map grows them inside the foreground.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential, watershed

from .errors import VirtualStainError


def boundary_target(labels: np.ndarray) -> np.ndarray:
    """1.0 on instance boundaries (two-pixel 'thick' boundaries, so touching cells stay apart), else 0.0."""
    labels = as_labels(labels)
    return find_boundaries(labels, connectivity=1, mode="thick").astype(np.float32)


def foreground_target(labels: np.ndarray) -> np.ndarray:
    return (as_labels(labels) > 0).astype(np.float32)


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-instance normalised distance to the instance's boundary: 1 at its centre, 1/max at its edge, 0 outside."""
    labels = as_labels(labels)
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in sl)  # a background margin: edges count
        mask = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        if d.max() > 0:
            out[sl][mask] = (d[mask] / d.max()).astype(np.float32)
    return out


def distance_to_labels(
    distance: np.ndarray,
    foreground: np.ndarray | None = None,
    seed_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_seed_area: int = 4,
    min_area: int = 16,
) -> np.ndarray:
    """Instance labels (uint32) from a predicted normalised distance map: seeds where it exceeds ``seed_threshold``
    (the nuclei's centres), grown by a watershed on the negated map inside the foreground (or where the map is
    above 0.1 without one)."""
    dist = np.asarray(distance, dtype=np.float32)
    mask = (np.asarray(foreground) > foreground_threshold) if foreground is not None else dist > 0.1
    seeds, _ = ndi.label(mask & (dist > seed_threshold))
    seeds = drop_small(seeds, min_seed_area)
    labels = watershed(-dist, seeds, mask=mask | (seeds > 0))
    labels = drop_small(labels, min_area)
    return relabel_sequential(labels)[0].astype(np.uint32)


def as_labels(labels: np.ndarray, where=None) -> np.ndarray:
    """2D integer instance labels (float images holding whole numbers are converted); anything else is one error
    that says what labels are (``where``: the file, for the message)."""
    labels = np.asarray(labels)
    prefix = f"{where}: " if where is not None else ""
    if labels.ndim != 2:
        raise VirtualStainError(f"{prefix}instance labels must be 2D (Y, X); got shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and np.all(np.mod(labels, 1) == 0):
        return labels.astype(np.int64)
    raise VirtualStainError(
        f"{prefix}instance labels must hold integers: integer ids (0 = background, one id per nucleus/cell); got "
        f"{labels.dtype} values with fractions — a probability map or a stain is not labels (save labels as uint16, "
        "or put a stain under target/)")


def boundaries_to_labels(
    boundary: np.ndarray,
    foreground: np.ndarray | None = None,
    boundary_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_seed_area: int = 8,
    min_area: int = 16,
    seeds: np.ndarray | None = None,
) -> np.ndarray:
    """Instance labels (uint32) from a predicted boundary probability map (+ an optional foreground map).

    Without a foreground map every pixel not on a boundary can be an object (fine for confluent cells).
    ``seeds`` (instance labels, e.g. nuclei for cells) replace the seeds found from the boundary map: one object per
    seed, grown over the boundary landscape inside the foreground, as CellProfiler's secondary objects.
    """
    boundary = np.asarray(boundary, dtype=np.float32)
    if foreground is None:
        mask = np.ones(boundary.shape, dtype=bool)
    else:
        mask = np.asarray(foreground) > foreground_threshold
    if seeds is None:
        interior = mask & (boundary < boundary_threshold)
        interior = ndi.binary_opening(interior, iterations=1)
        seeds, _ = ndi.label(interior)
        seeds = drop_small(seeds, min_seed_area)
    else:
        seeds = np.asarray(seeds)
        if seeds.shape != boundary.shape:
            raise VirtualStainError(f"seed labels of shape {seeds.shape} do not match the boundary map {boundary.shape}")
        mask = mask | (seeds > 0)
    labels = watershed(boundary, seeds, mask=mask)
    labels = drop_small(labels, min_area)
    return relabel_sequential(labels)[0].astype(np.uint32)


def drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Set instances with fewer than ``min_area`` pixels to 0 (background)."""
    if min_area <= 1 or labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def _smoothed(stain: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.filters import gaussian

    img = np.asarray(stain, dtype=np.float32)
    if img.ndim != 2:
        raise VirtualStainError(f"a stain to segment must be 2D (Y, X); got shape {img.shape}")
    return gaussian(img, sigma=sigma, preserve_range=True) if sigma > 0 else img


def _otsu(smooth: np.ndarray) -> float | None:
    from skimage.filters import threshold_otsu

    if not np.isfinite(smooth).all() or smooth.max() <= smooth.min():
        return None  # nothing to threshold: flat or not finite
    return float(threshold_otsu(smooth))


def stain_threshold(stain: np.ndarray, sigma: float = 1.0) -> float | None:
    """The Otsu threshold of the Gaussian-smoothed stain, as ``stain_to_labels`` takes it for one block of a field."""
    return _otsu(_smoothed(stain, sigma))


def stain_to_labels(stain: np.ndarray, sigma: float = 1.0, min_distance: int = 4, min_area: int = 16,
                    threshold: float | None = None) -> np.ndarray:
    """Nuclei from a (real or virtual) nuclear stain, the classic way: Otsu on a Gaussian-smoothed image, then a
    watershed on the distance transform seeded at its local maxima (touching nuclei split at their neck).

    ``threshold``: the field's own (``stain_threshold``) when this is one block of it; default: this image's Otsu.
    On the real Hoechst of the held-out scratch-assay frames this reaches nuclei F1@0.5 ~0.9 against the true labels,
    so a good virtual stain gives good nuclei whether or not the boundary channels are good.
    """
    from skimage.feature import peak_local_max

    smooth = _smoothed(stain, sigma)
    if threshold is None:
        threshold = _otsu(smooth)
    if threshold is None or not np.isfinite(smooth).all():
        return np.zeros(smooth.shape, np.uint32)
    mask = smooth > threshold
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=1))
    dist = ndi.distance_transform_edt(mask)
    regions, _ = ndi.label(mask)
    peaks = peak_local_max(dist, min_distance=max(1, int(min_distance)), labels=regions, exclude_border=False)
    markers = np.zeros(smooth.shape, np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    labels = drop_small(labels, min_area)
    return relabel_sequential(labels)[0].astype(np.uint32)


LABEL_HALO = 96  # px of context around every labels block: more than the largest nucleus or cell of the demos' data


def labels_in_blocks(label_crop, shape: tuple[int, int], block: int, halo: int = LABEL_HALO,
                     on_block=None) -> dict[str, np.ndarray]:
    """Instance labels of a big field block by block, stitched at the seams.

    ``label_crop(ys, xs)`` labels one crop (two slices) and returns ``{set: labels}``. Each block's crop is the block
    plus ``halo`` on every side; the block keeps the objects whose centroid lies in its own core and pastes them with
    new ids, so an object at a seam is drawn once, by the block that sees it whole (its centre is at least ``halo``
    from the crop's edge). Working memory is one crop's (the watershed of a 16.7 M pixel field needed ~0.8 GB by
    itself) plus the outputs, held as uint16 until a set passes 65,535 objects (then uint32: one copy): half the
    memory of a big field's labels, and what the label files store anyway (``io.write_labels``). Ids are not in the
    order a whole-field run would give. ``on_block(done, total)`` after every block (progress; it may raise to cancel).
    """
    h, w = shape
    out: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    corners = [(y0, x0) for y0 in range(0, h, block) for x0 in range(0, w, block)]
    for j, (y0, x0) in enumerate(corners):
        y1, x1 = min(h, y0 + block), min(w, x0 + block)
        cy0, cx0, cy1, cx1 = max(0, y0 - halo), max(0, x0 - halo), min(h, y1 + halo), min(w, x1 + halo)
        for name, lab in label_crop(slice(cy0, cy1), slice(cx0, cx1)).items():
            dst = out.setdefault(name, np.zeros((h, w), np.uint16))
            n = int(lab.max())
            if n == 0:
                continue
            if dst.dtype == np.uint16 and count.get(name, 0) + n > np.iinfo(np.uint16).max:
                dst = out[name] = dst.astype(np.uint32)  # more objects than uint16 ids
            ys, xs = np.nonzero(lab)
            ids = lab[ys, xs].astype(np.int64)
            area = np.maximum(np.bincount(ids, minlength=n + 1), 1)
            cy = np.bincount(ids, ys, minlength=n + 1) / area + cy0
            cx = np.bincount(ids, xs, minlength=n + 1) / area + cx0
            keep = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
            keep[0] = False
            kept = np.flatnonzero(keep)
            new = np.zeros(n + 1, dst.dtype)
            new[kept] = count.get(name, 0) + np.arange(1, len(kept) + 1)
            count[name] = count.get(name, 0) + len(kept)
            region = dst[cy0:cy1, cx0:cx1]
            mapped = new[lab]
            free = (mapped > 0) & (region == 0)
            region[free] = mapped[free]
        if on_block is not None:
            on_block(j + 1, len(corners))
    return out
