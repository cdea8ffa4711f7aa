"""Sample data for napari's *File > Open Sample* menu.

The scratch-assay time-lapse comes from the optional ``ndev-sampledata``
package (``pip install napari-virtualstain[data]``); nothing is downloaded at
run time. This module must stay free of torch and Qt imports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SCRATCH_ASSAY_CHANNELS",
    "SCRATCH_ASSAY_PIXEL_SIZE_UM",
    "scratch_assay",
    "scratch_assay_path",
]

_NDEV_PACKAGE = "ndev_sampledata"
_SCRATCH_ASSAY_RELPATH = ("samples", "scratch-assay-labeled-10T-2Ch.tiff")

#: Pixel size (um) of the scratch assay in Y and X (from its OME metadata).
SCRATCH_ASSAY_PIXEL_SIZE_UM = 0.619
#: Channel order of the CTYX stack: C0 Hoechst, C1 oblique transmitted light,
#: C2 nuclei instance labels, C3 cell (cytoplasm) instance labels.
SCRATCH_ASSAY_CHANNELS = ("hoechst", "brightfield", "nuclei_labels", "cell_labels")

_MISSING_MESSAGE = (
    "The scratch-assay sample needs the 'ndev-sampledata' package. Install it with "
    "`pip install ndev-sampledata` (or `pip install napari-virtualstain[data]`)."
)


REAL_COLORMAP = "magenta"  # measured stains; predicted ones take their stain colour (cyan for nuclei)

def scratch_assay_path() -> Path:
    """Path of ``scratch-assay-labeled-10T-2Ch.tiff`` inside ``ndev-sampledata``.

    The package is located without importing it (its ``__init__`` pulls in
    bioio, which we do not need just to read a TIFF).

    Raises
    ------
    ModuleNotFoundError
        If ``ndev-sampledata`` is not installed.
    FileNotFoundError
        If the installed package does not contain the file.
    """
    spec = importlib.util.find_spec(_NDEV_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_MISSING_MESSAGE, name=_NDEV_PACKAGE)
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_SCRATCH_ASSAY_RELPATH)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'{'/'.join(_SCRATCH_ASSAY_RELPATH)}' not found in the installed "
        f"ndev-sampledata package ({list(spec.submodule_search_locations)}). "
        "Reinstall it with `pip install --force-reinstall ndev-sampledata`."
    )


def _read_ctyx(path: Path) -> np.ndarray:
    import tifffile

    data = tifffile.imread(path)
    if data.ndim != 4 or data.shape[0] != len(SCRATCH_ASSAY_CHANNELS):
        raise ValueError(f"expected a CTYX stack with 4 channels in {path}, got shape {data.shape}")
    return data


def _display_range(channel: np.ndarray) -> tuple[float, float]:
    """Robust contrast limits (0.5-99.8 percentiles over the whole time-lapse)."""
    low, high = np.percentile(channel, (0.5, 99.8))
    return float(low), float(max(high, low + 1))


def scratch_assay() -> list[tuple[Any, dict[str, Any], str]]:
    """Scratch-assay time-lapse (10 time points): brightfield, Hoechst and nuclei labels.

    Returns napari ``LayerDataTuple``s ``(data, kwargs, layer_type)``:

    1. ``"Brightfield (scratch assay)"``: oblique transmitted light, (T, Y, X) uint16, gray;
    2. ``"Hoechst (real)"``: the measured nuclear stain, (T, Y, X) uint16, magenta, additive (virtual: cyan);
    3. ``"Nuclei labels (real)"``: nuclei instance labels, (T, Y, X) integer labels.

    All layers share ``scale = (1, 0.619, 0.619)`` (time, um, um).
    """
    path = scratch_assay_path()
    data = _read_ctyx(path)
    hoechst, brightfield, nuclei, _cells = data
    scale = (1.0, SCRATCH_ASSAY_PIXEL_SIZE_UM, SCRATCH_ASSAY_PIXEL_SIZE_UM)
    metadata = {"source": "ndev-sampledata", "path": str(path), "axes": "TYX"}

    return [
        (
            brightfield,
            {
                "name": "Brightfield (scratch assay)",
                "colormap": "gray",
                "contrast_limits": _display_range(brightfield),
                "blending": "translucent",
                "scale": scale,
                "metadata": dict(metadata, channel="oblique transmitted light"),
            },
            "image",
        ),
        (
            hoechst,
            {
                "name": "Hoechst (real)",
                "colormap": REAL_COLORMAP,  # virtual stains are cyan: white where they agree (docs/user_guide.md)
                "contrast_limits": _display_range(hoechst),
                "blending": "additive",
                "scale": scale,
                "metadata": dict(metadata, channel="Hoechst 33342"),
            },
            "image",
        ),
        (
            nuclei,
            {
                "name": "Nuclei labels (real)",
                "scale": scale,
                "opacity": 0.5,
                "metadata": dict(metadata, channel="nuclei instance labels"),
            },
            "labels",
        ),
    ]
