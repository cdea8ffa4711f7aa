"""Layers in, layers out: pick the plane(s) of an input layer, and turn core results into layers that overlay it.

No Qt here (only napari's layer model), so the rules are easy to test: which layers fit a checkpoint, which plane
is "the current one", how outputs get the input's scale/translate, and what names/colormaps/metadata they carry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..core.errors import VirtualStainError
from ..core.inputs import RGB_NOTE, rgb_to_luminance

LayerTuple = tuple  # napari LayerDataTuple: (data, kwargs, layer_type)

#: stain name (lower case, substring) -> colormap; anything else cycles through _PALETTE
_STAIN_COLORS = {
    "hoechst": "cyan", "dapi": "cyan", "nucle": "cyan", "dna": "cyan",
    "map2": "magenta", "nfh": "yellow", "tubulin": "yellow", "actin": "green", "phalloidin": "green",
    "gfp": "green", "mito": "red", "membrane": "magenta", "nfkb": "green", "nf-kb": "green",
}
_PALETTE = ("magenta", "yellow", "green", "cyan", "red", "blue")
DIVERGING = "PiYG"
HEATMAP = "inferno"


@dataclass(frozen=True)
class Geometry:
    """World placement shared by every output of a run, copied from the input layer's kept axes."""

    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: tuple | None = None
    axis_labels: tuple[str, ...] | None = None
    rotate: tuple | None = None  # only when not the identity (as nested tuples: frozen and comparable)
    shear: tuple | None = None
    affine: tuple | None = None

    def pixel_size_um(self) -> float | None:
        """The layer's pixel size in um: its x scale when the unit is a length (or unset and the scale is not 1)."""
        from ..core.io import MICRONS_PER

        x = float(abs(self.scale[-1]))
        unit = str(self.units[-1]).lower() if self.units else "pixel"
        if unit in MICRONS_PER:
            return x * MICRONS_PER[unit]
        return x if unit in ("pixel", "px", "none", "") and x != 1.0 else None

    def kwargs(self) -> dict:
        kw = {"scale": self.scale, "translate": self.translate}
        for key in ("rotate", "shear", "affine"):
            if getattr(self, key) is not None:
                kw[key] = np.asarray(getattr(self, key))
        if self.units is not None:
            kw["units"] = self.units
        if self.axis_labels is not None:
            kw["axis_labels"] = self.axis_labels
        return kw

    @property
    def ndim(self) -> int:
        return len(self.scale)


@dataclass
class InputSelection:
    """The arrays a run will read (copies, so the input layer is never touched and may even be deleted mid-run)."""

    layer_name: str
    arrays: list[np.ndarray]  # one per plane: (Y, X), or (C, Y, X) for multi-channel checkpoints
    planes: list[tuple[int, ...]]  # leading-axis index of each array in the input layer
    lead_shape: tuple[int, ...]  # leading shape of the stacked outputs (all 1 for a single plane)
    geometry: Geometry
    channel_axis: int | None  # what the core's channel_axis must be for each array
    contrast_limits: tuple[float, float] | None = None
    colormap: str | None = None
    rgb: bool = False  # an RGB layer for an RGB checkpoint: arrays are (Y, X, C)
    conversion: str | None = None  # e.g. an RGB layer turned into luminance for a one-input checkpoint

    @property
    def plane_note(self) -> dict:
        """What goes into provenance about the planes."""
        note = {"input_conversion": self.conversion} if self.conversion else {}
        if len(self.planes) == 1:
            return note | ({"plane": list(self.planes[0])} if self.planes[0] else {})
        return note | {"planes": "all", "lead_shape": list(self.lead_shape)}


def layer_kind(layer) -> str:
    return type(layer).__name__


