"""Trust per nucleus and per pixel: an ensemble of predictions, a confidence for every predicted nucleus, calibrated
intervals for every stain pixel, and the scores that say whether either can be believed.

**Ensemble.** Member j predicts the image flipped/turned by the j-th of the 8 dihedral transforms (and, for a
diffusion bundle, with seed ``seed + j``) and is turned back; member 0 is the prediction itself. A one-pass network
therefore has an ensemble too: where it has learned the biology its answer does not depend on the image's
orientation, where it guesses it does.

**Per-nucleus confidence** of each nucleus of the prediction: the mean over the other members of the best IoU
between it and a nucleus of that member (``agreement``; 1 = every member drew the same outline, 0 = none found it),
beside the fraction of members that hold a match at IoU >= 0.5 (``found_by``) and the mean ensemble std of the stain
inside it. ``confidence`` is ``agreement``: chosen on the validation strip by its AUROC for "this nucleus matches a
true nucleus at IoU >= 0.5" (``benchmarks/eval_confidence.py`` reports all three).

**Calibrated intervals** (split conformal, Angelopoulos & Bates 2022, section 2.3 on image regression): on calibration
pixels with ground truth, the score s = |y − ŷ| / (σ + σ0) (σ the ensemble std, σ0 = 1 % of the stain's scale keeps
flat regions from claiming certainty); q̂ is the ⌈(n + 1)(1 − α)⌉ / n quantile of s, and ŷ ± q̂ (σ + σ0) holds the
truth for a fraction ≥ 1 − α of new pixels *exchangeable with the calibration pixels* — new images of the same kind,
microscope and settings. One q̂ for all pixels covers mostly background, where the stain is easy; so q̂ is computed
per group (Mondrian conformal, Vovk et al. 2005): pixels the model predicts inside a nucleus (its first foreground
channel > 0.5) and the others — each group then gets its level, as far as the prediction finds the nuclei. It says nothing about another cell type or objective; docs/uncertainty.md shows where it
breaks. q̂ per stain and level is stored in the bundle folder as ``calibration.json`` (the id is the weights' hash and
does not change).

**Per-nucleus intervals.** A biologist reads a nucleus's mean intensity, not a pixel's. The same split-conformal
step on objects: for every predicted nucleus of the calibration images, s = |ȳ − ŷ̄| / (σ̄ + σ0) with ȳ the real
stain's mean inside the predicted outline (what the real stain would have measured for that object), ŷ̄ the
prediction's and σ̄ the mean ensemble std inside it; q̂ per labels set and level (``calibration.json`` ``objects``),
and every row of the nucleus table gets ``<stain>_low_90`` / ``<stain>_high_90`` = ŷ̄ ∓ q̂ (σ̄ + σ0). Exchangeable
objects again: nuclei of new images of the same kind, segmented the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle
from .errors import VirtualStainError
from .metrics import label_overlap
from .tasks.stain import StainResult, labels_from_channels, predict_stain

CALIBRATION_FILE = "calibration.json"
SIGMA_FLOOR = 0.01  # sigma_0 as a fraction of the stain's fixed scale (hi - lo)
TRANSFORMS = [(k, f) for f in (False, True) for k in range(4)]
DEFAULT_MEMBERS = 4


@dataclass
class Ensemble:
    """The prediction (member 0) and the other members' outputs (C, Y, X), with their mean and std."""

    prediction: StainResult
    members: list[np.ndarray]
    route: str | None = None
    member_labels: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def std(self) -> np.ndarray:
        return np.std(np.stack(self.members), axis=0)


def _turn(a: np.ndarray, k: int, flip: bool, inverse: bool = False) -> np.ndarray:
    """The same dihedral transform as test-time augmentation, on numpy arrays of any dtype (a view, then a copy)."""
    if inverse:
        a = np.rot90(a, -k, axes=(-2, -1))
        return np.ascontiguousarray(a[..., ::-1] if flip else a)
    a = a[..., ::-1] if flip else a
    return np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1)))


