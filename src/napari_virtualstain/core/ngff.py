"""OME-Zarr (NGFF) images and HCS plates in and out, through ome-zarr-py.

Why ome-zarr-py: it is the OME reference implementation of the NGFF spec (0.4 and 0.5, zarr v2 and v3), and napari's
own OME-Zarr reader (napari-ome-zarr) is built on it, so what we write is read back by exactly the code napari uses.
(iohub, Cytoland's choice, pins its own zarr and NGFF versions and adds a second reader beside napari's.)

Reading is lazy: a field's level 0 is a Dask array and only the plane being predicted is computed. Channel names come
from the ``omero`` metadata, the pixel size from the level-0 scale transformation and the axes' units.

Writing mirrors the input: a plate's rows, columns, wells and fields (``create_plate``), each field an image with the
predicted channels (names and colours in ``omero``), instance labels in its ``labels/`` group (NGFF labels spec),
the metadata always through ome-zarr-py's writers, and
the provenance in its attributes under ``virtualstain`` — written last, so a field without it is incomplete (a killed
task) and is redone by a rerun, while one with the same settings key is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VirtualStainError
from .io import MICRONS_PER

PROVENANCE_KEY = "virtualstain"
CHUNK = 1024
LEVEL0 = "0"  # the one resolution level a predicted field is written with
_COLOURS = {"hoechst": "0000FF", "dapi": "0000FF", "dna": "0000FF", "nuc": "00FFFF", "cell": "FF00FF"}
_PALETTE = ["00FF00", "FF00FF", "FFFF00", "00FFFF", "FF0000", "FFFFFF"]


@dataclass(frozen=True)
class NgffField:
    """One image of an NGFF store: a plate's field (``path`` "B/03/0") or a plain image (``path`` "")."""

    store: Path
    path: str = ""

    @property
    def name(self) -> str:
        return f"{self.store.name}/{self.path}" if self.path else self.store.name

    @property
    def location(self) -> Path:
        return self.store / self.path if self.path else self.store