def why_not_fit(layer, n_inputs: int) -> str | None:
    """None if ``layer`` can feed a checkpoint with ``n_inputs`` input channels, else a short reason."""
    from napari.layers import Image

    if not isinstance(layer, Image):
        return f"a {layer_kind(layer)} layer"
    shape = _base_shape(layer)
    if layer.rgb:  # an RGB checkpoint takes the colours; a one-input checkpoint their luminance
        return None if shape[-1] == n_inputs or n_inputs == 1 else "RGB"
    if n_inputs == 1:
        return None if len(shape) >= 2 else "not 2D"
    if len(shape) < 3 or shape[-3] != n_inputs:
        return f"needs {n_inputs} channels before Y, X"
    return None


def _base_shape(layer) -> tuple[int, ...]:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return tuple(int(s) for s in data.shape)


def select_input(layer, n_inputs: int, input_names: list[str], world_point=None, all_planes: bool = False
                 ) -> InputSelection:
    """Copy the plane at ``world_point`` (``viewer.dims.point``) or every plane of ``layer``; say clearly why not.

    The last two axes are Y, X; a multi-channel checkpoint takes the axis before them as its channels (or the
    colour axis of an RGB layer, for an RGB checkpoint); every other leading axis (time, z, ...) is a plane axis.
    """
    from napari.layers import Image

    name = getattr(layer, "name", "?")
    need = f"the checkpoint expects {n_inputs} input channel{'s' if n_inputs > 1 else ''} ({', '.join(input_names)})"
    if not isinstance(layer, Image):
        raise VirtualStainError(f"'{name}' is a {layer_kind(layer)} layer; choose an Image layer ({need})")
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(int(s) for s in data.shape)
    rgb = bool(layer.rgb)
    if rgb and n_inputs == 1 and shape[-1] != 1:  # colour camera brightfield: its luminance, noted in provenance
        sel = _select(layer, data, shape[:-1], 0, world_point, all_planes, channel_axis=None)
        sel.arrays = [rgb_to_luminance(a) for a in sel.arrays]
        sel.conversion = RGB_NOTE
        return sel
    if rgb and shape[-1] != n_inputs:
        raise VirtualStainError(
            f"'{name}' is an RGB image; {need}. Split it (right-click the layer > Split RGB) and pick the channel "
            "that holds the transmitted light, or convert it to greyscale"
        )
    if rgb:  # colour last, as napari holds it: (..., Y, X, C) -> the core takes channel_axis=-1
        return _select(layer, data, shape[:-1], 0, world_point, all_planes, channel_axis=-1, rgb=True)
    n_chan_axes = 0 if n_inputs == 1 else 1
    if len(shape) < 2 + n_chan_axes or (n_chan_axes and shape[-3] != n_inputs):
        raise VirtualStainError(
            f"'{name}' has shape {shape}; {need}"
            + (" as the axis just before Y, X" if n_chan_axes else "")
        )
    return _select(layer, data, shape, n_chan_axes, world_point, all_planes, channel_axis=0 if n_chan_axes else None)


def _select(layer, data, shape, n_chan_axes, world_point, all_planes, channel_axis, rgb=False) -> InputSelection:
    """Planes of ``data`` over the leading axes of ``shape`` (the layer's dims), as copies, with their geometry."""
    name = layer.name
    n_lead = len(shape) - 2 - n_chan_axes
    lead_full = shape[:n_lead]
    if all_planes or n_lead == 0:
        planes = list(np.ndindex(*lead_full)) if n_lead else [()]
        lead_shape = lead_full
    else:
        pos = layer.world_to_data(np.asarray(world_point, dtype=float)) if world_point is not None else np.zeros(len(shape))
        planes = [tuple(int(np.clip(np.round(pos[i]), 0, lead_full[i] - 1)) for i in range(n_lead))]
        lead_shape = (1,) * n_lead
    arrays = [np.array(data[idx], copy=True) for idx in planes]

    keep = [*range(n_lead), len(shape) - 2, len(shape) - 1]  # the channel axis (if any) is dropped
    scale = np.asarray(layer.scale, dtype=float)
    translate = np.asarray(layer.translate, dtype=float).copy()
    if not all_planes and n_lead:
        translate[:n_lead] = translate[:n_lead] + np.asarray(planes[0]) * scale[:n_lead]
    units = getattr(layer, "units", None)
    labels = getattr(layer, "axis_labels", None)
    geometry = Geometry(
        tuple(float(scale[i]) for i in keep),
        tuple(float(translate[i]) for i in keep),
        tuple(units[i] for i in keep) if units is not None else None,
        tuple(labels[i] for i in keep) if labels is not None else None,
        *_kept_transforms(layer, keep),
    )
    cmap = getattr(layer.colormap, "name", None)
    return InputSelection(
        name, arrays, planes, lead_shape, geometry, channel_axis,
        tuple(float(v) for v in layer.contrast_limits), cmap, rgb=rgb,
    )


