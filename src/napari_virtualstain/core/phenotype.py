"""Per-cell phenotype measures: what a translation did to *these* cells, as distributions a biologist compares.

The translocation measure of the NF-kB assay (BBBC014): nuclei segmented from the DNA channel (``stain_to_labels``:
Otsu on a Gaussian-smoothed image, distance-transform watershed), a cytoplasmic ring of ``ring_width`` pixels grown
around each nucleus (``expand_labels``: rings of neighbours never overlap), and per cell the ratio of the marker's
mean inside the nucleus to its mean in the ring. A stimulated cell (NF-kB in the nucleus) has a higher ratio.
Groups of cells (source, translated, real target) are compared by their medians and by the Kolmogorov-Smirnov and
Wasserstein distances between their distributions; "fraction of the way" = how far the translated median moved from
the source's toward the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import VirtualStainError
from .postprocess import stain_to_labels


@dataclass
class CellMeasures:
    """One row per cell: its label id, area, marker mean in the nucleus and in the ring, and their ratio."""

    label: np.ndarray
    area: np.ndarray
    nuclear: np.ndarray
    ring: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        return self.nuclear / np.maximum(self.ring, 1e-6)

    def rows(self) -> list[dict]:
        return [{"cell": int(lab), "area": int(a), "nuclear_mean": float(n), "ring_mean": float(r),
                 "ratio": float(q)} for lab, a, n, r, q in zip(self.label, self.area, self.nuclear, self.ring,
                                                              self.ratio)]


def per_cell(marker: np.ndarray, nuclei: np.ndarray, ring_width: int = 6, min_ring: int = 10) -> CellMeasures:
    """Nuclear/cytoplasmic marker means of every nucleus in ``nuclei`` (labels); cells whose ring is smaller than
    ``min_ring`` pixels (crowded or at the border) are left out."""
    from scipy import ndimage as ndi
    from skimage.segmentation import expand_labels

    marker = np.asarray(marker, dtype=np.float64)
    nuclei = np.asarray(nuclei)
    if marker.shape != nuclei.shape:
        raise VirtualStainError(f"marker {marker.shape} and nuclei {nuclei.shape} differ in shape")
    grown = expand_labels(nuclei, distance=ring_width)
    ring = np.where(nuclei > 0, 0, grown)
    ids = np.unique(nuclei)
    ids = ids[ids > 0]
    if not len(ids):
        return CellMeasures(*(np.zeros(0) for _ in range(4)))
    area = ndi.sum(np.ones_like(marker), nuclei, ids)
    nuc_mean = ndi.mean(marker, nuclei, ids)
    ring_n = np.asarray(ndi.sum(np.ones_like(marker), ring, ids))
    with np.errstate(invalid="ignore", divide="ignore"):  # cells without a ring are dropped just below
        ring_mean = np.asarray(ndi.mean(marker, ring, ids)) if ring.any() else np.zeros(len(ids))
    keep = ring_n >= min_ring
    return CellMeasures(ids[keep], np.asarray(area)[keep], np.asarray(nuc_mean)[keep], ring_mean[keep])


def measure_image(image: np.ndarray, marker: int, dna: int, ring_width: int = 6,
                  nuclei: np.ndarray | None = None) -> CellMeasures:
    """Per-cell measures of a (C, Y, X) image: nuclei from its own DNA channel unless ``nuclei`` are given (e.g. the
    source's, to follow the same cells through a translation)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or max(marker, dna) >= image.shape[0]:
        raise VirtualStainError(f"expected a (C, Y, X) image with channels {marker} and {dna}; got {image.shape}")
    if nuclei is None:
        nuclei = stain_to_labels(image[dna])
    return per_cell(image[marker], nuclei, ring_width)


def pooled_sums(image: np.ndarray, marker: int = 0, dna: int = 1, ring_width: int = 6) -> np.ndarray:
    """The pooled translocation measure's parts of a (C, Y, X) image: [marker sum, pixels] inside all nuclei (Otsu
    of the Gaussian-smoothed DNA, no watershed) and in a ``ring_width`` px ring around them. The pooled ratio of
    several images is (sum of nuclear sums / nuclear pixels) / (ring sums / ring pixels): bright cells weigh more
    than in the per-cell median — the two can disagree on the same images (docs/translation.md)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    image = np.asarray(image, dtype=np.float64)
    d = ndi.gaussian_filter(image[dna], 1)
    nuclei = d > threshold_otsu(d) if d.max() > d.min() else np.zeros(d.shape, bool)
    ring = ndi.binary_dilation(nuclei, iterations=ring_width) & ~nuclei
    m = image[marker]
    return np.array([m[nuclei].sum(), nuclei.sum(), m[ring].sum(), ring.sum()], np.float64)


def pooled_ratio(parts) -> float:
    """Nuclear over ring mean of one or more images' :func:`pooled_sums` (summed first)."""
    s = np.sum(np.atleast_2d(np.asarray(parts, np.float64)), axis=0)
    return float((s[0] / s[1]) / (s[2] / s[3])) if s[1] and s[3] else float("nan")


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Medians and distances between two per-cell distributions."""
    from scipy.stats import ks_2samp, wasserstein_distance

    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return {"n": [len(a), len(b)], "median": [float(np.median(a)) if len(a) else None,
                                                  float(np.median(b)) if len(b) else None]}
    return {"n": [len(a), len(b)], "median": [float(np.median(a)), float(np.median(b))],
            "ks": float(ks_2samp(a, b).statistic), "wasserstein": float(wasserstein_distance(a, b))}


def fraction_of_the_way(source: np.ndarray, translated: np.ndarray, target: np.ndarray) -> float:
    """(median translated - median source) / (median target - median source): 1 = the target's phenotype."""
    s, t, g = (float(np.median(np.asarray(v, float))) for v in (source, translated, target))
    return (t - s) / (g - s) if g != s else float("nan")


COLOURS = [(230, 159, 0), (0, 114, 178), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0)]