def predict_ensemble(bundle: Bundle, image: np.ndarray, members: int = DEFAULT_MEMBERS, *, seed: int = 0,
                     labels_from: str | None = None, thresholds: dict | None = None, **predict_options) -> Ensemble:
    """``members`` predictions (module doc) of one plane ((Y, X), or (C, Y, X) with ``channel_axis=0``); member 0 is
    ``predict_stain``'s own. Labels (``make_labels``, default on) are made with the same route and ``thresholds``
    for every member."""
    if not 2 <= members <= len(TRANSFORMS):
        raise VirtualStainError(f"an ensemble takes 2 to {len(TRANSFORMS)} members, not {members}")
    image = np.asarray(image)
    if image.ndim != 2 and predict_options.get("channel_axis") not in (0,):
        raise VirtualStainError("per-nucleus confidence and intervals take one plane: (Y, X), or channels first")
    make_labels = predict_options.pop("make_labels", True)
    thresholds = thresholds or {}
    diffusion = bundle.config.objective != "regression"
    first = predict_stain(bundle, image, seed=seed, labels_from=labels_from, make_labels=False, **predict_options)
    outs = [first.image]
    for j in range(1, members):
        k, flip = TRANSFORMS[j]
        res = predict_stain(bundle, _turn(image, k, flip), seed=seed + j if diffusion else seed, make_labels=False,
                            **predict_options)
        outs.append(_turn(res.image, k, flip, inverse=True))
    first.provenance["ensemble_members"] = members
    if not make_labels:
        return Ensemble(first, outs)
    from .tasks.stain import label_route

    route = label_route(bundle.config, labels_from)
    first.labels = labels_from_channels(bundle.config, first.image, route, **thresholds)
    first.provenance["labels_from"] = route
    labs = [labels_from_channels(bundle.config, o, route, **thresholds) for o in outs[1:]]
    return Ensemble(first, outs, route, labs)


def nucleus_table(ens: Ensemble, labels_name: str, stain: str | None,
                  interval: tuple[float, float, float] | None = None) -> list[dict]:
    """One row per nucleus of the prediction's ``labels_name`` set: id, centroid, area, mean stain, confidence;
    ``interval`` = (level, q̂, σ0) adds the calibrated low/high of each nucleus's mean stain (module doc)."""
    from scipy import ndimage as ndi

    pred = ens.prediction
    lab = pred.labels[labels_name]
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return []
    agree = np.zeros((len(ids), len(ens.member_labels)))
    for j, other in enumerate(ens.member_labels):
        ov = label_overlap(lab, other[labels_name])
        best = np.zeros(len(ov.true_ids))
        np.maximum.at(best, ov.pair_true, ov.pair_iou)
        agree[:, j] = best[np.searchsorted(ov.true_ids, ids)]
    centroids = ndi.center_of_mass(np.ones_like(lab), lab, ids)
    areas = ndi.sum(np.ones_like(lab), lab, ids)
    rows = []
    s_img = pred.channel(stain) if stain else None
    s_std = ens.std[pred.channel_names.index(stain)] if stain else None
    means = ndi.mean(s_img, lab, ids) if stain else [None] * len(ids)
    stds = ndi.mean(s_std, lab, ids) if stain else [None] * len(ids)
    for i, nid in enumerate(ids):
        a = agree[i]
        rows.append({"label": int(nid), "centroid_y": round(float(centroids[i][0]), 2),
                     "centroid_x": round(float(centroids[i][1]), 2), "area_px": int(areas[i]),
                     f"mean_{stain}": None if means[i] is None else round(float(means[i]), 4),
                     f"std_{stain}": None if stds[i] is None else round(float(stds[i]), 4),
                     "agreement": round(float(a.mean()), 4), "found_by": round(float((a >= 0.5).mean()), 4),
                     "confidence": round(float(a.mean()), 4)})
        if interval is not None and stain:
            level, q, sigma0 = interval
            half = q * (float(stds[i]) + sigma0)
            rows[-1][f"{stain}_low_{100 * level:g}"] = round(float(means[i]) - half, 4)
            rows[-1][f"{stain}_high_{100 * level:g}"] = round(float(means[i]) + half, 4)
    return rows