def _kept_transforms(layer, keep: list[int]) -> tuple:
    """rotate / shear / affine of ``layer`` restricted to the kept axes, each None when it is the identity."""
    n = len(keep)
    ix = np.ix_(keep, keep)
    rotate = np.asarray(layer.rotate, dtype=float)[ix]
    shear_values = np.asarray(layer.shear, dtype=float)
    shear_full = np.eye(layer.ndim)
    if shear_values.ndim == 1:
        shear_full[np.triu_indices(layer.ndim, 1)] = shear_values
    else:
        shear_full = shear_values
    shear = shear_full[ix]
    full = np.asarray(layer.affine.affine_matrix, dtype=float)
    affine = full[np.ix_([*keep, layer.ndim], [*keep, layer.ndim])]

    def keep_if(m, identity):
        return None if np.allclose(m, identity) else tuple(map(tuple, m.tolist()))

    return keep_if(rotate, np.eye(n)), keep_if(shear, np.eye(n)), keep_if(affine, np.eye(n + 1))


def robust_limits(data: np.ndarray, low: float = 0.5, high: float = 99.8) -> tuple[float, float]:
    """Contrast limits from the data itself (percentiles of the finite values), never an empty range."""
    finite = np.asarray(data, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (low, high)))
    if not hi > lo:
        hi = lo + max(abs(lo) * 1e-3, 1e-6)
    return lo, hi


def symmetric_limits(data: np.ndarray, high: float = 99.8) -> tuple[float, float]:
    """(-m, m) so a diverging colormap puts 0 at its neutral centre."""
    finite = np.abs(np.asarray(data, dtype=np.float32))
    finite = finite[np.isfinite(finite)]
    m = float(np.percentile(finite, high)) if finite.size else 0.0
    m = m if m > 0 else 1e-6
    return -m, m


def stain_colormap(name: str, index: int) -> str:
    low = name.lower()
    for key, cmap in _STAIN_COLORS.items():
        if key in low:
            return cmap
    return _PALETTE[index % len(_PALETTE)]


def compare_with_real(viewer, virtual, real) -> None:
    """The one-click comparison: the real stain magenta and the virtual one cyan, both additive over a hidden
    input, so agreement is white, a virtual-only nucleus cyan and a missed one magenta; labels as outlines."""
    from napari.layers import Image, Labels

    for layer in viewer.layers:
        if isinstance(layer, Image) and layer not in (virtual, real):
            layer.visible = False
        if isinstance(layer, Labels):
            layer.contour = 1
    real.colormap, real.blending, real.visible = "magenta", "additive", True
    virtual.colormap, virtual.blending, virtual.visible = "cyan", "additive", True


def find_real_layer(viewer, stain: str, exclude=()):
    """An Image layer holding the measured ``stain``: its name contains the stain's name and not '(virtual)'."""
    from napari.layers import Image

    for layer in viewer.layers:
        name = layer.name.lower()
        if isinstance(layer, Image) and layer not in exclude and stain.lower() in name and "(virtual)" not in name:
            return layer
    return None


