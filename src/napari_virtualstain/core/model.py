"""The network: a plain diffusers ``UNet2DModel``, with attention only at the coarsest level (CPU-friendly)."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from .errors import BundleError


def default_unet_config(
    in_channels: int,
    out_channels: int,
    sample_size: int = 128,
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128),
    layers_per_block: int = 1,
    attention_at_lowest: bool = True,
) -> dict:
    """A small UNet: 2**(levels-1) downsampling; self-attention only at the lowest resolution, where it is cheap."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention_at_lowest:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": min(8, min(block_out_channels)),
        "attention_head_dim": min(32, block_out_channels[-1]),
    }


def downsample_factor(unet_config: dict) -> int:
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


def build_unet(unet_config: dict) -> UNet2DModel:
    try:
        return UNet2DModel(**unet_config)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"config.json field 'unet' does not describe a diffusers UNet2DModel: {exc}") from None


class Denoiser(torch.nn.Module):
    """Wraps the UNet so every task calls ``denoiser(x, t)`` the same way; autocasts to fp16/bf16 on a GPU."""

    def __init__(self, unet: UNet2DModel, half: bool | None = None):
        super().__init__()
        self.unet = unet
        self.half = half

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        device = self.device
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        use_half = (device.type == "cuda") if self.half is None else (self.half and device.type in ("cuda", "mps"))
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_half):
            out = self.unet(x.to(device), t, class_labels=class_labels).sample
        return out.float()


def pick_device(requested: str | None = None) -> torch.device:
    """cuda -> mps -> cpu, unless the user asked for one; an unavailable request is an error, not a silent fallback."""
    from .errors import VirtualStainError

    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VirtualStainError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VirtualStainError("device 'mps' was requested but Apple MPS is not available; use --device cpu or auto")
    return dev
