"""Reviewing flagged regions: a decision per region that survives new thresholds and hand edits, and a file format.

A person goes through the flags (highest uncertainty first) and marks each "hallucination" or "fine", edits outlines
or draws new regions. Moving the threshold recomputes the automatic regions; the **merge rule** keeps the work:

1. regions drawn or edited by hand are kept exactly (pixels and decision) and win where they overlap new ones;
2. a new automatic region inherits the decision of the decided earlier region it overlaps most (in pixels);
3. every other region starts "unreviewed".

Export: ``<name>.csv`` (one row per region: id, decision, by hand, area, centroid, bounding box, mean/max std, plus
channel/map/threshold) and ``<name>_labels.tif`` (the regions, with the provenance and the decisions in its metadata);
:func:`read_review` restores both.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import VirtualStainError

DECISIONS = ("unreviewed", "hallucination", "fine")
REVIEW_COLUMNS = ("id", "decision", "by_hand", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1",
                  "bbox_x1", "mean_std", "max_std")


@dataclass(frozen=True)
class Region:
    id: int
    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive ends)
    mean_std: float
    max_std: float
    decision: str = "unreviewed"
    by_hand: bool = False

    def row(self) -> dict:
        return {"id": self.id, "decision": self.decision, "by_hand": int(self.by_hand), "area": self.area,
                "centroid_y": round(self.centroid[0], 2), "centroid_x": round(self.centroid[1], 2),
                "bbox_y0": self.bbox[0], "bbox_x0": self.bbox[1], "bbox_y1": self.bbox[2], "bbox_x1": self.bbox[3],
                "mean_std": self.mean_std, "max_std": self.max_std}


@dataclass
class Review:
    """Flag regions (labels image + one :class:`Region` per id) and the person's decisions."""

    labels: np.ndarray
    regions: dict[int, Region] = field(default_factory=dict)

    def order(self) -> list[int]:
        """Region ids, most uncertain first (mean std, then size)."""
        return sorted(self.regions, key=lambda i: (-self.regions[i].mean_std, -self.regions[i].area, i))

    def decide(self, region_id: int, decision: str) -> None:
        if decision not in DECISIONS:
            raise VirtualStainError(f"decision {decision!r}: use one of {', '.join(DECISIONS)}")
        if region_id not in self.regions:
            raise VirtualStainError(f"there is no flagged region {region_id}")
        self.regions[region_id] = replace(self.regions[region_id], decision=decision)

    def counts(self) -> dict[str, int]:
        return {d: sum(r.decision == d for r in self.regions.values()) for d in DECISIONS}


def measure(labels: np.ndarray, std_map: np.ndarray, decisions: dict[int, str] | None = None,
            by_hand: set[int] | None = None) -> Review:
    """A review of a labels image: every region measured on the std map, with the decisions given by id."""
    from skimage.measure import regionprops

    labels = np.asarray(labels, dtype=np.int32)
    if labels.shape != np.shape(std_map):
        raise VirtualStainError(f"flags of shape {labels.shape} do not match the map's {np.shape(std_map)}")
    decisions, by_hand = decisions or {}, by_hand or set()
    regions = {}
    for r in regionprops(labels):
        values = np.asarray(std_map)[tuple(r.coords.T)]
        regions[int(r.label)] = Region(int(r.label), int(r.area), (float(r.centroid[0]), float(r.centroid[1])),
                                       tuple(int(v) for v in r.bbox), float(values.mean()), float(values.max()),
                                       decisions.get(int(r.label), "unreviewed"), int(r.label) in by_hand)
    return Review(labels, regions)


def edited_ids(current: np.ndarray, automatic: np.ndarray) -> set[int]:
    """Ids of ``current`` whose pixels differ from the automatic labels it started as (edited or drawn by hand)."""
    current, automatic = np.asarray(current), np.asarray(automatic)
    changed = current != automatic
    return {int(i) for i in np.unique(current[changed]) if i} | {
        int(i) for i in np.unique(automatic[changed]) if i and i in current}


def sync(review: Review, current: np.ndarray, automatic: np.ndarray, std_map: np.ndarray) -> Review:
    """The review after hand edits of its labels (``current``, as the person left the layer)."""
    hand = edited_ids(current, automatic) | {i for i, r in review.regions.items() if r.by_hand}
    decisions = {i: r.decision for i, r in review.regions.items()}
    return measure(current, std_map, decisions, hand & set(np.unique(current).tolist()))


def merge(new_automatic: np.ndarray, previous: Review | None, std_map: np.ndarray) -> Review:
    """New automatic regions (e.g. another threshold) merged with an earlier review by the module's rule."""
    new = np.asarray(new_automatic, dtype=np.int32)
    if previous is None:
        return measure(new, std_map)
    out = np.zeros_like(new)
    decisions, hand = {}, set()
    next_id = 1
    old = previous.labels
    decided = {i for i, r in previous.regions.items() if r.decision != "unreviewed"}
    for i in np.unique(new):
        if i == 0:
            continue
        mask = new == i
        out[mask] = next_id
        overlap = old[mask]
        hits = [(int(np.count_nonzero(overlap == j)), j) for j in np.unique(overlap) if j in decided]
        if hits:
            decisions[next_id] = previous.regions[max(hits)[1]].decision
        next_id += 1
    for i, r in previous.regions.items():  # hand regions last: they win where they overlap
        if r.by_hand:
            out[old == i] = next_id
            decisions[next_id], hand = r.decision, hand | {next_id}
            next_id += 1
    return measure(out, std_map, decisions, hand)


def review_paths(path: str | Path) -> tuple[Path, Path]:
    """The review's CSV and labels TIFF for ``path`` (either of them, or their common stem)."""
    from .io import output_name

    path = Path(path)
    suffix = output_name("review_labels", "")
    name = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem
    return path.with_name(output_name("review_table", name)), path.with_name(output_name("review_labels", name))


def write_review(path: str | Path, review: Review, provenance: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """``<stem>.csv`` (a row per region) and ``<stem>_labels.tif`` (regions + provenance + decisions)."""
    from .io import atomic_write, write_labels

    csv_path, tif_path = review_paths(path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    with atomic_write(csv_path) as part, open(part, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*extra, *REVIEW_COLUMNS])
        w.writeheader()
        for i in review.order():
            w.writerow({**extra, **review.regions[i].row()})
    meta = {**provenance, "review": {"decisions": {str(i): r.decision for i, r in review.regions.items()},
                                     "by_hand": sorted(i for i, r in review.regions.items() if r.by_hand), **extra}}
    write_labels(tif_path, review.labels, json.loads(json.dumps(meta, default=str)))
    return csv_path, tif_path


def read_review(path: str | Path, std_map: np.ndarray) -> tuple[Review, dict]:
    """A review written by :func:`write_review` (the CSV or the labels TIFF path), measured on ``std_map``."""
    import tifffile

    from .io import read_provenance

    path = Path(path)
    _, tif_path = review_paths(path)
    if not tif_path.is_file():
        raise VirtualStainError(f"{tif_path.name} not found beside {path.name}: a review is the CSV and its labels TIFF")
    labels = tifffile.imread(tif_path)
    meta = read_provenance(tif_path)
    info = meta.get("review", {})
    decisions = {int(k): v for k, v in info.get("decisions", {}).items() if v in DECISIONS}
    review = measure(labels.reshape(labels.shape[-2:]), std_map, decisions, set(info.get("by_hand", [])))
    return review, meta
