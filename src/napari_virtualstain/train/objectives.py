"""Training losses that weigh what a biologist measures: the nuclei, their outline, their position.

All take the prediction and the target in the bundle's normalised units ([-1, 1]) and the output channels' kinds.

- ``mse`` (default): mean squared error over every pixel and channel.
- ``l1_msssim``: 0.5·L1 + 0.5·(1 − MS-SSIM) on values mapped to [0, 1] (Cytoland's fine-tuning loss; MS-SSIM of
  Wang et al. 2003, eq. 7, with as many scales as the crop allows: 3 for 128² crops).
- ``spotlight``: a foreground-weighted MSE on the stains plus soft Dice (Milletari et al. 2016) on the foreground
  channels (Spotlight, Kalinin et al. 2025): background pixels, most of a frame, no longer dominate the stain's loss,
  and the foreground is scored as a region rather than pixel by pixel. Boundary and distance channels keep MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import VirtualStainError

LOSSES = ("mse", "l1_msssim", "spotlight")
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
SPOTLIGHT_BACKGROUND = 0.1  # weight of a background pixel in the stain loss (a foreground pixel weighs 1)


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, win: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean luminance·contrast·structure and contrast·structure of (N, C, H, W) images in [0, 1] (valid window)."""
    c1, c2 = 0.01**2, 0.03**2
    ch = a.shape[1]
    wx = win.view(1, 1, 1, -1).expand(ch, 1, 1, -1)
    wy = win.view(1, 1, -1, 1).expand(ch, 1, -1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wx, groups=ch), wy, groups=ch)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (lum * cs).mean(dim=(2, 3)), cs.mean(dim=(2, 3))


def ms_ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """MS-SSIM per image and channel (N, C) of images in [0, 1]; scales: as many (≤ 5) as keep the window inside."""
    scales = 1
    while scales < len(MSSSIM_WEIGHTS) and min(a.shape[-2:]) // 2**scales >= win_size:
        scales += 1
    weights = torch.tensor(MSSSIM_WEIGHTS[:scales], device=a.device)
    weights = weights / weights.sum()
    win = _gaussian_window(win_size, device=a.device)
    parts = []
    for s in range(scales):
        full, cs = _ssim_terms(a, b, win)
        parts.append(full if s == scales - 1 else cs)
        if s < scales - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack([p.clamp(min=1e-6) for p in parts])  # (S, N, C): negative cs would break the power
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)


def soft_dice(p: torch.Tensor, t: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice per image, averaged: p, t in [0, 1], (N, H, W)."""
    inter = (p * t).sum(dim=(1, 2))
    return (1 - (2 * inter + eps) / (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2)) + eps)).mean()


def reconstruction_loss(name: str, pred: torch.Tensor, target: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """The training loss ``name`` (module doc) of a predicted x0 against the target, both (N, C, H, W) in [-1, 1]."""
    pred, target = pred.float(), target.float()
    if name == "mse":
        return F.mse_loss(pred, target)
    if name == "l1_msssim":
        p01, t01 = ((pred + 1) / 2).clamp(0, 1), ((target + 1) / 2).clamp(0, 1)
        # SSIM's variances are differences of squares: in bf16 they cancel to noise (and NaN); always float32
        with torch.autocast(device_type=pred.device.type, enabled=False):
            structure = (1 - ms_ssim(p01, t01)).mean()
        return 0.5 * F.l1_loss(pred, target) / 2 + 0.5 * structure
    if name != "spotlight":
        raise VirtualStainError(f"loss {name!r}: use one of {', '.join(LOSSES)}")
    fg_idx = [i for i, k in enumerate(kinds) if k == "foreground"]
    stain_idx = [i for i, k in enumerate(kinds) if k == "stain"]
    other = [i for i, k in enumerate(kinds) if k not in ("foreground", "stain")]
    if fg_idx:  # the first labels set's foreground (nuclei for a nuclear stain) marks where the stain matters
        mask = (target[:, fg_idx[0]] > 0).float()
    else:  # no labels: the brighter-than-average part of each target crop
        mask = (target[:, stain_idx].mean(1) > target[:, stain_idx].mean(dim=(1, 2, 3), keepdim=True)[:, 0]).float()
    weight = SPOTLIGHT_BACKGROUND + (1 - SPOTLIGHT_BACKGROUND) * mask
    terms = []
    if stain_idx:
        err = ((pred[:, stain_idx] - target[:, stain_idx]) ** 2).mean(1)
        terms.append((weight * err).sum() / weight.sum())
    for i in fg_idx:
        terms.append(F.mse_loss(pred[:, i], target[:, i]) + soft_dice(((pred[:, i] + 1) / 2).clamp(0, 1),
                                                                      (target[:, i] + 1) / 2))
    if other:
        terms.append(F.mse_loss(pred[:, other], target[:, other]))
    return sum(terms) / len(terms)
