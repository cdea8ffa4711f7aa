"""Training data: paired input/target images (+ instance labels) from a folder or a small YAML/JSON config.

Config (paths relative to the config file)::

    name: my-stain
    inputs: [brightfield]              # input channel names, in order
    stains: [Hoechst]                  # stain target channels
    labels: [nuclei, {name: cells, seeds: nuclei}]   # instance labels -> "<name> boundary" + "<name> foreground";
                                       # cells are split by watershed from the predicted nuclei
    pixel_size_um: 0.619
    val_fraction: 0.15                 # if no image has split: val, hold out the right-hand strip of every image
    images:
      - input: {path: scratch.tiff, index: [1, 0]}     # one source, or a list of sources (one per input channel)
        stains: {Hoechst: {path: scratch.tiff, index: [0, 0]}}
        labels: {nuclei: {path: scratch.tiff, index: [2, 0]}}
        split: train                   # or val
        region: [0, 512, 0, 512]       # optional: only this rectangle [y0, y1, x0, x1] of the sources

A *source* is a path, or ``{path, index}`` where ``index`` picks leading axes (e.g. C then T of a CTYX file) so
the result is 2D. Folder layout: ``DIR/input/NAME``, ``DIR/target/NAME`` (2D or channels-first CYX), optional
``DIR/labels/LABELNAME/NAME``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import VirtualStainError
from ..core.io import list_images, read_image, read_image_file
from ..core.normalize import as_float
from ..core.postprocess import as_labels


@dataclass
class TrainingImage:
    """One registered field of view: raw inputs (C_in, Y, X), raw stains (C_s, Y, X), labels {name: (Y, X)}."""

    name: str
    inputs: np.ndarray
    stains: np.ndarray
    labels: dict[str, np.ndarray]
    split: str = "train"


@dataclass
class TrainingSpec:
    name: str
    input_names: list[str]
    stain_names: list[str]
    label_names: list[str]
    images: list[TrainingImage]
    pixel_size_um: float | None = None
    val_fraction: float = 0.15
    description: str = ""
    source: str = ""  # what the data was, for the bundle's provenance
    label_seeds: dict[str, str] = field(default_factory=dict)  # labels set -> labels set that seeds it
    extra: dict = field(default_factory=dict)


def _read_source(src, base: Path, what: str) -> np.ndarray:
    if isinstance(src, str):
        src = {"path": src}
    if not isinstance(src, dict) or "path" not in src:
        raise VirtualStainError(f"{what}: a source is a path or {{path: ..., index: [...]}}, got {src!r}")
    path = Path(src["path"])
    path = path if path.is_absolute() else base / path
    arr = read_image(path)
    index = src.get("index")
    if index is not None:
        try:
            arr = arr[tuple(int(i) for i in index)]
        except (IndexError, TypeError, ValueError) as exc:
            raise VirtualStainError(f"{what}: index {index} does not fit {path.name} of shape {arr.shape}: {exc}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and src.get("rgb_to_gray", False):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim != 2:
        raise VirtualStainError(
            f"{what}: {path.name} gives shape {arr.shape}; each source must be 2D — add an 'index' that picks "
            "the channel/plane (e.g. index: [1, 0] for channel 1, time 0 of a CTYX file)"
        )
    return arr


def load_config(path: str | Path) -> TrainingSpec:
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text)
    else:
        raw = json.loads(text)
    if not isinstance(raw, dict):
        raise VirtualStainError(f"{path}: the training config must be a mapping")
    for key in ("inputs", "images"):
        if key not in raw:
            raise VirtualStainError(f"{path}: the training config is missing {key!r}")
    base = path.parent
    input_names = list(raw["inputs"])
    stain_names = list(raw.get("stains", []))
    label_names, label_seeds = _label_entries(raw.get("labels", []), path)
    if not stain_names and not label_names:
        raise VirtualStainError(f"{path}: name at least one target in 'stains' or 'labels'")
    images = []
    for i, entry in enumerate(raw["images"]):
        where = f"{path.name} images[{i}]"
        srcs = entry.get("input")
        srcs = srcs if isinstance(srcs, list) else [srcs]
        if len(srcs) != len(input_names):
            raise VirtualStainError(f"{where}: {len(srcs)} input source(s) for {len(input_names)} input channel(s)")
        inputs = np.stack([as_float(_read_source(s, base, where), where) for s in srcs])
        stains = [as_float(_read_source(entry.get("stains", {})[n], base, f"{where} stain {n!r}"), where)
                  for n in stain_names if _has(entry, "stains", n, where)]
        labels = {n: np.asarray(_read_source(entry.get("labels", {})[n], base, f"{where} labels {n!r}"))
                  for n in label_names if _has(entry, "labels", n, where)}
        stains_arr = np.stack(stains) if stains else np.zeros((0, *inputs.shape[1:]), np.float32)
        img = _checked(TrainingImage(entry.get("name", f"image{i}"), inputs, stains_arr, labels,
                                     entry.get("split", "train")), where)
        images.append(_crop_region(img, entry.get("region"), where))
    return TrainingSpec(
        name=raw.get("name", path.stem), input_names=input_names, stain_names=stain_names, label_names=label_names,
        images=images, pixel_size_um=raw.get("pixel_size_um"), val_fraction=float(raw.get("val_fraction", 0.15)),
        description=raw.get("description", ""), source=raw.get("source", str(path)), label_seeds=label_seeds,
    )


def _label_entries(entries, path: Path) -> tuple[list[str], dict[str, str]]:
    names, seeds = [], {}
    for e in entries:
        if isinstance(e, str):
            names.append(e)
        elif isinstance(e, dict) and isinstance(e.get("name"), str):
            names.append(e["name"])
            if e.get("seeds") is not None:
                seeds[e["name"]] = str(e["seeds"])
        else:
            raise VirtualStainError(f"{path}: each 'labels' entry is a name or {{name: ..., seeds: ...}}, got {e!r}")
    for name, seed in seeds.items():
        if seed not in names or seed == name:
            raise VirtualStainError(f"{path}: labels {name!r} takes seeds from {seed!r}, which is not another labels set")
    return names, seeds


def _crop_region(img: TrainingImage, region, where: str) -> TrainingImage:
    """``region: [y0, y1, x0, x1]`` keeps only that rectangle (e.g. three quadrants for training, one held out)."""
    if region is None:
        return img
    h, w = img.inputs.shape[1:]
    try:
        y0, y1, x0, x1 = (int(v) for v in region)
    except (TypeError, ValueError):
        raise VirtualStainError(f"{where}: region must be [y0, y1, x0, x1], got {region!r}") from None
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise VirtualStainError(f"{where}: region {region} lies outside the {h}x{w} image")
    ys, xs = slice(y0, y1), slice(x0, x1)
    return TrainingImage(img.name, img.inputs[:, ys, xs], img.stains[:, ys, xs],
                         {k: v[ys, xs] for k, v in img.labels.items()}, img.split)


def _has(entry: dict, key: str, name: str, where: str) -> bool:
    if name not in entry.get(key, {}):
        raise VirtualStainError(f"{where}: no source for {key[:-1]} {name!r}")
    return True


def _checked(img: TrainingImage, where: str) -> TrainingImage:
    shape = img.inputs.shape[1:]
    for arr in [*img.stains, *img.labels.values()]:
        if arr.shape != shape:
            raise VirtualStainError(f"{where}: targets of shape {arr.shape} do not match the input's {shape}; a "
                                    "target must be registered pixel for pixel with its input (same size: crop or "
                                    "resample one of them)")
    if img.split not in ("train", "val"):
        raise VirtualStainError(f"{where}: split must be 'train' or 'val', got {img.split!r}")
    return img


def load_folder(folder: str | Path, input_names: list[str] | None = None, stain_names: list[str] | None = None,
                channel_axis: int = 0) -> TrainingSpec:
    """``DIR/input``, ``DIR/target`` and optional ``DIR/labels/<name>`` with matching file names."""
    folder = Path(folder)
    in_dir, tgt_dir, lab_dir = folder / "input", folder / "target", folder / "labels"
    if not in_dir.is_dir():
        raise VirtualStainError(f"{folder} has no 'input' folder (expected input/, target/ and optionally labels/NAME/)")
    label_names = sorted(p.name for p in lab_dir.iterdir() if p.is_dir()) if lab_dir.is_dir() else []
    images, sizes = [], {}
    for p in list_images(in_dir):
        f = read_image_file(p)  # the image and its pixel size from one open
        sizes[p.name] = f.pixel_size_um
        inputs = _as_chw(f.data, channel_axis, p)
        tgt = tgt_dir / p.name
        stains = _as_chw(read_image(tgt), channel_axis, tgt) if tgt.exists() else None
        if stains is None and not label_names:
            raise VirtualStainError(f"{p.name}: no matching file in {tgt_dir} and no labels/")
        labels = {}
        for n in label_names:
            match = lab_dir / n / p.name
            if not match.exists():
                raise VirtualStainError(f"{p.name}: no matching labels file {match}")
            labels[n] = as_labels(read_image(match), match)
        stains = stains if stains is not None else np.zeros((0, *inputs.shape[1:]), np.float32)
        images.append(_checked(TrainingImage(p.stem, _finite(inputs, p), _finite(stains, tgt), labels), str(p)))
    if not images:
        raise VirtualStainError(f"{in_dir} holds no images")
    known = {k: v for k, v in sizes.items() if v}
    if known and max(known.values()) > 1.2 * min(known.values()):
        listing = ", ".join(f"{k} {v:.3g} um" for k, v in sorted(known.items(), key=lambda kv: kv[1]))
        raise VirtualStainError(
            f"{in_dir}: the images have different pixel sizes ({listing}); a model learns one scale — resample them "
            "to one pixel size first, or train a model per objective")
    n_in, n_st = images[0].inputs.shape[0], images[0].stains.shape[0]
    # neutral default: the folder does not say what the input is (a fluorescence input is no 'brightfield')
    input_names = input_names or (["input"] if n_in == 1 else [f"input {i}" for i in range(n_in)])
    stain_names = stain_names or [f"stain {i}" for i in range(n_st)]
    if len(input_names) != n_in or len(stain_names) != n_st:
        raise VirtualStainError(
            f"{folder}: images have {n_in} input and {n_st} target channel(s) but {len(input_names)} input and "
            f"{len(stain_names)} stain name(s) were given"
        )
    pixel = float(sum(known.values()) / len(known)) if known else None  # recorded in the bundle
    return TrainingSpec(folder.name, input_names, stain_names, label_names, images, pixel_size_um=pixel,
                        source=str(folder))


def _as_chw(arr: np.ndarray, channel_axis: int, path=None) -> np.ndarray:
    where = f"{path}: " if path is not None else ""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        if channel_axis == 0 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            raise VirtualStainError(
                f"{where}looks like an RGB(A) image {arr.shape} (colour last); save it as one grey plane (e.g. its "
                "luminance), or give --channel-axis 2 to train on its colour planes as separate inputs")
        return np.moveaxis(arr, channel_axis, 0)
    raise VirtualStainError(f"{where}training images must be 2D or 3D (C, Y, X); got shape {arr.shape}")


def _finite(arr: np.ndarray, path) -> np.ndarray:
    """float32; NaN/Inf pixels are one clear error that says how to fill them."""
    out = np.asarray(arr, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        raise VirtualStainError(
            f"{path} holds {int(bad.sum())} NaN/Inf pixel(s); training needs finite values: fill them (e.g. "
            "napari_virtualstain.core.normalize.fill_non_finite(image), nearest finite pixel) or crop them away")
    return out


MIN_VAL_WIDTH = 8  # the smallest plane a network takes (core/inputs.py)


def split_regions(spec: TrainingSpec) -> tuple[list[tuple[TrainingImage, slice]], list[tuple[TrainingImage, slice]]]:
    """(image, x-slice) regions for training and validation; validation never overlaps training pixels."""
    train = [(im, slice(None)) for im in spec.images if im.split == "train"]
    val = [(im, slice(None)) for im in spec.images if im.split == "val"]
    if val or spec.val_fraction <= 0:
        return train, val
    train, val = [], []
    for im in spec.images:
        w = im.inputs.shape[-1]
        cut = int(round(w * (1 - spec.val_fraction)))
        if w - cut < MIN_VAL_WIDTH or im.inputs.shape[-2] < MIN_VAL_WIDTH:
            raise VirtualStainError(
                f"{im.name}: the validation strip (the right-hand {100 * spec.val_fraction:g} %) would be "
                f"{im.inputs.shape[-2]} x {w - cut} px, too small to validate on (at least {MIN_VAL_WIDTH} x "
                f"{MIN_VAL_WIDTH}); use a larger --val-fraction, mark whole images split: val in a config, or "
                "--val-fraction 0 to validate on nothing")
        train.append((im, slice(0, cut)))
        val.append((im, slice(cut, w)))
    return train, val
