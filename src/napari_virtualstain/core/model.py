"""The network: a UNet in diffusers' ``UNet2DModel`` layout (``unet.py``), with attention only at the coarsest level
(CPU-friendly)."""

from __future__ import annotations

import torch

from .errors import BundleError
from .unet import UNet


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


def build_unet(unet_config: dict) -> UNet:
    try:
        return UNet(**unet_config)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"config.json field 'unet' does not describe a UNet this plugin builds: {exc}") from None


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA cards with bf16, CPUs with AVX-512 bf16 / AMX (oneDNN's own check).

    On such CPUs a UNet forward ran ~3x faster under bf16 autocast; elsewhere bf16 is emulated and slower.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
            return False
    return False


def autocast_dtype(device: torch.device, half: bool | None) -> torch.dtype | None:
    """The reduced precision a forward pass runs in, or None for float32.

    ``half`` None = automatic: bf16 wherever it is fast (CUDA cards with bf16, CPUs with AVX-512 bf16 / AMX: ~1.6x
    faster per UNet pass, held-out Hoechst r unchanged within 0.005 — ``benchmarks/bench_speed.py``), fp16 on other
    GPUs, float32 elsewhere; True = bf16 where fast, fp16 on other GPUs and MPS; False = float32 (the reference).
    """
    if half is False:
        return None
    if fast_bf16(device):
        return torch.bfloat16
    if device.type == "cuda" or (half and device.type == "mps"):
        return torch.float16
    return None


def use_channels_last(device: torch.device) -> bool:
    """NHWC convolutions: ~1.2-1.3x faster per UNet pass on this CPU (oneDNN) and the fast layout on tensor cores."""
    return device.type in ("cpu", "cuda")


class Denoiser(torch.nn.Module):
    """Wraps the UNet so every task calls ``denoiser(x, t)`` the same way; autocasts to bf16/fp16 where fast and runs
    in channels-last layout where that is faster (outputs come back float32, contiguous).

    ``anchor_channels`` > 0: the network predicts a residual on top of the mean prediction mu(x), which is the last
    ``anchor_channels`` planes of its input (mean-anchored residual shift); the output is mu + residual.
    """

    def __init__(self, unet: UNet, half: bool | None = None, anchor_channels: int = 0,
                 channels_last: bool | None = None):
        super().__init__()
        self.unet = unet
        self.half = half
        self.anchor_channels = anchor_channels
        self.channels_last = use_channels_last(self.device) if channels_last is None else channels_last
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)

    def precision(self) -> str:
        dtype = autocast_dtype(self.device, self.half)
        return "float32" if dtype is None else str(dtype).replace("torch.", "")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        device = self.device
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        dtype = autocast_dtype(device, self.half)
        x = x.to(device)
        net_in = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.unet(net_in, t, class_labels=class_labels).sample
        out = out.float().contiguous()
        if self.anchor_channels:
            out = out + x[:, -self.anchor_channels :]
        return out


TTA_CHOICES = (1, 2, 4, 8)


def dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False) -> torch.Tensor:
    """One of the 8 flips/quarter turns of the last two axes (or its inverse)."""
    if inverse:
        x = torch.rot90(x, -k, dims=(-2, -1))
        return torch.flip(x, dims=(-1,)) if flip else x
    x = torch.flip(x, dims=(-1,)) if flip else x
    return torch.rot90(x, k, dims=(-2, -1))


class TTADenoiser(torch.nn.Module):
    """Test-time augmentation: the wrapped network's output averaged over ``n`` flips/quarter turns of its input
    (1: none; 2: + a mirror; 4: the quarter turns, as Cytoland; 8: all of them), each turned back before averaging.
    Works tile by tile and at every sampler step, so tiles, blocks and chains need nothing else; costs n passes."""

    def __init__(self, denoiser: torch.nn.Module, n: int):
        super().__init__()
        from .errors import VirtualStainError

        if n not in TTA_CHOICES:
            raise VirtualStainError(f"test-time augmentation takes {', '.join(map(str, TTA_CHOICES))} transforms, "
                                    f"not {n}")
        self.inner = denoiser
        self.n = n
        self.precision = denoiser.precision
        self.transforms = {1: [(0, False)], 2: [(0, False), (0, True)], 4: [(k, False) for k in range(4)],
                           8: [(k, f) for f in (False, True) for k in range(4)]}[n]

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for k, flip in self.transforms:
            out = self.inner(dihedral(x, k, flip), timestep, class_labels=class_labels)
            out = dihedral(out, k, flip, inverse=True)
            total = out if total is None else total + out
        return total / self.n if self.n > 1 else total


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