def object_stain(bundle: Bundle, labels_name: str) -> str | None:
    """The stain a labels set's objects are measured on: the one it is segmented from, else the first stain."""
    c = bundle.config
    stains = [o.name for o in c.output_channels if o.kind == "stain"]
    return c.labels_from_stain.get(labels_name) or (stains[0] if stains else None)


def object_tables(bundle: Bundle, ens: Ensemble, level: float | None = None) -> dict[str, list[dict]]:
    """``nucleus_table`` for every labels set of the prediction, each measured on :func:`object_stain`; with
    ``level``, the rows of every set the calibration has objects for also carry their interval
    (:func:`object_interval_note` says which do not)."""
    tables = {}
    for name in ens.prediction.labels:
        stain = object_stain(bundle, name)
        q = object_quantile(bundle, name, level, len(ens.members)) if level is not None and stain else None
        tables[name] = nucleus_table(ens, name, stain, None if q is None else (level, q, _sigma0(bundle, stain)))
    return tables


def add_interval_channels(bundle: Bundle, ens: Ensemble, level: float) -> StainResult:
    """The prediction with its calibrated low/high planes appended (kind ``interval``), as predict and the widget
    write them; returns the same (changed) StainResult."""
    planes, names = interval_channels(bundle, ens, level)
    res = ens.prediction
    res.image = np.concatenate([res.image, planes.astype(res.image.dtype)])
    res.channel_names = res.channel_names + names
    res.channel_kinds = res.channel_kinds + ["interval"] * len(names)
    res.provenance["interval"] = level
    return res


def write_table(path: str | Path, rows: list[dict], provenance: dict) -> Path:
    """The nucleus table as CSV (atomically), with the run's provenance in a ``# `` header line."""
    import csv

    from .io import atomic_write

    path = Path(path)
    with atomic_write(path) as part:
        with open(part, "w", newline="") as fh:
            fh.write("# " + json.dumps({k: provenance.get(k) for k in ("bundle_name", "bundle_id", "seed", "input",
                                                                        "labels", "labels_from", "members")})
                     + "\n")
            keys = list(rows[0]) if rows else ["label", "confidence"]
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return path


# -- calibration -----------------------------------------------------------------------------------------------------
def _sigma0(bundle: Bundle, stain: str) -> float:
    spec = next(c for c in bundle.config.output_channels if c.name == stain)
    norm = spec.normalization
    return SIGMA_FLOOR * float(getattr(norm, "vmax", 1.0) - getattr(norm, "vmin", 0.0))


def conformity_scores(bundle: Bundle, ens: Ensemble, stain: str, truth: np.ndarray) -> np.ndarray:
    """s = |y − ŷ| / (σ + σ0) per pixel of ``stain`` (module doc): what q̂ is the quantile of."""
    c = ens.prediction.channel_names.index(stain)
    err = np.abs(np.asarray(truth, np.float64) - ens.prediction.image[c])
    return err / (ens.std[c] + _sigma0(bundle, stain))


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ⌈(n + 1) level⌉ / n empirical quantile (finite-sample valid split conformal)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = len(s)
    if n == 0:
        raise VirtualStainError("no calibration pixels")
    r = min(n, math.ceil((n + 1) * level))
    return float(s[r - 1])


GROUPS = ("background", "foreground")


def pixel_groups(bundle: Bundle, result: StainResult) -> np.ndarray:
    """0/1 per pixel: outside / inside the predicted foreground of the first labels set (all 0 without one)."""
    fg = [c.name for c in bundle.config.output_channels if c.kind == "foreground"]
    if not fg:
        return np.zeros(result.image.shape[-2:], np.int8)
    return (result.channel(fg[0]) > 0.5).astype(np.int8)


def object_scores(bundle: Bundle, ens: Ensemble, labels: np.ndarray, stain: str, truth: np.ndarray) -> np.ndarray:
    """s = |ȳ − ŷ̄| / (σ̄ + σ0) per object of ``labels`` (module doc: per-nucleus intervals)."""
    from scipy import ndimage as ndi

    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        return np.zeros(0)
    c = ens.prediction.channel_names.index(stain)
    y = ndi.mean(np.asarray(truth, np.float64), labels, ids)
    p = ndi.mean(ens.prediction.image[c].astype(np.float64), labels, ids)
    sd = ndi.mean(ens.std[c].astype(np.float64), labels, ids)
    return np.abs(np.asarray(y) - np.asarray(p)) / (np.asarray(sd) + _sigma0(bundle, stain))


