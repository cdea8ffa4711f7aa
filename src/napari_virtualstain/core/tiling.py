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
    window: torch.Tensor  # (tile_h, tile_w)


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
        self._windows: dict[torch.device, list[torch.Tensor]] = {}
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
                self.tiles.append(Tile(y, x, wy[:, None] * wx[None, :]))

    def __len__(self) -> int:
        return len(self.tiles)

    def _window_on(self, device: torch.device, index: int) -> torch.Tensor:
        """Tile ``index``'s blend window on ``device``, copied there once per plan (not once per tile and step)."""
        if device.type == "cpu":
            return self.tiles[index].window
        if device not in self._windows:
            self._windows[device] = [tl.window.to(device) for tl in self.tiles]
        return self._windows[device][index]

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

    def apply(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        inputs: torch.Tensor | Sequence[torch.Tensor],
        batch_size: int = 4,
        on_tile: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Run ``fn`` over all tiles of ``inputs`` (B, C, H, W) and merge its outputs into (B, C_out, H, W).

        ``inputs`` may be several canvases (e.g. x_t and the condition): they are joined along channels tile by tile,
        never as a whole image, and one with batch 1 serves all B images — the whole-image concatenation was the
        largest allocation of a big field. ``batch_size`` counts network samples: the B images of a seed batch share
        it. ``on_tile(done, total)`` is called after each network call.
        """
        parts = [self.pad(p) for p in ([inputs] if isinstance(inputs, torch.Tensor) else inputs)]
        b = max(p.shape[0] for p in parts)
        per_call = max(1, batch_size // b)
        if self._max_tiles_per_call:
            per_call = min(per_call, self._max_tiles_per_call)
        out = None
        t = self.tile_size

        def tile_of(tl: Tile) -> torch.Tensor:
            pieces = [p[:, :, tl.y : tl.y + t, tl.x : tl.x + t] for p in parts]
            pieces = [q.expand(b, *q.shape[1:]) if q.shape[0] != b else q for q in pieces]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

        for start in range(0, len(self.tiles), per_call):
            chunk = self.tiles[start : start + per_call]
            batch = torch.cat([tile_of(tl) for tl in chunk], dim=0)
            pred = self._call(fn, batch, b).float()
            if out is None:
                out = torch.zeros((b, pred.shape[1], *self.padded_shape), device=pred.device)
            for i, tl in enumerate(chunk):
                w = self._window_on(pred.device, start + i)
                out[:, :, tl.y : tl.y + t, tl.x : tl.x + t] += pred[i * b : (i + 1) * b] * w
            if on_tile is not None:
                on_tile(min(start + per_call, len(self.tiles)), len(self.tiles))
        out /= self.row_weight.to(out.device)[:, None]  # in place: no second canvas, no weight plane
        out /= self.col_weight.to(out.device)
        return self.crop(out)
