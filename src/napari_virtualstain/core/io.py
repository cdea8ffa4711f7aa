"""Reading microscopy images and writing predictions with channel names and provenance.

Predictions are ImageJ-hyperstack TIFFs (Fiji and napari show the channel names) whose ``Info`` holds the
provenance as JSON; labels are plain TIFFs with the provenance JSON as the image description. Both read back with
:func:`read_provenance`. Every file is written under a temporary name and renamed when complete
(:func:`atomic_write`), so a full disk or a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .errors import VirtualStainError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
OUTPUTS = {  # the one place output file names are spelled: predict, demo, the widgets' Save and evaluate use it
    "stain": "{stem}_virtualstain.tif",
    "labels": "{stem}_{name}_labels.tif",
    "objects": "{stem}_{name}_objects.csv",
    "uncertainty": "{stem}_uncertainty.tif",
    "flags": "{stem}_flags_{name}.tif",
    "flags_table": "{stem}_flags.csv",
    "review_table": "{stem}.csv",
    "review_labels": "{stem}_labels.tif",
    "translated": "{stem}_translated.tif",  # translate: the image under the target class ...
    "control": "{stem}_control.tif",  # ... regenerated under its own class (the reconstruction control) ...
    "difference": "{stem}_difference.tif",  # ... and translated - control
    "mean_difference": "mean_difference.tif",  # over every translated image of one run
    "samples": "{stem}_samples.tif",  # synthesize: the stem is the class name
}


def output_name(kind: str, stem: str, name: str | None = None) -> str:
    """The file name of one output (``OUTPUTS``): e.g. ``output_name("labels", "t9", "nuclei")`` ->
    ``t9_nuclei_labels.tif``; spaces in a channel or labels-set name become underscores."""
    if kind not in OUTPUTS:
        raise ValueError(f"unknown output kind {kind!r}")
    return OUTPUTS[kind].format(stem=stem, name=(name or "").replace(" ", "_"))


def _why_not_written(exc: OSError, extra: dict | None = None) -> str:
    """A write failure in the words a user acts on (full disk, read-only, permission), else the OS's own."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", **(extra or {})}
    return reasons.get(exc.errno, exc.strerror or str(exc))