def json_safe(d: dict) -> dict:
    """Provenance as plain JSON types, so it can be saved with the layer and compared in tests."""
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def stack_planes(arrays: Iterable[np.ndarray], lead_shape: tuple[int, ...]) -> np.ndarray:
    """Per-plane results (each (..., Y, X)) -> one array of shape (*lead_shape, ..., Y, X)."""
    arrays = list(arrays)
    stacked = np.stack(arrays)
    return stacked.reshape(*lead_shape, *arrays[0].shape) if lead_shape else stacked[0]


def put_channel_last_two(stack: np.ndarray, c: int, n_lead: int) -> np.ndarray:
    """(*lead, C, Y, X) -> channel ``c`` as (*lead, Y, X)."""
    return stack[(slice(None),) * n_lead + (c,)]


def stain_layer_tuples(
    stack: np.ndarray,
    channel_names: list[str],
    channel_kinds: list[str],
    labels: dict[str, np.ndarray],
    provenance: dict,
    geometry: Geometry,
    *,
    probabilities: bool = False,
    suffix: str = "(virtual)",
    objects: dict[str, list[dict]] | None = None,
) -> list[LayerTuple]:
    """Stain channels as additive Image layers, labels as Labels layers, boundary/foreground probabilities on request.

    ``stack`` is (*lead, C, Y, X) with lead matching ``geometry.ndim - 2``; labels are (*lead, Y, X). ``objects``
    (per labels set, one row per object: ``core.confidence.nucleus_table``) become the labels layer's ``features``,
    and the layer is coloured by confidence (red 0 → green 1); calibrated interval channels are hidden Image layers.
    """
    n_lead = geometry.ndim - 2
    prov = json_safe(provenance)
    out: list[LayerTuple] = []
    n_stain = 0
    for c, (name, kind) in enumerate(zip(channel_names, channel_kinds)):
        data = np.ascontiguousarray(put_channel_last_two(stack, c, n_lead))
        meta = {**prov, "channel": name, "kind": kind}
        if kind == "stain":
            out.append((data, {
                "name": f"{name} {suffix}", "colormap": stain_colormap(name, n_stain), "blending": "additive",
                "contrast_limits": robust_limits(data), "metadata": meta, **geometry.kwargs(),
            }, "image"))
            n_stain += 1
        elif kind == "interval":
            out.append((data, {
                "name": f"{name} {suffix}", "colormap": "gray", "blending": "additive", "visible": False,
                "contrast_limits": robust_limits(data), "metadata": meta, **geometry.kwargs(),
            }, "image"))
        elif probabilities:
            out.append((data, {
                "name": f"{name} {suffix}", "colormap": "magma" if kind == "boundary" else "gray",
                "blending": "additive", "contrast_limits": (0.0, 1.0), "visible": kind == "boundary",
                "metadata": meta, **geometry.kwargs(),
            }, "image"))
    for name, lab in labels.items():
        meta = {**prov, "channel": name, "kind": "labels"}
        extra = {}
        rows = (objects or {}).get(name)
        if rows is not None:
            extra = {"features": objects_features(rows), "colormap": confidence_colormap(rows)}
        out.append((np.ascontiguousarray(lab), {  # outlines: the virtual stain stays visible inside each object
            "name": f"{name} {suffix}", "opacity": 0.8, "contour": 1, "metadata": meta, **geometry.kwargs(), **extra,
        }, "labels"))
    return out


def objects_features(rows: list[dict]) -> dict:
    """A labels layer's features table: napari matches the ``index`` column to label values."""
    keys = list(rows[0]) if rows else ["label", "confidence"]
    table = {k: [r[k] for r in rows] for k in keys}
    table["index"] = table.pop("label")
    return table