def calibrate(bundle: Bundle, pairs, levels=(0.8, 0.9, 0.95), members: int = DEFAULT_MEMBERS, seed: int = 0,
              **predict_options) -> dict:
    """q̂ per stain, pixel group and level from (image, {stain: truth}) pairs, and per labels set for its objects'
    mean stain (where the bundle makes labels); returns the calibration record (not yet saved)."""
    from .tasks.stain import label_route

    c = bundle.config
    stains = [o.name for o in c.output_channels if o.kind == "stain"]
    if not stains:
        raise VirtualStainError(f"checkpoint {c.name!r} predicts no stain: nothing to calibrate")
    scores: dict[str, list[list[np.ndarray]]] = {s: [] for s in stains}
    objects: dict[str, list[np.ndarray]] = {}
    n_images = 0
    for image, truths in pairs:
        ens = predict_ensemble(bundle, image, members, seed=seed, make_labels=False, **predict_options)
        groups = pixel_groups(bundle, ens.prediction)
        n_images += 1
        for s in stains:
            if s not in truths:
                continue
            score = conformity_scores(bundle, ens, s, truths[s])
            scores[s].append([score[groups == g] for g in range(len(GROUPS))])
        if c.label_routes():  # the same labels predict writes, at the bundle's validated route and thresholds
            labels = labels_from_channels(c, ens.prediction.image, label_route(c, None))
            for name, lab in labels.items():
                stain = object_stain(bundle, name)
                objects.setdefault(name, [])
                if stain in truths:
                    objects[name].append(object_scores(bundle, ens, lab, stain, truths[stain]))
    out = {"bundle_id": bundle.id, "members": members, "sigma_floor": SIGMA_FLOOR, "images": n_images,
           "groups": list(GROUPS), "stains": {}}
    for s, parts in scores.items():
        if not parts:
            continue
        entry = {"pixels": {}, "q": {}}
        for g, gname in enumerate(GROUPS):
            vals = np.concatenate([p[g] for p in parts])
            if vals.size == 0:  # no pixel of this group: the other group's scale serves it
                vals = np.concatenate([p[1 - g] for p in parts])
            entry["pixels"][gname] = int(sum(p[g].size for p in parts))
            entry["q"][gname] = {f"{lv:g}": conformal_quantile(vals, lv) for lv in levels}
        out["stains"][s] = entry
    if not out["stains"]:
        raise VirtualStainError(f"no ground truth for {', '.join(stains)} in the calibration images")
    if objects:  # every labels set gets an entry; one whose images held no predicted object has no q
        out["objects"] = {}
        for name, parts in objects.items():
            vals = np.concatenate(parts) if parts else np.zeros(0)
            out["objects"][name] = {"stain": object_stain(bundle, name), "objects": int(vals.size),
                                    "q": {f"{lv:g}": conformal_quantile(vals, lv) for lv in levels} if vals.size
                                    else {}}
    return out


def save_calibration(bundle: Bundle, record: dict) -> Path:
    from .io import atomic_write

    path = Path(bundle.path) / CALIBRATION_FILE
    with atomic_write(path) as part:
        Path(part).write_text(json.dumps(record, indent=1) + "\n")
    return path


