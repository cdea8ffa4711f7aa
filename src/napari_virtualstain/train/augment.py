"""Augmentation for few training images (ranges after Cytoland, Liu et al. 2025): what a second microscope, a
second day or a second focus plane changes without changing the biology.

Geometric (input and target together): a rotation by any angle and a zoom of 0.8–1.25 (bilinear, reflected at the
crop's edge), on half of the crops — the flips and quarter turns of every crop come first, in ``random_batch``.
Intensity (input only; the stain is what it is): gamma 0.8–1.25, contrast 0.7–1.3 around the crop's mean, gain
0.8–1.2 and offset ±0.1 (normalised units), Gaussian noise of σ up to 0.05 and, on a fifth of the crops, a Gaussian
blur of σ 0.5–1.5 px. Every draw comes from the run's numpy generator, so a resumed run augments as one long run.
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


def _affine(both: torch.Tensor, angle: float, zoom: float) -> torch.Tensor:
    """Rotate by ``angle`` and magnify by ``zoom`` about the centre: (C, H, W) -> (C, H, W)."""
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=both.dtype)[None]
    grid = F.affine_grid(theta, [1, *both.shape], align_corners=False)
    return F.grid_sample(both[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def augment_batch(cond: torch.Tensor, target: torch.Tensor, rng: np.random.Generator,
                  n_image_inputs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of a (N, C, H, W) batch; intensity changes touch the first ``n_image_inputs`` input
    channels only (default: all; planes appended to the inputs, such as mu(x), keep their values)."""
    cond, target = cond.clone(), target.clone()
    n_in = cond.shape[1] if n_image_inputs is None else n_image_inputs
    for i in range(cond.shape[0]):
        if rng.random() < 0.5:
            both = _affine(torch.cat([cond[i], target[i]]), float(rng.uniform(0, 2 * math.pi)),
                           float(math.exp(rng.uniform(math.log(0.8), math.log(1.25)))))
            cond[i], target[i] = both[: cond.shape[1]], both[cond.shape[1]:]
        x = cond[i, :n_in]
        gamma = float(math.exp(rng.uniform(math.log(0.8), math.log(1.25))))
        lo, hi = x.amin(), x.amax()
        span = (hi - lo).clamp(min=1e-6)
        x = lo + span * ((x - lo) / span).clamp(0, 1) ** gamma
        m = x.mean()
        x = m + float(rng.uniform(0.7, 1.3)) * (x - m)
        x = float(rng.uniform(0.8, 1.2)) * x + float(rng.uniform(-0.1, 0.1))
        if rng.random() < 0.2:
            x = _blur(x, float(rng.uniform(0.5, 1.5)))
        sigma = float(rng.uniform(0, 0.05))
        x = x + sigma * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)).to(x.dtype)
        cond[i, :n_in] = x
    return cond, target
