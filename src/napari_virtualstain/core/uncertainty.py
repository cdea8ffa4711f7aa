"""Where a diffusion prediction can't be trusted: DDPMavg, step-std and seed-std maps, and flagged regions (DM4ISL).

During sampling every step yields the network's estimate x̂0,t of the clean image. For the steps whose timestep lies
in a window of the schedule we keep a running mean and variance per pixel (Welford; no stack of step images):

- ``avg``       mean of x̂0,t over the window (DDPMavg; closer to the truth than the final sample in DM4ISL);
- ``std_steps`` std of the same x̂0,t set (how much the estimate moves while the chain settles);
- ``std_seeds`` std of ``avg`` across k seeds, the seeds run as one batch (how much the answer depends on the noise).

The window is given as fractions of the training schedule, ``t / T`` in ``[low, high)`` (DM4ISL used t = 300..800 of
1000, i.e. (0.3, 0.8)), so it means the same for a 1000-step DDPM, a 50-step DDIM or the 15-step residual shift.

Normalisation, stated: maps are in the units of the prediction itself — a stain channel in the training stain's
intensity units (the checkpoint's fixed scale), a boundary/foreground channel in probability units — and are never
rescaled by statistics of other images in a batch (DM4ISL min–max normalised over the batch, which makes one image's
map depend on its neighbours). std is the population std (ddof = 0).

Flags are a separate, cheap function of a cached map, so a threshold can be moved without running the model.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bundle import Bundle
from .errors import VirtualStainError
from .normalize import FixedNorm
from .sampling import SamplerHooks
from .settings import DEFAULT, RunSettings
from .tasks.stain import (
    StainResult,
    decode_outputs,
    label_route,
    label_thresholds,
    labels_from_channels,
    prepare_stain_run,
    run_stain_model,
    sampler_name,
)

MODES = ("steps", "seeds", "both")
DEFAULT_WINDOW = (0.3, 0.8)
MAP_NAMES = ("avg", "std_steps", "std_seeds")


class RunningStats:
    """Per-element running mean and variance (Welford), so no stack of step images is kept."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        self.count += 1
        if self.mean is None:
            self.mean = x.clone()
            self._m2 = torch.zeros_like(x)
            return
        delta = x - self.mean
        self.mean += delta / self.count
        self._m2 += delta * (x - self.mean)

    @property
    def var(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no values were added")
        return self._m2 / self.count


def window_mask(timesteps: Sequence[int], num_train_timesteps: int, window: tuple[float, float]) -> list[bool]:
    """Which steps of a schedule fall in ``window`` (fractions t / T in [low, high)); refuses an empty window."""
    low, high = (float(v) for v in window)
    if not 0.0 <= low < high <= 1.0:
        raise VirtualStainError(
            f"step window {low:g}..{high:g} is outside the schedule: give fractions 0 <= low < high <= 1 "
            f"(DM4ISL's steps 300-800 of 1000 are 0.3,0.8)"
        )
    mask = [low <= int(t) / num_train_timesteps < high for t in timesteps]
    if not any(mask):
        ts = ", ".join(str(int(t)) for t in timesteps)
        raise VirtualStainError(
            f"step window {low:g}..{high:g} contains no step of this {len(mask)}-step schedule "
            f"(timesteps {ts} of {num_train_timesteps}); widen the window or use more steps"
        )
    return mask


@dataclass
class UncertaintyResult:
    """The prediction (final sample of the first seed) plus maps (C, Y, X) in output units, keyed by map name."""

    stain: StainResult
    maps: dict[str, np.ndarray]
    provenance: dict = field(default_factory=dict)

    def map_channel(self, map_name: str, channel: str) -> np.ndarray:
        return self.maps[map_name][self.stain.channel_names.index(channel)]


def _output_scale(config) -> np.ndarray:
    """Normalised units -> output units for a spread (half the fixed range per channel; 0.5 for probabilities)."""
    scale = []
    for spec in config.output_channels:
        n = spec.normalization if isinstance(spec.normalization, FixedNorm) else FixedNorm(0.0, 1.0)
        scale.append((n.vmax - n.vmin) / 2.0)
    return np.asarray(scale, dtype=np.float32)[:, None, None]


def check_seeds(mode: str, seeds: Sequence[int]) -> list[int]:
    if mode not in MODES:
        raise VirtualStainError(f"uncertainty mode {mode!r}: use one of {', '.join(MODES)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise VirtualStainError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise VirtualStainError(f"seeds must differ (got {seeds}); repeated seeds give identical chains")
    if mode == "steps":
        return seeds[:1]
    if len(seeds) < 2:
        raise VirtualStainError(
            f"a seed-std map needs at least 2 seeds (got {len(seeds)}); use --seeds 4, or --uncertainty steps"
        )
    return seeds


def check_request(bundle: Bundle, mode: str, seeds: Sequence[int], window: tuple[float, float],
                  sampler: str | None = None, steps: int | None = None) -> tuple[list[int], object, list[bool]]:
    """Refuse a request the bundle cannot serve, before any image is read; returns (seeds used, the scheduler with
    its timesteps set, which steps fall in the window)."""
    config = bundle.config
    if config.task != "stain":
        raise VirtualStainError(f"checkpoint {config.name!r} is a {config.task!r} model; uncertainty maps need a "
                                "virtual-stain model")
    if config.objective == "regression":
        raise VirtualStainError(
            f"checkpoint {config.name!r} is a one-pass regression model: it has no sampling steps or seeds to measure "
            "uncertainty from; use a residual_shift or ddpm checkpoint"
        )
    seeds = check_seeds(mode, seeds)
    if steps is None and config.objective == "residual_shift":
        # maps over steps need the chain's steps: the full schedule, not a fast predict default of 1-2 steps
        steps = config.scheduler["num_train_timesteps"]
    scheduler = bundle.make_scheduler(sampler, steps)
    return seeds, scheduler, window_mask(scheduler.timesteps, scheduler.config.num_train_timesteps, window)


def predict_uncertainty(
    bundle: Bundle,
    image: np.ndarray,
    *,
    mode: str = "steps",
    seeds: Sequence[int] = (0, 1, 2, 3),
    window: tuple[float, float] = DEFAULT_WINDOW,
    channel_axis: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    make_labels: bool = True,
    input_name: str | None = None,
    labels_from: str | None = None,
    thresholds: dict | None = None,
    settings: RunSettings = DEFAULT,
) -> UncertaintyResult:
    """Sample ``bundle`` once per seed (as one batch) and return the prediction with its uncertainty maps.

    mode "steps": one seed, ``avg`` + ``std_steps``; "seeds": k >= 2 seeds, ``avg`` (mean over seeds) +
    ``std_seeds``; "both": all three (``std_steps`` is the root-mean-square of the per-seed step-stds).
    """
    config = bundle.config
    seeds, scheduler, in_window = check_request(bundle, mode, seeds, window, sampler, steps)

    cond, run = prepare_stain_run(bundle, image, channel_axis, input_name, settings)

    stats = RunningStats()

    def on_step(i: int, t: int, x0_hat: torch.Tensor) -> None:
        if in_window[i]:
            stats.add(x0_hat)

    out, passes = run_stain_model(run.denoiser, config, cond, run.plan, seeds, run.batch_size,
                                  SamplerHooks.of(settings, on_step), scheduler, run.mean_denoiser)

    per_seed_avg = stats.mean  # (k, C, H, W), normalised units
    scale = _output_scale(config)
    maps: dict[str, np.ndarray] = {}
    maps["avg"] = decode_outputs(config, per_seed_avg.mean(dim=0).float().cpu().numpy())
    if mode in ("steps", "both"):
        maps["std_steps"] = (stats.var.mean(dim=0).sqrt().float().cpu().numpy() * scale).astype(np.float32)
    if mode in ("seeds", "both"):
        maps["std_seeds"] = (per_seed_avg.std(dim=0, unbiased=False).float().cpu().numpy() * scale).astype(np.float32)

    final = decode_outputs(config, out[0].cpu().numpy())
    provenance = {
        **bundle.provenance(),
        "seed": seeds[0],
        "seeds": seeds,
        "sampler": sampler_name(config, scheduler),
        "steps": len(scheduler.timesteps),
        "network_passes": passes,
        "uncertainty": mode,
        "window": [float(window[0]), float(window[1])],
        "window_steps": int(sum(in_window)),
        "window_timesteps": [int(t) for t, m in zip(scheduler.timesteps, in_window) if m],
        "map_units": "output units (stain: the checkpoint's stain intensity scale; boundary/foreground: probability); "
                     "population std; no per-batch rescaling",
        **run.provenance(np.shape(image), input_name),
    }
    labels = {}
    if make_labels:  # the same labels as predict_stain's: route and thresholds as given, else the bundle's
        route = label_route(config, labels_from)
        used = label_thresholds(config, **(thresholds or {}))
        provenance.update(used, labels_from=route)
        labels = labels_from_channels(config, final, route, **used)
    stain = StainResult(final, config.output_names, [s.kind for s in config.output_channels], labels, dict(provenance))
    return UncertaintyResult(stain, maps, provenance)


# -- flags ---------------------------------------------------------------------------------------------------------


@dataclass
class FlagResult:
    """Flagged regions of one std map: instance labels (Y, X), one table row per region, the threshold used."""

    labels: np.ndarray
    table: list[dict]
    threshold: float
    settings: dict = field(default_factory=dict)


def flag_regions(
    std_map: np.ndarray,
    threshold: float | None = None,
    *,
    otsu: bool = False,
    median_size: int = 3,
    min_area: int = 16,
    fill_holes: bool = True,
    merge_radius: int = 0,
    max_regions: int | None = None,
    group: bool = False,
    max_box_fraction: float | None = None,
) -> FlagResult:
    """Threshold a std map into reviewable regions: median filter -> threshold (Otsu of the map when none is given;
    with ``otsu``, Otsu again among the values above ``threshold``) -> join fragments closer than ``merge_radius``
    px (binary closing) -> fill holes -> drop regions under ``min_area`` -> at most ``max_regions`` regions, so a
    person gets a reviewable list (``REVIEW_DEFAULTS`` is what the CLI and the widget use):
    ``group`` joins neighbouring regions into ``max_regions`` spatially compact groups (one label each: a field of
    view to review); otherwise the regions with the most excess uncertainty (sum over the region of map - threshold)
    are kept and the rest dropped. ``max_box_fraction``: when the groups' bounding boxes (what the review panel zooms
    to) cover more of the image than this, the groups with the least excess uncertainty per boxed pixel are dropped
    until they do not — a reviewer's budget; ``regions_dropped`` counts what was left out. Groups and regions are
    numbered most uncertain first.

    Pure numpy/scikit-image on the cached map: moving the threshold never runs the model.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.measure import label

    m = np.asarray(std_map)
    if m.ndim != 2:
        raise VirtualStainError(f"flags are made from one 2D std map; got an array of shape {m.shape}")
    if not np.issubdtype(m.dtype, np.number) or not np.all(np.isfinite(m)):
        raise VirtualStainError("the std map has NaN/inf or non-numeric values; recompute it")
    if median_size < 0 or min_area < 0:
        raise VirtualStainError("median size and minimum area must be 0 or more")
    m = m.astype(np.float32)
    smooth = ndi.median_filter(m, size=median_size) if median_size > 1 else m
    lo, hi = float(smooth.min()), float(smooth.max())
    if threshold is None:
        used = float(threshold_otsu(smooth)) if hi > lo else hi
    else:
        used = float(threshold)
        if not np.isfinite(used) or not lo <= used < hi:
            raise VirtualStainError(
                f"threshold {used:g} is outside the map's range [{lo:.4g}, {hi:.4g}) (after the median filter): "
                "nothing or everything would be flagged"
            )
        if otsu:
            above = smooth[smooth > used]
            if above.size > 1 and above.max() > above.min():
                used = float(threshold_otsu(above))
    mask = smooth > used
    if merge_radius > 0:
        yy, xx = np.mgrid[-merge_radius : merge_radius + 1, -merge_radius : merge_radius + 1]
        disk = yy**2 + xx**2 <= merge_radius**2
        padded = np.pad(mask, merge_radius)
        mask = ndi.binary_closing(padded, structure=disk)[merge_radius:-merge_radius, merge_radius:-merge_radius]
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    lab = label(mask, connectivity=2).astype(np.int32)
    if min_area > 1 and lab.max():
        areas = np.bincount(lab.ravel())
        small = areas < min_area
        small[0] = False
        lab[small[lab]] = 0
        lab = label(lab > 0, connectivity=2).astype(np.int32)
    dropped = 0
    fragments = int(lab.max())
    fragment_labels = lab
    if max_regions is not None and lab.max() > max_regions:
        excess = ndi.sum(np.clip(smooth - used, 0, None), lab, index=np.arange(1, lab.max() + 1))
        if group:
            lab = group_regions(lab, max_regions, excess)
        else:
            keep = np.zeros(lab.max() + 1, bool)
            keep[1:][np.argsort(-excess, kind="stable")[:max_regions]] = True
            dropped = int(lab.max() - max_regions)
            lab = label(keep[lab], connectivity=2).astype(np.int32)
    if max_box_fraction is not None and lab.max():
        lab, n_out = _within_box_budget(lab, fragment_labels, np.clip(smooth - used, 0, None), float(max_box_fraction))
        dropped += n_out
    table = flag_table(lab, m)
    settings = {"threshold": used, "otsu": bool(otsu or threshold is None), "median_size": int(median_size),
                "min_area": int(min_area), "fill_holes": bool(fill_holes), "merge_radius": int(merge_radius),
                "max_regions": max_regions, "group": bool(group), "max_box_fraction": max_box_fraction,
                "fragments": fragments, "regions_dropped": dropped}
    return FlagResult(lab, table, used, settings)


def _bounding_boxes(lab: np.ndarray, n: int | None = None) -> np.ndarray:
    """(N, 4) int64 (y0, x0, y1, x1) of labels 1..N (``n``: N, default the largest label; absent labels: zeros)."""
    from scipy import ndimage as ndi

    found = ndi.find_objects(lab, n or 0)
    return np.array([(b[0].start, b[1].start, b[0].stop, b[1].stop) if b else (0, 0, 0, 0) for b in found],
                    np.int64).reshape(-1, 4)


def group_regions(lab: np.ndarray, n_groups: int, weight: np.ndarray) -> np.ndarray:
    """Join the regions of ``lab`` (1..N) into at most ``n_groups`` groups whose bounding boxes — the fields of view
    the review panel zooms to — cover as little of the image as greedy merging finds: the pair of groups whose joint
    box adds the least area over their own two boxes is joined first (neighbours, and boxes inside boxes, go
    together; a far outlier stays its own small group rather than stretching a neighbour's box across the frame).
    Groups are numbered by total ``weight``. Above ``PREGROUP`` regions, complete-linkage clustering of the centroids
    first makes ``PREGROUP`` compact groups (the pairwise table grows with the square of the count)."""
    from scipy import ndimage as ndi
    from scipy.cluster.hierarchy import fcluster, linkage

    n = int(lab.max())
    member = np.arange(n + 1)  # region -> group (0: background)
    if n > PREGROUP:
        centroids = np.asarray(ndi.center_of_mass(lab > 0, lab, index=np.arange(1, n + 1)), dtype=np.float64)
        clusters = fcluster(linkage(centroids, method="complete"), t=PREGROUP, criterion="maxclust")
        member[1:] = np.unique(clusters, return_inverse=True)[1] + 1  # 1..k without gaps
    grouped = member[lab]
    boxes = _bounding_boxes(grouped).astype(np.float64)
    alive = np.ones(len(boxes), bool)
    owner = np.arange(len(boxes))  # group -> the group it was merged into

    def joint(i: int) -> np.ndarray:
        """Area each other group's box would add if joined with group ``i`` (inf for merged ones and itself)."""
        y0, x0 = np.minimum(boxes[i, 0], boxes[:, 0]), np.minimum(boxes[i, 1], boxes[:, 1])
        y1, x1 = np.maximum(boxes[i, 2], boxes[:, 2]), np.maximum(boxes[i, 3], boxes[:, 3])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out = (y1 - y0) * (x1 - x0) - area[i] - area
        out[~alive] = np.inf
        out[i] = np.inf
        return out

    cost = np.stack([joint(i) for i in range(len(boxes))])
    while alive.sum() > n_groups:
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        boxes[i, :2] = np.minimum(boxes[i, :2], boxes[j, :2])
        boxes[i, 2:] = np.maximum(boxes[i, 2:], boxes[j, 2:])
        alive[j] = False
        owner[owner == j] = i
        cost[j, :] = cost[:, j] = np.inf
        cost[i, :] = cost[:, i] = joint(i)
    cluster = np.zeros(n + 1, np.int64)
    cluster[1:] = owner[member[1:] - 1] + 1  # region -> final group id (1-based, sparse)
    totals = np.bincount(cluster[1:], weights=np.asarray(weight, np.float64), minlength=len(boxes) + 1)
    used = np.unique(cluster[1:])
    order = used[np.argsort(-totals[used], kind="stable")]  # most uncertain first
    rank = np.zeros(len(boxes) + 1, np.int32)
    rank[order] = np.arange(1, order.size + 1)
    return rank[cluster][lab].astype(np.int32)


def _within_box_budget(groups: np.ndarray, fragments: np.ndarray, excess: np.ndarray,
                       budget: float) -> tuple[np.ndarray, int]:
    """Drop flagged fragments until the groups' bounding boxes cover at most ``budget`` of the image: each time the
    fragment that shrinks its group's box the most per unit of its excess uncertainty (an outlier with little
    evidence, stretching a box), or when no single fragment shrinks a box, the group with the least excess per boxed
    pixel. Returns (group labels renumbered 1..k in their order, fragments dropped)."""
    from scipy import ndimage as ndi

    n = int(fragments.max())
    ids = np.arange(1, n + 1)
    frag_box = _bounding_boxes(fragments, n)
    group_of = ndi.maximum(groups, fragments, index=ids).astype(np.int64)
    weight = np.asarray(ndi.sum(excess, fragments, index=ids), np.float64) + 1e-9
    alive = group_of > 0  # fragments the max_regions cap already dropped have no group
    fine = n <= PREGROUP  # fragment by fragment for a frame's worth; whole groups for a big field's thousands

    def box(members: np.ndarray) -> tuple[int, int, int, int]:
        b = frag_box[members]
        return b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()

    def boxed() -> float:
        inside = np.zeros(groups.shape, bool)
        for g in np.unique(group_of[alive]):
            y0, x0, y1, x1 = box(np.nonzero(alive & (group_of == g))[0])
            inside[y0:y1, x0:x1] = True
        return inside.mean()

    while alive.sum() > 1 and boxed() > budget:
        best, best_score = None, 0.0
        for g in np.unique(group_of[alive]) if fine else ():
            members = np.nonzero(alive & (group_of == g))[0]
            if len(members) < 2:
                continue
            y0, x0, y1, x1 = box(members)
            for f in members:
                rest = members[members != f]
                ry0, rx0, ry1, rx1 = box(rest)
                saved = (y1 - y0) * (x1 - x0) - (ry1 - ry0) * (rx1 - rx0)
                if saved / weight[f] > best_score:
                    best, best_score = [f], saved / weight[f]
        if best is None:  # no fragment stretches a box: drop the weakest group per boxed pixel
            def density(g):
                m = np.nonzero(alive & (group_of == g))[0]
                y0, x0, y1, x1 = box(m)
                return weight[m].sum() / max((y1 - y0) * (x1 - x0), 1)
            g = min(np.unique(group_of[alive]), key=density)
            best = list(np.nonzero(alive & (group_of == g))[0])
        alive[best] = False
    keep = np.zeros(n + 1, bool)
    keep[1:] = alive
    kept = np.where(keep[fragments], groups, 0)
    used = np.unique(kept[kept > 0])
    lut = np.zeros(int(groups.max()) + 1, np.int32)
    lut[used] = np.arange(1, used.size + 1)
    return lut[kept], int((group_of > 0).sum() - alive.sum())  # only what the budget dropped


PREGROUP = 400  # regions above which group_regions clusters centroids before merging boxes

#: the reviewable defaults of the CLI and the widget: fragments within 3 px joined, neighbouring regions grouped into
#: at most 20 fields of view per map, whose boxes cover at most half the image (beyond that the weakest outlying
#: fragments are dropped); measured on held-out frames in docs/benchmarks.md
REVIEW_DEFAULTS = {"merge_radius": 3, "max_regions": 20, "group": True, "max_box_fraction": 0.5}

FLAG_COLUMNS = ("id", "area", "centroid_y", "centroid_x", "mean_std", "max_std")


def flag_table(labels: np.ndarray, std_map: np.ndarray) -> list[dict]:
    """One row per region of a flags label image (also a hand-edited one): id, area, centroid, mean/max std."""
    from skimage.measure import regionprops

    m = np.asarray(std_map)
    rows = []
    for r in regionprops(np.asarray(labels, dtype=np.int32)):
        vals = m[tuple(r.coords.T)]
        rows.append({
            "id": int(r.label), "area": int(r.area),
            "centroid_y": round(float(r.centroid[0]), 2), "centroid_x": round(float(r.centroid[1]), 2),
            "mean_std": float(vals.mean()), "max_std": float(vals.max()),
        })
    return rows


def write_flag_table(path: str | Path, table: list[dict], extra: dict | None = None,
                     extra_columns: Sequence[str] = ()) -> Path:
    """One CSV row per flagged region. ``extra`` values (e.g. the channel) are prepended to every row; rows may also
    carry their own ``extra_columns`` (e.g. channel and plane when several maps share one table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    columns = [*extra, *(c for c in extra_columns if c not in extra), *FLAG_COLUMNS]
    from .io import atomic_write

    with atomic_write(path) as part, open(part, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in table:
            w.writerow({**row, **extra})
    return path