def load_calibration(bundle: Bundle) -> dict | None:
    path = Path(bundle.path) / CALIBRATION_FILE if bundle.path else None
    if path is None or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        ok = isinstance(rec, dict) and rec.get("groups") == list(GROUPS) and all(
            set(e["q"]) == set(GROUPS) for e in rec["stains"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise VirtualStainError(f"{path} is not a calibration this version reads; run 'virtualstain calibrate "
                                f"{bundle.path} DATA' again")
    if rec.get("bundle_id") != bundle.id:
        raise VirtualStainError(f"{path} was calibrated for another version of these weights; run 'virtualstain "
                                f"calibrate {bundle.path} DATA' again")
    return rec


def calibration_for(bundle: Bundle, members: int) -> dict:
    """The bundle's calibration record, made with ``members`` ensemble members (one clear error otherwise)."""
    rec = load_calibration(bundle)
    if rec is None:
        raise VirtualStainError(f"checkpoint {bundle.config.name!r} is not calibrated; run 'virtualstain calibrate "
                                f"{bundle.path} DATA' on images with ground truth first")
    if rec["members"] != members:
        raise VirtualStainError(f"the calibration used {rec['members']} ensemble members, this run {members};"
                                f" use --members {rec['members']}")
    return rec


def object_quantile(bundle: Bundle, labels_name: str, level: float, members: int) -> float | None:
    """q̂ of a labels set's per-object score at ``level`` from the bundle's calibration; None where it has none
    for that set (:func:`object_interval_note`); one clear error for an uncalibrated bundle, another number of
    ensemble ``members`` or a level not calibrated."""
    entry = calibration_for(bundle, members).get("objects", {}).get(labels_name)
    if not entry or not entry["objects"]:
        return None
    key = f"{level:g}"
    if key not in entry["q"]:
        raise VirtualStainError(f"no calibration at level {key} (calibrated: {', '.join(entry['q'])}); pick one of "
                                "those or recalibrate with --levels")
    return float(entry["q"][key])


def object_interval_note(bundle: Bundle) -> str | None:
    """Why some nucleus tables will carry no interval (said before the run, as a warning), else None."""
    sets = sorted({c.labels for c in bundle.config.output_channels if c.kind == "boundary" and c.labels})
    rec = load_calibration(bundle)
    if rec is None or not sets:
        return None
    entries = rec.get("objects", {})
    if "objects" not in rec:
        return (f"the calibration of {bundle.config.name!r} predates per-nucleus intervals: the tables get none; run "
                f"'virtualstain calibrate {bundle.path} DATA' again to add them")
    empty = [n for n in sets if not entries.get(n, {}).get("objects")]
    if empty:
        return (f"the calibration images held no predicted {', '.join(map(repr, empty))} with a real stain to compare:"
                " their tables get no interval (recalibrate on images with them)")
    return None


def interval_channels(bundle: Bundle, ens: Ensemble, level: float) -> tuple[np.ndarray, list[str]]:
    """(2·S, Y, X) low/high planes per stain at ``level``, and their names ('Hoechst low 90%', 'Hoechst high 90%')."""
    rec = calibration_for(bundle, len(ens.members))
    key = f"{level:g}"
    planes, names = [], []
    std = ens.std
    groups = pixel_groups(bundle, ens.prediction)
    for s, entry in rec["stains"].items():
        known = entry["q"][GROUPS[0]]
        if key not in known:
            raise VirtualStainError(f"no calibration at level {key} (calibrated: {', '.join(known)}); pick one "
                                    "of those or recalibrate with --levels")
        c = ens.prediction.channel_names.index(s)
        q = np.where(groups == 1, entry["q"][GROUPS[1]][key], entry["q"][GROUPS[0]][key])
        half = q * (std[c] + _sigma0(bundle, s))
        planes += [ens.prediction.image[c] - half, ens.prediction.image[c] + half]
        names += [f"{s} low {100 * level:g}%", f"{s} high {100 * level:g}%"]
    return np.stack(planes).astype(np.float32), names


def crps_ensemble(members: np.ndarray, truth: np.ndarray) -> float:
    """Mean CRPS of an ensemble (M, ...) against truth (...): E|X − y| − ½ E|X − X'| (Gneiting & Raftery 2007)."""
    m = np.asarray(members, np.float64)
    y = np.asarray(truth, np.float64)
    term1 = np.abs(m - y[None]).mean(axis=0)
    srt = np.sort(m, axis=0)  # E|X − X'| from sorted members: 2/M² Σ (2i − M − 1) x_(i)
    M = m.shape[0]
    w = (2 * np.arange(1, M + 1) - M - 1).reshape((-1,) + (1,) * (m.ndim - 1))
    term2 = 2 * (w * srt).sum(axis=0) / M**2
    return float((term1 - 0.5 * term2).mean())