def confidence_colormap(rows: list[dict], hide_below: float = 0.0):
    """Label id -> colour from red (confidence 0) through yellow to green (1); ids below ``hide_below`` and the
    background are transparent."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    for r in rows:
        c = float(r["confidence"])
        colours[int(r["label"])] = (0, 0, 0, 0) if c < hide_below else (min(1.0, 2 * (1 - c)), min(1.0, 2 * c), 0.1, 1.0)
    return DirectLabelColormap(color_dict=colours)


def add_layers(viewer, tuples: list[LayerTuple]) -> list:
    """Add layer tuples to ``viewer`` (in order, on top) at once and return the layers."""
    added: list = []
    for _ in iter_add_layers(viewer, tuples, into=added):
        pass
    return added


def _same_output(layer, kwargs: dict, kind: str) -> bool:
    """``layer`` is an earlier output of this plugin for the same input and plane, of the same kind of layer."""
    old, new = layer.metadata or {}, kwargs.get("metadata") or {}
    return (layer._type_string == kind and "bundle_id" in old and old.get("input") == new.get("input")
            and old.get("plane") == new.get("plane") and old.get("channel") == new.get("channel")
            and old.get("kind") == new.get("kind"))


_SHOW_ON_NEXT_TURN = True  # a new layer is appended hidden and shown a turn later (iter_add_layers)
# napari 0.9 gives every Labels layer two drawing-tool overlays whose vispy visuals (~45 ms) are built in its append;
# a new labels layer is appended without them and gets them back on the next turn (iter_add_layers)
_LATER_OVERLAYS = ("polygon", "brush_stroke")
_DEFER_OVERLAYS = True


def _take_overlays(layer) -> dict:
    """The drawing-tool overlays of a new, not yet appended Labels layer, taken out of it (empty where this napari
    has none of that name: nothing is deferred then)."""
    overlays = getattr(layer, "_overlays", None)
    if not _DEFER_OVERLAYS or overlays is None:
        return {}
    return {key: overlays.pop(key) for key in _LATER_OVERLAYS if key in overlays}


def iter_add_layers(viewer, tuples: list[LayerTuple], replace: bool = False, into: list | None = None):
    """Add layers one event-loop turn at a time (a Job's ``on_result`` generator: napari repaints in between),
    appending each added layer to ``into``.

    A new visible layer is appended hidden and shown on the next turn, and a new labels layer gets its drawing-tool
    overlays (polygon, brush) a turn after its append: napari's append (its visual, the layer controls), the
    overlays' visuals and the first paint of the data then stall napari in separate turns, not one (worst stall
    115–120 → 95–108.5 ms in one run with the show alone; docs/benchmarks.md, "napari widgets").
    ``replace``: a layer of the same name that is this plugin's earlier output for the same input, plane and
    channel gets the new data and provenance in place (no ``[1]`` duplicates stacked on it)."""
    from napari.layers import Layer

    added = into if into is not None else []
    for data, kwargs, kind in tuples:
        kwargs = dict(kwargs)
        contour = kwargs.pop("contour", None)  # a Labels property that its constructor does not take
        name = kwargs.get("name")
        if replace and name in viewer.layers and _same_output(viewer.layers[name], kwargs, kind):
            layer = viewer.layers[name]
            layer.data = data
            layer.metadata = kwargs.get("metadata", {})
            if "contrast_limits" in kwargs:
                layer.contrast_limits = kwargs["contrast_limits"]
            added.append(layer)
            yield
            continue
        later = kwargs.get("visible", True) and _SHOW_ON_NEXT_TURN
        layer = Layer.create(data, {**kwargs, "visible": False} if later else kwargs, kind)
        if contour is not None:
            layer.contour = contour
        tools = _take_overlays(layer) if kind == "labels" else {}
        viewer.layers.append(layer)
        added.append(layer)
        try:
            yield
        finally:  # back even when the adding stops here (a closed widget): painting needs them
            if tools:  # the canvas builds their visuals now (it listens to the overlay dict)
                layer._overlays.update(tools)
        if tools:
            yield
        if later:
            layer.visible = True
            yield