def check_output_folder(path: str | Path) -> Path:
    """Prove that the output folder (or OME-Zarr store) can be made and written — before any model runs, so a bad
    ``-o`` costs nothing: one clear error instead of a traceback after the work. Nothing is created here: the
    nearest existing folder above it gets a probe file, removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VirtualStainError(f"output {path} is a file, not a folder; give a folder for -o (it is created if "
                                "missing)")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise VirtualStainError(f"cannot write into output folder {path}: a part of the path ({base}) is a file; "
                                "choose another folder (-o), e.g. -o ~/virtualstain-out")
    probe = base / f".virtualstain-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = _why_not_written(exc, {errno.ENOENT: "that place cannot hold files"})
        raise VirtualStainError(f"cannot write into output folder {path}: {why} (in {base}); choose another "
                                "folder (-o) with write access, e.g. -o ~/virtualstain-out") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only when the block completes. An OSError
    (read-only folder, full disk, ...) becomes one clear error, and nothing is left under either name."""
    path = Path(path)
    part = path.with_name(f".{path.name}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield part
        os.replace(part, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            part.unlink()
        why = _why_not_written(exc)
        raise VirtualStainError(f"cannot write {path}: {why}; choose another output folder (-o) with write access "
                                "and free space") from None
    finally:
        with contextlib.suppress(OSError):
            if part.exists():
                part.unlink()


def read_image(path: str | Path) -> np.ndarray:
    """Read a TIFF/OME-TIFF/PNG as stored (no axis guessing here: the caller says which axis holds channels)."""
    path = Path(path)
    if not path.is_file():
        raise VirtualStainError(f"image file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return tifffile.imread(path)
        if suffix in IMAGE_SUFFIXES:
            import imageio.v3 as iio

            return np.asarray(iio.imread(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise VirtualStainError(f"could not read {path}: {exc}") from None
    raise VirtualStainError(
        f"{path.name}: unsupported file type {suffix!r}; use TIFF/OME-TIFF or PNG ({', '.join(IMAGE_SUFFIXES)})"
    )


def read_axes(path: str | Path) -> str | None:
    """The file's axis letters as its metadata states them (e.g. 'CTYX' for an OME-TIFF, 'TZCYX' for ImageJ), or None.

    Only for messages: which index of ``--plane`` is which axis."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
    except Exception:  # noqa: BLE001 - a file that reads but has no series metadata simply has no axis names
        return None
    return axes or None


# ImageJ writes the micro sign as the literal text \u00B5m
MICRONS_PER = {"um": 1.0, "µm": 1.0, "\\u00B5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "nm": 1e-3,
               "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3}


def read_pixel_size(path: str | Path) -> float | None:
    """The file's pixel size in um (OME PhysicalSizeX, else ImageJ/TIFF resolution with a length unit), or None."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            return _pixel_size(tif)
    except Exception:  # noqa: BLE001 - unreadable metadata means an unknown pixel size, not a failure
        return None


def _pixel_size(tif) -> float | None:
    import re

    try:
        if tif.ome_metadata:
            size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if size:
                return float(size.group(1)) * MICRONS_PER.get(unit.group(1) if unit else "um", 1.0)
        unit = (tif.imagej_metadata or {}).get("unit")
        tag = tif.pages.first.tags.get("XResolution")
        if unit in MICRONS_PER and tag is not None:
            num, den = tag.value
            return den / num * MICRONS_PER[unit] if num else None
    except Exception:  # noqa: BLE001 - unreadable metadata means an unknown pixel size, not a failure
        return None
    return None


@dataclass
class ImageFile:
    """An image as stored, with what its metadata says: axis letters (or None) and pixel size in um (or None)."""

    data: np.ndarray
    axes: str | None
    pixel_size_um: float | None


def read_image_file(path: str | Path) -> ImageFile:
    """``read_image`` + ``read_axes`` + ``read_pixel_size`` from one open of the file."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return ImageFile(read_image(path), None, None)
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray()
            try:
                axes = tif.series[0].axes or None
            except Exception:  # noqa: BLE001 - no series metadata: no axis names
                axes = None
            return ImageFile(data, axes, _pixel_size(tif))
    except VirtualStainError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise VirtualStainError(f"could not read {path}: {exc}") from None


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def write_channels(path: str | Path, image: np.ndarray, channel_names: list[str], provenance: dict,
                   pixel_size_um: float | None = None) -> Path:
    """(C, Y, X) or (T, C, Y, X) float32 -> ImageJ hyperstack with channel names and provenance (JSON in ``Info``).

    A leading plane axis (``--all-planes``) is stored as ImageJ's T axis.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"axes": "TCYX" if image.ndim == 4 else "CYX", "Labels": list(channel_names), "Info": json.dumps(provenance, default=str)}
    kwargs = {}
    if pixel_size_um:
        kwargs["resolution"] = (1.0 / pixel_size_um, 1.0 / pixel_size_um)
        metadata["unit"] = "um"
    with atomic_write(path) as part:
        tifffile.imwrite(part, np.ascontiguousarray(image, dtype=np.float32), imagej=True, metadata=metadata, **kwargs)
    return path


def write_labels(path: str | Path, labels: np.ndarray, provenance: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    if dtype == np.uint32 and labels.dtype == np.int32 and labels.min(initial=0) >= 0:
        data = labels.view(np.uint32)  # the same bits: no second copy of a big field's labels
    else:
        data = labels.astype(dtype, copy=False)
    with atomic_write(path) as part:
        tifffile.imwrite(part, data, description=json.dumps(provenance, default=str), metadata=None,
                         photometric="minisblack")  # a 3- or 4-plane stack is planes, not RGB
    return path


def read_provenance(path: str | Path) -> dict:
    """The provenance written by :func:`write_channels` or :func:`write_labels`."""
    with tifffile.TiffFile(path) as tif:
        ij = tif.imagej_metadata
        if ij and "Info" in ij:
            return json.loads(ij["Info"])
        desc = tif.pages.first.description
    try:
        return json.loads(desc)
    except (json.JSONDecodeError, TypeError):
        return {}


def read_channel_names(path: str | Path) -> list[str]:
    with tifffile.TiffFile(path) as tif:
        ij = tif.imagej_metadata or {}
    labels = ij.get("Labels", [])
    return list(labels) if isinstance(labels, (list, tuple)) else [labels]
