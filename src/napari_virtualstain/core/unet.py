"""The project's UNet: the layout of diffusers' ``UNet2DModel`` for the blocks our bundles use, as plain modules.

Why not diffusers' class itself: importing it pulls in torch._dynamo, sympy and scipy.stats (~160 MB resident and
2–4 s before a CLI prediction starts on this project's CPUs; docs/benchmarks.md, "Memory") for a network of a few
plain layers. This module holds the same layers under the same parameter names, so every bundle's safetensors load
unchanged and the outputs match ``UNet2DModel`` (``tests/test_unet.py`` checks both against diffusers). Supported: ``DownBlock2D`` /
``AttnDownBlock2D`` down, ``UpBlock2D`` / ``AttnUpBlock2D`` up, a mid block of resnet-attention-resnet, sinusoidal
("positional") timestep embedding and an optional class embedding (``num_class_embeds``).

Shapes, as in DDPM's UNet (Ho et al. 2020): each level is ``layers_per_block`` residual blocks (GroupNorm, SiLU,
3x3 conv, + the timestep embedding, GroupNorm, SiLU, 3x3 conv, + the input) then a stride-2 conv; the way up
concatenates the matching skip before each of ``layers_per_block + 1`` residual blocks and upsamples by nearest
neighbour + 3x3 conv. Self-attention (one GroupNorm, q/k/v projections, scaled dot product, output projection,
+ the input) follows each residual block of an ``Attn*`` level and the first block of the middle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
#: the other settings of diffusers' UNet2DModel, accepted at their defaults only
DIFFUSERS_DEFAULTS = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
                      "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
                      "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
                      "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attn_norm_num_groups": None,
                      "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
                      "num_train_timesteps": None}


@dataclass
class UNetOutput:
    """What a forward pass returns (named as diffusers' ``UNet2DOutput``, so callers read ``.sample``)."""

    sample: torch.Tensor


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; DDPM), cosines first: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/h)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """Linear, SiLU, linear: the sinusoidal embedding mapped to the width the residual blocks add."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResBlock(nn.Module):
    """Pre-norm residual block with the timestep embedding added after the first conv; 1x1 shortcut on a width change."""

    def __init__(self, c_in: int, c_out: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.nonlinearity(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels of a (coarse) feature map, with a residual connection."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float):
        super().__init__()
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' [linear, dropout]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.group_norm(x.view(b, c, hgt * wid)).transpose(1, 2)  # (b, pixels, c)
        q, k, v = (proj(h).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c).to(q.dtype)
        h = self.to_out[0](h)
        return h.transpose(-1, -2).reshape(b, c, hgt, wid) + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """Residual blocks (each followed by attention on an ``AttnDownBlock2D`` level), then a stride-2 conv unless
    last; returns the output and every intermediate state the way up concatenates."""

    def __init__(self, c_in, c_out, n, temb, groups, eps, head_dim, attention: bool, downsample: bool):
        super().__init__()
        resnets, attentions = [], []
        for i in range(n):  # built interleaved, as diffusers does: the same seed draws the same initial weights
            resnets.append(ResBlock(c_in if i == 0 else c_out, c_out, temb, groups, eps))
            attentions += [SelfAttention(c_out, head_dim, groups, eps)] if attention else []
        if attention:  # registered before the resnets: diffusers' parameter order
            self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def forward(self, x, temb):
        states = []
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(x, temb)
            x = attn(x) if attn is not None else x
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpLevel(nn.Module):
    """``n`` residual blocks, each on [x, the matching skip] (attention after each on an ``AttnUpBlock2D`` level),
    then nearest-neighbour upsampling + conv unless last."""

    def __init__(self, c_in, c_prev, c_out, n, temb, groups, eps, head_dim, attention: bool, upsample: bool):
        super().__init__()
        resnets, attentions = [], []
        for i in range(n):
            resnets.append(ResBlock((c_prev if i == 0 else c_out) + (c_in if i == n - 1 else c_out), c_out, temb,
                                    groups, eps))
            attentions += [SelfAttention(c_out, head_dim, groups, eps)] if attention else []
        if attention:
            self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if upsample else None

    def forward(self, x, skips: list, temb):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            x = attn(x) if attn is not None else x
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, temb, groups, eps, head_dim):
        super().__init__()
        first = ResBlock(channels, channels, temb, groups, eps)  # built resnet, attention, resnet (diffusers' order)
        self.attentions = nn.ModuleList([SelfAttention(channels, head_dim, groups, eps)])
        self.resnets = nn.ModuleList([first, ResBlock(channels, channels, temb, groups, eps)])

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x), temb)


class UNet(nn.Module):
    """``UNet(**bundle_config["unet"])``; ``forward(x, t, class_labels)`` returns ``UNetOutput(sample=...)``."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels, down_block_types, up_block_types,
                 layers_per_block: int = 2, norm_num_groups: int = 32, attention_head_dim: int | None = 8,
                 num_class_embeds: int | None = None, norm_eps: float = 1e-5, sample_size=None, **others):
        super().__init__()
        unknown = sorted(k for k in others if k not in DIFFUSERS_DEFAULTS)
        changed = sorted(k for k, v in others.items() if k in DIFFUSERS_DEFAULTS and v != DIFFUSERS_DEFAULTS[k])
        if unknown or changed:
            raise ValueError(f"unsupported UNet settings: {', '.join(unknown + changed)}")
        widths = list(block_out_channels)
        n = len(widths)
        if len(down_block_types) != n or len(up_block_types) != n:
            raise ValueError(f"{n} block_out_channels need {n} down_block_types and {n} up_block_types")
        bad = [b for b in down_block_types if b not in DOWN_BLOCKS] + [b for b in up_block_types if b not in UP_BLOCKS]
        if bad:
            raise ValueError(f"unsupported block types {', '.join(bad)} (this UNet builds {', '.join(DOWN_BLOCKS + UP_BLOCKS)})")
        self.sample_size, self.in_channels, self.out_channels = sample_size, in_channels, out_channels
        groups, eps, temb = norm_num_groups, norm_eps, widths[0] * 4
        heads = (lambda c: attention_head_dim if attention_head_dim is not None else c)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepMLP(widths[0], temb)
        self.class_embedding = nn.Embedding(num_class_embeds, temb) if num_class_embeds is not None else None
        self.down_blocks = nn.ModuleList([
            DownLevel(widths[max(i - 1, 0)], widths[i], layers_per_block, temb, groups, eps, heads(widths[i]),
                      attention=kind == "AttnDownBlock2D", downsample=i < n - 1)
            for i, kind in enumerate(down_block_types)])
        mid = MidBlock(widths[-1], temb, groups, eps, heads(widths[-1]))  # built before the way up, as diffusers does
        rev = widths[::-1]
        self.up_blocks = nn.ModuleList([
            UpLevel(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], layers_per_block + 1, temb, groups, eps,
                    heads(rev[i]), attention=kind == "AttnUpBlock2D", upsample=i < n - 1)
            for i, kind in enumerate(up_block_types)])
        # registered after the way up, as diffusers does: parameters() in its order, so an optimizer state saved by a
        # run that trained diffusers' class resumes onto this one
        self.mid_block = mid
        self.conv_norm_out = nn.GroupNorm(groups, widths[0], eps=eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> UNetOutput:
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1) * torch.ones(sample.shape[0], dtype=t.dtype, device=sample.device)
        dtype = self.conv_in.weight.dtype
        emb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels).to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: class_labels are required")
            emb = emb + self.class_embedding(class_labels).to(dtype)
        elif class_labels is not None:
            raise ValueError("this UNet has no class embedding: class_labels must be None")
        x = self.conv_in(sample)
        skips = [x]
        for level in self.down_blocks:
            x, states = level(x, emb)
            skips.extend(states)
        x = self.mid_block(x, emb)
        for level in self.up_blocks:
            x = level(x, skips, emb)
        return UNetOutput(sample=self.conv_out(self.conv_act(self.conv_norm_out(x))))


class NetworkMean(nn.Module):
    """Several independently trained networks of one architecture, answering as their mean: a deep ensemble
    (Lakshminarayanan et al. 2017). Their errors are partly independent, so the mean is more accurate than either,
    and where they disagree the prediction is less certain (``core/confidence.py`` ensembles the mean). Costs one
    pass per network."""

    def __init__(self, networks: list[UNet]):
        super().__init__()
        if len(networks) < 2:
            raise ValueError("a mean of networks needs at least two")
        self.networks = nn.ModuleList(networks)
        first = networks[0]
        self.sample_size, self.in_channels, self.out_channels = first.sample_size, first.in_channels, first.out_channels

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> UNetOutput:
        total = None
        for net in self.networks:
            out = net(sample, timestep, class_labels=class_labels).sample.float()
            total = out if total is None else total + out
        return UNetOutput(sample=total / len(self.networks))
