"""Augmentation for few training images (ranges after Cytoland, Liu et al. 2025): what a second microscope, a
second day or a second focus plane changes without changing the biology.

Geometric (input and target together): a rotation by any angle and a zoom of 0.8–1.25 (bilinear, reflected at the
crop's edge), on half of the crops — the flips and quarter turns of every crop come first, in ``random_batch``.
Intensity (input only; the stain is what it is): gamma 0.8–1.25, contrast 0.7–1.3 around the crop's mean, gain
0.8–1.2 and offset ±0.1 (normalised units), Gaussian noise of σ up to 0.05 and, on a fifth of the crops, a Gaussian
blur of σ 0.5–1.5 px. Every draw comes from the run's numpy generator, so a resumed run augments as one long run.

Elastic (``elastic`` = σ px > 0; input and target together, on half of the crops): a smooth random displacement —
Gaussian offsets of σ px at a 4 × 4 grid of control points, bicubically interpolated over the crop — composed with
the rotation/zoom in one resampling; the deformation that lets a U-Net learn from very few images (Ronneberger et
al. 2015). Off by default, and drawn only when on, so runs without it keep their random streams.

Per plane (``plane_jitter``; input only): each input plane gets its own gain 0.9–1.1 and offset ±0.05 on top of the
shared change. Every plane is normalised by its own percentiles, so a crop or a new field moves the planes of a
z-stack apart, while the shared draws move them together. Off by default, drawn only when on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    ch = img.shape[0]
    t = F.pad(img[None], (r, r, r, r), mode="reflect")
    t = F.conv2d(t, g.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)
    t = F.conv2d(t, g.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)
    return t[0]


ELASTIC_POINTS = 4  # control points per axis of the elastic displacement field


def _affine(both: torch.Tensor, angle: float, zoom: float, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate by ``angle`` and magnify by ``zoom`` about the centre, then (optionally) displace every output pixel's
    sampling point by ``displacement`` (2, H, W) px (x, y): (C, H, W) -> (C, H, W), one bilinear resampling."""
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=both.dtype)[None]
    grid = F.affine_grid(theta, [1, *both.shape], align_corners=False)
    if displacement is not None:
        h, w = both.shape[-2:]
        scale = torch.tensor([2.0 / w, 2.0 / h], dtype=both.dtype)  # px -> grid_sample's [-1, 1] units
        grid = grid + displacement.permute(1, 2, 0)[None].to(both.dtype) * scale
    return F.grid_sample(both[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def elastic_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """A smooth random displacement (2, H, W) in px: N(0, sigma) offsets at ELASTIC_POINTS² control points,
    bicubically interpolated."""
    coarse = torch.from_numpy(rng.normal(0.0, sigma, (1, 2, ELASTIC_POINTS, ELASTIC_POINTS)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0]


def augment_batch(cond: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
                  n_image_inputs: int | None = None, elastic: float = 0.0,
                  plane_jitter: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of a (N, C, H, W) batch; intensity changes touch the first ``n_image_inputs`` input
    channels only (default: all; planes appended to the inputs, such as mu(x), keep their values); ``elastic``:
    the displacement σ in px (module doc; 0 = none); ``plane_jitter``: a gain and offset per plane as well."""
    cond, target = cond.clone(), target.clone()
    n_in = cond.shape[1] if n_image_inputs is None else n_image_inputs
    for i in range(cond.shape[0]):
        turn = rng.random() < 0.5
        angle, zoom = ((float(rng.uniform(0, 2 * math.pi)), float(math.exp(rng.uniform(math.log(0.8), math.log(1.25)))))
                       if turn else (0.0, 1.0))
        field = elastic_field(cond.shape[-2:], elastic, rng) if elastic > 0 and rng.random() < 0.5 else None
        if turn or field is not None:
            both = _affine(torch.cat([cond[i], target[i]]), angle, zoom, field)
            cond[i], target[i] = both[: cond.shape[1]], both[cond.shape[1]:]
        x = cond[i, :n_in]
        gamma = float(math.exp(rng.uniform(math.log(0.8), math.log(1.25))))
        lo, hi = x.amin(), x.amax()
        span = (hi - lo).clamp(min=1e-6)
        x = lo + span * ((x - lo) / span).clamp(0, 1) ** gamma
        m = x.mean()
        x = m + float(rng.uniform(0.7, 1.3)) * (x - m)
        x = float(rng.uniform(0.8, 1.2)) * x + float(rng.uniform(-0.1, 0.1))
        if plane_jitter:
            gain = torch.from_numpy(rng.uniform(0.9, 1.1, n_in).astype(np.float32)).to(x.dtype)
            offset = torch.from_numpy(rng.uniform(-0.05, 0.05, n_in).astype(np.float32)).to(x.dtype)
            x = gain[:, None, None] * x + offset[:, None, None]
        if rng.random() < 0.2:
            x = _blur(x, float(rng.uniform(0.5, 1.5)))
        sigma = float(rng.uniform(0, 0.05))
        x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)).to(x.dtype)
        cond[i, :n_in] = x
    return cond, target
