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
    "nfkb_wells",
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


#: BBBC014 NF-kB wells: held-out crops (training read rows 0-767 of each well; configs/demo-nfkb.yaml)
NFKB_CROP = (slice(768, 1024), slice(1104, 1360))
NFKB_WELLS = {"A12": "unstimulated: NF-kB in the cytoplasm", "A01": "TNF-alpha: NF-kB in the nucleus"}


def nfkb_data_dir() -> Path:
    """Where the BBBC014 wells are: ``$VIRTUALSTAIN_SHARED_DATA/nfkb_translocation``, else the project's
    ``shared/data`` beside a source checkout. BBBC014 is not on PyPI, so a pip install has no copy of its own."""
    import os

    roots = [Path(os.environ["VIRTUALSTAIN_SHARED_DATA"])] if os.environ.get("VIRTUALSTAIN_SHARED_DATA") else []
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    for root in roots:
        if (root / "nfkb_translocation" / "A01_nfkb.tif").is_file():
            return root / "nfkb_translocation"
    raise FileNotFoundError(
        "The NF-kB sample reads BBBC014 (wells A01/A12, NF-kB and DNA TIFFs; Broad Bioimage Benchmark Collection, "
        "also in CellProfiler's examples): put the four files A01_nfkb.tif, A01_dna.tif, A12_nfkb.tif, A12_dna.tif in "
        "a folder 'nfkb_translocation' and set VIRTUALSTAIN_SHARED_DATA to the folder above it")


def nfkb_wells() -> list[tuple[Any, dict[str, Any], str]]:
    """Held-out 256 x 256 crops of both NF-kB wells, channels stacked as ``demo-nfkb`` reads them (NF-kB, DNA):
    translate 'A12' to A01 (or back) with the Translate condition widget; the class is in each layer's name."""
    import tifffile

    folder = nfkb_data_dir()
    out = []
    for well, what in NFKB_WELLS.items():
        stack = np.stack([tifffile.imread(folder / f"{well}_{ch}.tif")[NFKB_CROP] for ch in ("nfkb", "dna")])
        out.append((stack, {
            "name": f"{well} NF-kB + DNA (held out)", "contrast_limits": _display_range(stack),
            "metadata": {"source": "BBBC014 (Broad Bioimage Benchmark Collection)", "class": well,
                         "channels": ["NF-kB", "DNA"], "what": what, "crop": "rows 768-1023, columns 1104-1359"},
        }, "image"))
    return out
