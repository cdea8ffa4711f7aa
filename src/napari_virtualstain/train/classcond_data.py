"""Training data for a class-conditional model: images with a class each, from folders, a CSV or a YAML/JSON config.

- Folder: ``DIR/<class>/*.tif|png`` (one sub-folder per class; 2D, channels-first CYX, or RGB(A) images).
- CSV: columns ``image,class`` (paths relative to the CSV).
- Config::

      task: classcond
      name: demo-nfkb
      channels: [NF-kB, DNA]
      images:
        - class: A01
          channels: {NF-kB: A01_nfkb.tif, DNA: A01_dna.tif}   # one 2D source per channel, or
          # image: A01.tif                                    # one multi-channel file
          region: [0, 768, 0, 1360]                          # optional [y0, y1, x0, x1]
      invariant: [DNA]   # optional: channels given to the network as conditioning and kept exactly by a translation

Sources are read as in the paired-stain configs (``{path, index}`` picks leading axes).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import VirtualStainError
from ..core.inputs import to_channels_first
from ..core.io import list_images, read_image
from ..core.normalize import as_float
from .data import _read_source


@dataclass
class ClassImage:
    name: str
    class_name: str
    image: np.ndarray  # (C, Y, X) float32, raw units


@dataclass
class ClassCondSpec:
    name: str
    channel_names: list[str]
    classes: list[str]
    images: list[ClassImage]
    pixel_size_um: float | None = None
    description: str = ""
    source: str = ""
    invariant: list[str] = field(default_factory=list)  # channels the model conditions on instead of generating

    def check_invariant(self) -> None:
        unknown = [c for c in self.invariant if c not in self.channel_names]
        if unknown:
            raise VirtualStainError(f"invariant channel(s) {', '.join(unknown)} are not among the image channels "
                                    f"({', '.join(self.channel_names)}); name them as the channels are named")
        if len(set(self.invariant)) == len(self.channel_names):
            raise VirtualStainError("every channel is invariant: leave at least one channel for the model to generate")

    @property
    def variable(self) -> list[str]:
        return [c for c in self.channel_names if c not in self.invariant]


def _as_chw(arr: np.ndarray, channel_names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """2D -> 1 channel; (Y, X, 3|4) -> RGB(A); (C, Y, X) -> C channels; names default to what the data looks like."""
    arr = np.asarray(arr)
    if channel_names is None:
        if arr.ndim == 2:
            channel_names = ["intensity"]
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4:
            channel_names = ["R", "G", "B", "A"][: arr.shape[-1]]
        elif arr.ndim == 3:
            channel_names = [f"channel {i}" for i in range(arr.shape[0])]
    return as_float(to_channels_first(arr, channel_names or ["intensity"], what=where), where), channel_names


def _spec(name, images: list[ClassImage], channel_names, source, **kw) -> ClassCondSpec:
    if not images:
        raise VirtualStainError(f"{source}: no training images found")
    classes = sorted({im.class_name for im in images})
    return ClassCondSpec(name, list(channel_names), classes, images, source=str(source), **kw)


def load_class_folders(folder: str | Path, channel_names: list[str] | None = None) -> ClassCondSpec:
    folder = Path(folder)
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 1:
        raise VirtualStainError(f"{folder} has no class sub-folders (expected {folder}/<class>/*.tif)")
    images = []
    for d in class_dirs:
        for p in list_images(d):
            chw, channel_names = _as_chw(read_image(p), channel_names, str(p))
            images.append(ClassImage(p.stem, d.name, chw))
    return _spec(folder.name, images, channel_names or [], folder)


def load_class_csv(path: str | Path, channel_names: list[str] | None = None) -> ClassCondSpec:
    path = Path(path)
    images = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "class"} <= set(reader.fieldnames):
            raise VirtualStainError(f"{path}: a class CSV needs the columns 'image' and 'class'")
        for i, row in enumerate(reader):
            p = Path(row["image"])
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise VirtualStainError(f"{path} row {i + 2}: {p} does not exist")
            chw, channel_names = _as_chw(read_image(p), channel_names, str(p))
            images.append(ClassImage(p.stem, str(row["class"]), chw))
    return _spec(path.stem, images, channel_names or [], path)


def load_classcond_config(path: str | Path, raw: dict | None = None) -> ClassCondSpec:
    path = Path(path)
    if raw is None:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    channel_names = raw.get("channels")
    if not isinstance(channel_names, list) or not channel_names:
        raise VirtualStainError(f"{path}: a classcond config names its image channels: channels: [NF-kB, DNA]")
    images = []
    for i, entry in enumerate(raw.get("images") or []):
        where = f"{path.name} images[{i}]"
        if not isinstance(entry, dict) or "class" not in entry:
            raise VirtualStainError(f"{where}: each image needs a 'class'")
        if "channels" in entry:
            missing = [c for c in channel_names if c not in entry["channels"]]
            if missing:
                raise VirtualStainError(f"{where}: no source for channel(s) {', '.join(missing)}")
            chw = np.stack([as_float(_read_source(entry["channels"][c], path.parent, where), where) for c in channel_names])
        elif "image" in entry:
            src = entry["image"]
            src = {"path": src} if isinstance(src, str) else src
            p = Path(src["path"])
            arr = read_image(p if p.is_absolute() else path.parent / p)
            if src.get("index") is not None:
                arr = arr[tuple(int(v) for v in src["index"])]
            chw, _ = _as_chw(arr, channel_names, where)
        else:
            raise VirtualStainError(f"{where}: give 'channels' (one source per channel) or 'image'")
        region = entry.get("region")
        if region is not None:
            y0, y1, x0, x1 = (int(v) for v in region)
            h, w = chw.shape[1:]
            if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
                raise VirtualStainError(f"{where}: region {region} lies outside the {h}x{w} image")
            chw = chw[:, y0:y1, x0:x1]
        images.append(ClassImage(entry.get("name", f"image{i}"), str(entry["class"]), chw))
    invariant = raw.get("invariant") or []
    if not isinstance(invariant, list):
        raise VirtualStainError(f"{path}: 'invariant' lists channel names: invariant: [DNA]")
    spec = _spec(raw.get("name", path.stem), images, channel_names, raw.get("source", path),
                 pixel_size_um=raw.get("pixel_size_um"), description=raw.get("description", ""),
                 invariant=[str(c) for c in invariant])
    spec.check_invariant()
    if raw.get("classes"):
        order = [str(c) for c in raw["classes"]]
        unknown = sorted(set(spec.classes) - set(order))
        if unknown:
            raise VirtualStainError(f"{path}: images use class(es) {', '.join(unknown)} missing from 'classes'")
        spec.classes = order
    return spec