def _attrs(path: Path) -> dict | None:
    """The NGFF attributes of a group (0.5 or 0.4), or None when it is not one."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url

    for fmt in (FormatV05(), FormatV04()):
        try:
            loc = parse_url(str(path), fmt=fmt)
        except Exception:  # noqa: BLE001 - not this format (or not zarr at all)
            continue
        if loc is not None and loc.exists():
            return dict(loc.root_attrs)
    return None


def is_ngff(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return False
    attrs = _attrs(path) or {}
    return "plate" in attrs or "multiscales" in attrs


def plate_layout(path: str | Path) -> dict | None:
    """The ``plate`` metadata of an HCS plate (rows, columns, wells, ...), or None for a plain image."""
    return (_attrs(Path(path)) or {}).get("plate")


def list_fields(path: str | Path) -> list[NgffField]:
    """Every field of a plate (wells in plate order, fields in well order), or the image itself."""
    path = Path(path)
    plate = plate_layout(path)
    if plate is None:
        return [NgffField(path)]
    fields = []
    for well in plate.get("wells", []):
        images = (_attrs(path / well["path"]) or {}).get("well", {}).get("images", [])
        fields += [NgffField(path, f"{well['path']}/{im['path']}") for im in images]
    if not fields:
        raise VirtualStainError(f"{path} is an HCS plate without fields (no well lists an image)")
    return fields


@dataclass
class FieldData:
    data: object  # dask array, level 0, in the file's axis order
    axes: str  # upper-case axis letters, e.g. "CYX" or "TCZYX"
    channel_names: list[str] | None
    pixel_size_um: float | None


def read_field(field: NgffField) -> FieldData:
    """Level 0 of a field, lazily, with its axes, channel names and pixel size."""
    import dask.array as da

    attrs = _attrs(field.location)
    if not attrs or "multiscales" not in attrs:
        raise VirtualStainError(f"{field.name} is not an NGFF image (no 'multiscales' metadata)")
    ms = attrs["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
    level0 = ms["datasets"][0]
    data = da.from_zarr(str(field.location / level0["path"]))
    if len(axes) != data.ndim:
        axes = list("tczyx"[-data.ndim:])
    scale = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    pixel = None
    if scale is not None and "x" in axes:
        unit = next((a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict) and a.get("name") == "x"), None)
        if unit in MICRONS_PER:
            pixel = float(scale[axes.index("x")]) * MICRONS_PER[unit]
    names = [c.get("label") for c in attrs.get("omero", {}).get("channels", [])] or None
    if names is not None and ("c" not in axes or len(names) != data.shape[axes.index("c")]):
        names = None
    return FieldData(data, "".join(axes).upper(), names, pixel)


def select_inputs(fd: FieldData, input_names: list[str]):
    """The field with its channel axis reduced to the checkpoint's inputs, picked by name when the omero metadata
    names them all (e.g. brightfield out of brightfield + Hoechst); else unchanged (``--plane`` picks)."""
    if not fd.channel_names or "C" not in fd.axes:
        return fd.data, fd.axes, False
    lowered = [n.lower() for n in fd.channel_names]
    if not all(n.lower() in lowered for n in input_names):
        return fd.data, fd.axes, False
    idx = [lowered.index(n.lower()) for n in input_names]
    c = fd.axes.index("C")
    data = fd.data[(slice(None),) * c + (idx,)]
    if len(idx) == 1:  # one input: the channel axis goes, as a single-channel image has none
        return data[(slice(None),) * c + (0,)], fd.axes.replace("C", ""), True
    if c != len(fd.axes) - 3:  # several inputs: channels right before Y, X, as the checkpoint reads them
        import dask.array as da

        data = da.moveaxis(data, c, -3)
        axes = fd.axes.replace("C", "")
        return data, axes[:-2] + "C" + axes[-2:], True
    return data, fd.axes, True


def create_plate(out: Path, source: Path, fields: list[NgffField]) -> None:
    """The output plate's metadata, mirroring the source plate's rows, columns and wells and the ``fields`` listed
    from it (``list_fields``); fields already written stay (a rerun continues)."""
    import zarr
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    layout = plate_layout(source)
    root = zarr.open_group(str(out), mode="a")
    wells = [w["path"] for w in layout["wells"]]
    write_plate_metadata(root, [r["name"] for r in layout["rows"]], [c["name"] for c in layout["columns"]], wells,
                         field_count=layout.get("field_count"), name=layout.get("name") or source.name)
    images: dict[str, list[str]] = {w: [] for w in wells}
    for f in fields:
        well, image = f.path.rsplit("/", 1)
        images[well].append(image)
    for w in wells:
        write_well_metadata(root.require_group(w), images[w])


def channel_colour(name: str, index: int) -> str:
    low = name.lower()
    return next((c for k, c in _COLOURS.items() if k in low), _PALETTE[index % len(_PALETTE)])


def write_field(group_path: Path, image: np.ndarray, channel_names: list[str], labels: dict[str, np.ndarray],
                provenance: dict, pixel_size_um: float | None) -> None:
    """One field: (C, Y, X) float32 channels, labels in ``labels/``, the provenance last (the completion mark).

    The arrays are written with zarr directly (one level, no pyramid), the NGFF metadata with ome-zarr-py's own
    writers (``write_multiscales_metadata``, ``write_label_metadata``): half the time of its ``write_image``, which
    goes through Dask for a pyramid a field of this size does not need."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata

    group = zarr.open_group(str(group_path), mode="w")  # a half-written earlier attempt is replaced whole
    c, h, w = image.shape
    px = float(pixel_size_um) if pixel_size_um else 1.0
    units = {"y": "micrometer", "x": "micrometer"} if pixel_size_um else None
    chunks = (min(h, CHUNK), min(w, CHUNK))
    omero = {"channels": [
        {"label": n, "color": channel_colour(n, i), "active": True,
         "window": {"min": float(np.min(image[i])), "max": float(np.max(image[i])),
                    "start": float(np.percentile(image[i], 1)), "end": float(np.percentile(image[i], 99.8))}}
        for i, n in enumerate(channel_names)]}
    arr = group.create_array(LEVEL0, shape=image.shape, dtype=np.float32, chunks=(1, *chunks))
    arr[...] = np.asarray(image, dtype=np.float32)
    write_multiscales_metadata(group, [{"path": LEVEL0, "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, px, px]}]}], axes=["c", "y", "x"], axes_units=units, metadata={"omero": omero})
    if labels:
        holder = group.require_group("labels")
        for name, lab in labels.items():
            key = name.replace(" ", "_")
            sub = holder.require_group(key)
            dtype = np.uint16 if lab.max(initial=0) < 2**16 else np.uint32
            sub.create_array(LEVEL0, shape=lab.shape, dtype=dtype, chunks=chunks)[...] = lab.astype(dtype)
            write_multiscales_metadata(sub, [{"path": LEVEL0, "coordinateTransformations": [
                {"type": "scale", "scale": [px, px]}]}], axes=["y", "x"], axes_units=units)
            write_label_metadata(holder, key)
    group.attrs[PROVENANCE_KEY] = json.loads(json.dumps(provenance, default=str))


def field_done(group_path: Path, key: str) -> bool:
    """Written completely with the same checkpoint and settings (the provenance is the last thing written)."""
    import zarr

    try:
        group = zarr.open_group(str(group_path), mode="r")
        prov = group.attrs.get(PROVENANCE_KEY)
    except Exception:  # noqa: BLE001 - missing or unreadable: not done
        return False
    return isinstance(prov, dict) and prov.get("settings_key") == key
