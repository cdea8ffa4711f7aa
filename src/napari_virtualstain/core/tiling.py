"""Tiling, once for every task: pad -> overlapping tiles -> batched network calls -> smooth-window merge -> crop.

Diffusion samplers call :meth:`TilePlan.apply` at *every* step on the x̂0 (or eps) prediction and then take the
scheduler step on the whole canvas, so neighbouring tiles agree before noise is added and no seams build up.
GPU/CPU memory for the network is bounded by ``tile_size`` and ``batch_size``; only the canvas itself (a few floats
per pixel) grows with the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import VirtualStainError

MIN_IMAGE_SIZE = 8
log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS/CPU allocation failures, whatever torch version raises them."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reflect_pad(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Reflect-pad the last two axes at the bottom/right, repeating the reflection when the pad exceeds the size."""
    while bottom > 0 or right > 0:
        pb = min(bottom, x.shape[-2] - 1)
        pr = min(right, x.shape[-1] - 1)
        x = F.pad(x, (0, pr, 0, pb), mode="reflect")
        bottom -= pb
        right -= pr
    return x


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return sorted({round(i * (length - tile) / (n - 1)) for i in range(n)})


def _ramp(n: int, overlap: int, taper_start: bool, taper_end: bool) -> torch.Tensor:
    """1 in the middle, a sin^2 ramp over ``overlap`` pixels on sides that have a neighbouring tile."""
    w = torch.ones(n, dtype=torch.float32)
    if overlap > 0:
        ramp = torch.sin((torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap * math.pi / 2) ** 2
        if taper_start:
            w[:overlap] = ramp
        if taper_end:
            w[n - overlap :] = torch.minimum(w[n - overlap :], ramp.flip(0))
    return w


@dataclass(frozen=True)
class Tile:
    y: int
    x: int
    row_window: torch.Tensor  # (tile_h,): the blend window is row x column (a plane per tile would cost a field's
    col_window: torch.Tensor  # (tile_w,)  worth of memory for a plan of big blocks)

    @property
    def window(self) -> torch.Tensor:
        return self.row_window[:, None] * self.col_window[None, :]


class TilePlan:
    """How an (H, W) image is cut into tiles of ``tile_size`` with ``overlap`` for a network that downsamples by
    ``multiple``; images smaller than a tile are reflect-padded up to it, and every size is padded to ``multiple``."""

    def __init__(self, height: int, width: int, tile_size: int, overlap: int, multiple: int = 8):
        if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
            raise VirtualStainError(
                f"image is {height}x{width} pixels; at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} is needed"
            )
        if tile_size % multiple:
            raise VirtualStainError(
                f"tile size {tile_size} must be a multiple of {multiple} (the network's downsampling factor)"
            )
        if not 0 <= overlap < tile_size // 2 + 1:
            raise VirtualStainError(f"tile overlap {overlap} must be between 0 and half the tile size ({tile_size // 2})")
        self.height, self.width = height, width
        self.tile_size, self.overlap, self.multiple = tile_size, overlap, multiple
        ph = max(tile_size, math.ceil(height / multiple) * multiple) if height > tile_size else tile_size
        pw = max(tile_size, math.ceil(width / multiple) * multiple) if width > tile_size else tile_size
        self.padded_shape = (ph, pw)
        ys, xs = _starts(ph, tile_size, overlap), _starts(pw, tile_size, overlap)
        self.tiles: list[Tile] = []
        self._windows: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.oom_retries = 0  # network calls split after the device ran out of memory (recorded in provenance)
        self._max_tiles_per_call: int | None = None
        # the tiles form a product grid of separable windows, so the merged weight is row sum x column sum:
        # two vectors instead of a weight plane the size of the image
        self.row_weight, self.col_weight = torch.zeros(ph), torch.zeros(pw)
        wxs = [_ramp(tile_size, overlap, x > 0, x + tile_size < pw) for x in xs]
        for x, wx in zip(xs, wxs):
            self.col_weight[x : x + tile_size] += wx
        for y in ys:
            wy = _ramp(tile_size, overlap, y > 0, y + tile_size < ph)
            self.row_weight[y : y + tile_size] += wy
            for x, wx in zip(xs, wxs):
                self.tiles.append(Tile(y, x, wy, wx))

    def __len__(self) -> int:
        return len(self.tiles)

    def _window_on(self, device: torch.device, index: int) -> torch.Tensor:
        """Tile ``index``'s blend window on ``device`` (its row and column vectors copied there once per plan, not
        once per tile and step; the outer product is made per call, a tile's worth of work)."""
        tl = self.tiles[index]
        if device.type == "cpu":
            return tl.window
        if device not in self._windows:
            self._windows[device] = [(t.row_window.to(device), t.col_window.to(device)) for t in self.tiles]
        wy, wx = self._windows[device][index]
        return wy[:, None] * wx[None, :]

    def _call(self, fn, batch: torch.Tensor, b: int) -> torch.Tensor:
        """``fn(batch)``; when the device runs out of memory, the same tiles in two halves (and fewer tiles per call
        from then on), down to one tile — then a message that says what to change."""
        try:
            return fn(batch)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; everything else re-raised
            if not is_out_of_memory(exc):
                raise
        free_device_memory()
        n = batch.shape[0] // b
        if n <= 1:
            raise VirtualStainError(
                f"the device ran out of memory even for one tile of {self.tile_size}x{self.tile_size} pixels; use a "
                f"smaller tile size (--tile-size {max(self.multiple, self.tile_size // 2 // self.multiple * self.multiple)}"
                ") or --device cpu") from None
        self.oom_retries += 1
        self._max_tiles_per_call = max(1, n // 2)
        log.warning("out of memory with %d tiles per network call; retrying with %d", n, n // 2)
        half = (n // 2) * b
        return torch.cat([self._call(fn, batch[:half], b), self._call(fn, batch[half:], b)])

    def describe(self) -> dict:
        """Tile settings for provenance."""
        return {
            "tile_size": self.tile_size,
            "tile_overlap": self.overlap,
            "num_tiles": len(self.tiles),
            "padded_shape": list(self.padded_shape),
            **({"oom_retries": self.oom_retries} if self.oom_retries else {}),
        }

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return reflect_pad(x, self.padded_shape[0] - self.height, self.padded_shape[1] - self.width)

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.height, : self.width]

    def pad_once(self, x: torch.Tensor) -> torch.Tensor:
        """``pad``, unless ``x`` already has the padded shape (a caller that padded its big input up front)."""
        return x if tuple(x.shape[-2:]) == tuple(self.padded_shape) else self.pad(x)

    def apply(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor | Sequence[torch.Tensor] | Callable[[int, int, int], torch.Tensor],
        batch_size: int = 4,
        on_tile: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Run ``fn`` over all tiles of ``inputs`` (B, C, H, W) and merge its outputs into (B, C_out, H, W).

        ``inputs`` may be several canvases (e.g. x_t and the condition): they are joined along channels tile by tile,
        never as a whole image, and one with batch 1 serves all B images — the whole-image concatenation was the
        largest allocation of a big field. Or a function ``(y, x, tile_size) ->`` the (B, C, t, t) input of the tile
        at (y, x) of the padded image, made when the tile is reached (a big field's blocks: no whole input canvas).
        ``batch_size`` counts network samples: the B images of a seed batch share it. ``on_tile(done, total)`` is
        called after each network call.
        """
        if callable(inputs):
            return self._apply(fn, inputs, 1, batch_size, on_tile)
        parts = [self.pad_once(p) for p in ([inputs] if isinstance(inputs, torch.Tensor) else inputs)]
        b = max(p.shape[0] for p in parts)
        t = self.tile_size

        def tile_of(y: int, x: int, _: int) -> torch.Tensor:
            pieces = [p[:, :, y : y + t, x : x + t] for p in parts]
            pieces = [q.expand(b, *q.shape[1:]) if q.shape[0] != b else q for q in pieces]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

        return self._apply(fn, tile_of, b, batch_size, on_tile)

    def _apply(self, fn, tile_of: Callable[[int, int, int], torch.Tensor], b: int, batch_size: int,
               on_tile) -> torch.Tensor:
        per_call = max(1, batch_size // b)
        if self._max_tiles_per_call:
            per_call = min(per_call, self._max_tiles_per_call)
        out = None
        t = self.tile_size
        for start in range(0, len(self.tiles), per_call):
            chunk = self.tiles[start : start + per_call]
            batch = torch.cat([tile_of(tl.y, tl.x, t) for tl in chunk], dim=0)
            pred = self._call(fn, batch, b).float()
            if out is None:
                out = torch.zeros((b, pred.shape[1], *self.padded_shape), device=pred.device)
            for i, tl in enumerate(chunk):
                w = self._window_on(pred.device, start + i)
                out[:, :, tl.y : tl.y + t, tl.x : tl.x + t] += pred[i * b : (i + 1) * b] * w
            del batch, pred  # not alive while the next call runs: for a plan of blocks, a whole block's output
            if on_tile is not None:
                on_tile(min(start + per_call, len(self.tiles)), len(self.tiles))
        out /= self.row_weight.to(out.device)[:, None]  # in place: no second canvas, no weight plane
        out /= self.col_weight.to(out.device)
        return self.crop(out)


def pack_in_place(view: np.ndarray) -> np.ndarray:
    """A C-contiguous (C, H, W) copy of a cropped (C, Hp, Wp) view, written into the view's own buffer.

    Why: a merged canvas is cropped from its padded size; decoding or writing the crop would otherwise copy the whole
    output once more (320 MB for a 4096² field with 5 channels). Rows move towards the buffer's start in order, and a
    row's destination never reaches a row not yet moved, so the copy is safe in place.
    """
    if view.flags.c_contiguous:
        return view
    c, h, w = view.shape
    if view.strides[2] != view.itemsize or view.strides[1] < w * view.itemsize or view.strides[0] < h * view.strides[1]:
        return np.ascontiguousarray(view)  # not a crop of a C-ordered canvas: copy
    span = (c - 1) * view.strides[0] // view.itemsize + (h - 1) * view.strides[1] // view.itemsize + w
    flat = np.lib.stride_tricks.as_strided(view, shape=(span,), strides=(view.itemsize,))
    for i in range(c):
        for y in range(h):
            start = (i * h + y) * w
            flat[start : start + w] = view[i, y]
    return flat[: c * h * w].reshape(c, h, w)
