"""Turn whatever array the user has into the (C, Y, X) float32 the network needs, or say clearly why not."""

from __future__ import annotations

import numpy as np

from .errors import VirtualStainError
from .normalize import as_float


def to_channels_first(
    image: np.ndarray,
    channel_names: list[str],
    channel_axis: int | None = None,
    what: str = "image",
) -> np.ndarray:
    """Arrange ``image`` as (C, Y, X) with C == len(channel_names).

    Without ``channel_axis`` a 2D image is one channel, a 3D image whose first axis has C entries is
    channels-first, and a trailing axis of 3/4 is taken as RGB(A) only where it matches C. Anything else
    (z-stacks, time-lapses, RGB for a grey model) is refused with a message that says how to pick a plane.
    """
    image = np.asarray(image)
    n = len(channel_names)
    names = ", ".join(channel_names)
    need = f"the checkpoint expects {n} input channel{'s' if n > 1 else ''} ({names})"
    if image.ndim < 2:
        raise VirtualStainError(f"{what} has shape {image.shape}; expected a 2D image (Y, X)")
    if channel_axis is not None:
        if not -image.ndim <= channel_axis < image.ndim:
            raise VirtualStainError(f"channel axis {channel_axis} is out of range for {what} of shape {image.shape}")
        image = np.moveaxis(image, channel_axis, 0)
        if image.ndim != 3:
            raise VirtualStainError(
                f"{what} has shape {image.shape} after moving the channel axis first; expected (C, Y, X). "
                "Pick one plane of the extra axes (--plane) or process them all (--all-planes)"
            )
        if image.shape[0] != n:
            raise VirtualStainError(f"{what} has {image.shape[0]} channels on axis {channel_axis}; {need}")
        return image
    if image.ndim == 2:
        if n != 1:
            raise VirtualStainError(f"{what} is a single-channel 2D image; {need}")
        return image[None]
    if image.ndim == 3:
        if image.shape[0] == n:
            return image
        if image.shape[-1] in (3, 4) and image.shape[0] > 4:
            if n == image.shape[-1]:
                return np.moveaxis(image, -1, 0)
            if n == 1:  # a colour camera's brightfield: its luminance (recorded as RGB_NOTE in the provenance)
                return rgb_to_luminance(image)[None]
            kind = "an RGB" if image.shape[-1] == 3 else "an RGBA"
            raise VirtualStainError(
                f"{what} is {kind} image of shape {image.shape}; {need}. Give one image per input channel "
                "(channels first) instead of a colour image"
            )
        raise VirtualStainError(
            f"{what} has shape {image.shape}; {need}. If the first axis is z or time, pick one plane "
            "(CLI: --plane INDEX; napari: the current plane) or predict every plane (--all-planes); "
            "if it holds channels, say which axis with --channel-axis"
        )
    raise VirtualStainError(
        f"{what} has {image.ndim} dimensions {image.shape}; {need}. Pick one plane of the leading axes "
        "(--plane T or --plane T,Z) or predict every plane (--all-planes), and give --channel-axis if channels "
        "are not first"
    )


LUMINANCE = (0.2125, 0.7154, 0.0721)  # Rec. 709 weights, as skimage.color.rgb2gray
RGB_NOTE = "RGB converted to luminance (0.2125 R + 0.7154 G + 0.0721 B)"


def is_colour_for_grey(image: np.ndarray, n_inputs: int, channel_axis: int | None = None) -> bool:
    """Whether ``to_channels_first`` turns this (Y, X, 3|4) colour image into one luminance plane."""
    shape = np.shape(image)
    return (n_inputs == 1 and channel_axis is None and len(shape) == 3 and shape[-1] in (3, 4) and shape[0] > 4)


def rgb_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) -> (...) float32 luminance; alpha is ignored."""
    rgb = np.asarray(rgb)
    return (rgb[..., 0] * np.float32(LUMINANCE[0]) + rgb[..., 1] * np.float32(LUMINANCE[1])
            + rgb[..., 2] * np.float32(LUMINANCE[2])).astype(np.float32)


def prepare_input(image: np.ndarray, channel_names: list[str], channel_axis: int | None = None, what: str = "image") -> np.ndarray:
    """Shape check + float32 conversion (uint8, uint16 and float images all become the same float scale)."""
    chw = to_channels_first(image, channel_names, channel_axis, what)
    return as_float(chw, what)


PIXEL_SIZE_TOLERANCE = 0.2  # beyond +-20 % the cells' size in pixels is not what the model learned


def pixel_size_warning(model_um: float | None, input_um: float | None, model_name: str = "the checkpoint") -> str | None:
    """A warning when the input's pixel size differs from the model's by more than ``PIXEL_SIZE_TOLERANCE``."""
    if not model_um or not input_um:
        return None
    ratio = input_um / model_um
    if abs(ratio - 1.0) <= PIXEL_SIZE_TOLERANCE:
        return None
    return (f"the image has {input_um:g} um pixels but {model_name} was trained at {model_um:g} um ({ratio:.2f}x): "
            "cells are not the size it learned and its predictions are unreliable. Resample to the model's pixel size "
            "(CLI: --rescale; napari: tick 'rescale to the checkpoint's pixel size') or correct the image's pixel "
            "size if its metadata is wrong (CLI: --pixel-size; napari: the layer's scale)")


def rescale_planes(chw: np.ndarray, factor: float) -> np.ndarray:
    """Resample (C, Y, X) by ``factor`` (< 1 shrinks; anti-aliased), linear interpolation, values preserved."""
    from skimage.transform import rescale

    out = [rescale(ch, factor, order=1, anti_aliasing=factor < 1, preserve_range=True) for ch in chw]
    return np.stack(out).astype(np.float32)


def resize_planes(chw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, y, x) -> (C, *shape), linear interpolation: a rescaled prediction back onto the input's pixel grid."""
    from skimage.transform import resize

    return np.stack([resize(ch, shape, order=1, preserve_range=True) for ch in chw]).astype(np.float32)


def labels_warning(image: np.ndarray, what: str = "the image") -> str | None:
    """A warning when ``image`` looks like instance labels or a mask (integers, mostly zero background, few distinct
    values), not a microscope image: the model would run on it and return nonsense without complaint."""
    a = np.asarray(image)
    if not np.issubdtype(a.dtype, np.integer) or a.size < 64:
        return None
    if a.size > 4_000_000:  # judged on an even subsample: this runs on napari's GUI thread before a run starts
        step = int(np.ceil(np.sqrt(a.size / 4_000_000)))
        a = a[..., ::step, ::step]
    zeros = float(np.count_nonzero(a == 0)) / a.size
    if zeros < 0.2:
        return None
    n = len(np.unique(a))
    if n > max(3, a.size // 1000):
        return None
    return (f"{what} looks like a labels image or mask ({n} distinct values, {zeros:.0%} zeros), not a microscope "
            "image; predictions from it are meaningless. Pick the brightfield (transmitted-light) channel/plane")