def histogram_figure(groups: dict[str, np.ndarray], path, xlabel: str = "nuclear / cytoplasmic ratio",
                     bins: int = 40) -> None:
    """Per-group density curves of a per-cell measure (with each group's median as a tick), drawn with Pillow."""
    from PIL import Image, ImageDraw

    values = {k: np.asarray(v, float)[np.isfinite(v)] for k, v in groups.items() if len(v)}
    if not values:
        raise VirtualStainError("no cells to draw: none of the images had measurable nuclei")
    lo, hi = np.percentile(np.concatenate(list(values.values())), [0.5, 99.5])
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    w, h, m = 720, 400, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.line([(m, h - m), (w - 20, h - m)], fill="black")
    draw.line([(m, 20), (m, h - m)], fill="black")
    dens = {k: np.histogram(np.clip(v, lo, hi), edges, density=True)[0] for k, v in values.items()}
    top = max(d.max() for d in dens.values()) or 1.0
    xs = m + (edges[:-1] + edges[1:] - 2 * lo) / 2 / (hi - lo) * (w - 20 - m)
    for i, (name, d) in enumerate(dens.items()):
        colour = COLOURS[i % len(COLOURS)]
        ys = h - m - d / top * (h - m - 30)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        med = float(np.median(values[name]))
        x = m + (med - lo) / (hi - lo) * (w - 20 - m)
        draw.line([(x, h - m), (x, h - m + 8)], fill=colour, width=3)
        draw.text((w - 260, 25 + 16 * i), f"{name}: median {med:.3f} (n={len(values[name])})", fill=colour)
    for v in np.linspace(lo, hi, 5):
        x = m + (v - lo) / (hi - lo) * (w - 20 - m)
        draw.text((x - 12, h - m + 12), f"{v:.2f}", fill="black")
    draw.text((w // 2 - 80, h - 20), xlabel, fill="black")
    img.save(path)
