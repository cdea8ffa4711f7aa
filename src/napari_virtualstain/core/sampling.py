"""The one sampler loop: for each timestep, tiles -> batched network -> merged prediction -> ``scheduler.step``.

It works with any scheduler that has diffusers' ``scale_model_input``/``step`` API (the residual-shift scheduler
here, or diffusers' DDPM/DDIM), and exposes hooks instead of being copied per task:

- ``progress(event)`` after every network call (per tile) and every step;
- ``should_cancel()`` checked between steps and between the network calls of a step; raises :class:`Cancelled`
  (nothing partial is returned);
- ``on_step(i, t, x0_hat)`` with the merged x̂0 of every step (running averages / std maps are built from it).

Noise is drawn on the CPU from one ``torch.Generator`` per batch item (one per seed), at the image size, so a seed
gives the same result whatever the device, tile size or batch composition.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import Cancelled
from .model import Denoiser, TTADenoiser, downsample_factor, pick_device
from .settings import DEFAULT, RunSettings
from .threads import use_threads
from .tiling import TilePlan


@dataclass(frozen=True)
class Progress:
    """One progress report: ``step`` of ``num_steps`` diffusion steps, ``tile`` of ``num_tiles`` within the step,
    and for a big field run block by block, ``block`` of ``num_blocks``. ``phase`` "labels": the instance labels of
    a big field, made block by block after the network (``block`` of ``num_blocks`` done; a bar starts again)."""

    step: int
    num_steps: int
    tile: int
    num_tiles: int
    block: int = 0
    num_blocks: int = 1
    phase: str = "network"

    @property
    def fraction(self) -> float:
        within = (self.step + self.tile / max(self.num_tiles, 1)) / max(self.num_steps, 1)
        return (self.block + min(within, 1.0)) / max(self.num_blocks, 1)

    @property
    def done(self) -> bool:
        last_step = self.step >= self.num_steps or (self.step == self.num_steps - 1 and self.tile >= self.num_tiles)
        return last_step and self.block >= self.num_blocks - 1

    def describe(self) -> str:
        """'block 12/64 · step 1/2 · tile 3/9' (the block part only for a field run in blocks); 'labels · block 3/36'."""
        if self.phase == "labels":
            return f"labels · block {self.block + 1}/{self.num_blocks}"
        step = min(self.step + 1, self.num_steps)
        text = f"step {step}/{self.num_steps} · tile {min(self.tile, self.num_tiles)}/{self.num_tiles}"
        return f"block {self.block + 1}/{self.num_blocks} · {text}" if self.num_blocks > 1 else text


@dataclass
class SamplerHooks:
    progress: Callable[[Progress], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_step: Callable[[int, int, torch.Tensor], None] | None = None

    @classmethod
    def of(cls, settings: RunSettings, on_step=None) -> SamplerHooks:
        return cls(settings.progress, settings.should_cancel, on_step)

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("cancelled by the user")

    def tile_callback(self, step: int, num_steps: int) -> Callable[[int, int], None]:
        """``on_tile(done, total)`` for one network pass: progress as ``step`` of ``num_steps``, and Cancel answered
        between the pass's network calls (not only between steps)."""

        def on_tile(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(Progress(step, num_steps, done, total))
            if done < total:
                self.check_cancel()

        return on_tile


@dataclass
class RunSetup:
    """What every task needs before sampling one image: the device, the tile plan and the wrapped network."""

    device: torch.device
    plan: TilePlan
    denoiser: Denoiser
    started: float
    mean_denoiser: Denoiser | None = None  # mean-anchored bundles: the one-pass mu(x) network
    threads: dict | None = None  # CPU runs: intra-op threads and why (``threads.use_threads``)
    tta: int = 1  # test-time augmentation: network outputs averaged over this many flips/quarter turns
    settings: RunSettings = DEFAULT

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def provenance(self, image_shape, input_name: str | None) -> dict:
        """Run settings every output records (tiles, device, precision, input, time, package version)."""
        from .. import __version__

        return {
            **self.plan.describe(),
            "batch_size": self.batch_size,
            "device": str(self.device),
            "precision": self.denoiser.precision(),
            "tta": self.tta,
            **(self.threads or {}),
            "input": input_name,
            "input_shape": list(image_shape),
            "seconds": round(time.perf_counter() - self.started, 3),
            "package_version": __version__,
        }


def tile_multiple(config) -> int:
    """What every tile side must be a multiple of: the downsampling of the bundle's networks (mu included)."""
    return max(downsample_factor(config.unet), downsample_factor(config.mean_unet) if config.anchored else 1)


def tile_settings(config, settings: RunSettings = DEFAULT) -> tuple[int, int]:
    """(tile size, tile overlap): the run's settings where given, else the bundle's."""
    return (int(settings.tile_size or config.tile_size),
            int(config.tile_overlap if settings.tile_overlap is None else settings.tile_overlap))


def setup_run(bundle, height: int, width: int, settings: RunSettings = DEFAULT, tta: int = 1) -> RunSetup:
    """Device, tiles (the bundle's defaults unless ``settings`` say), the bundle's UNet on that device and, on a CPU,
    the intra-op threads (``settings.threads``, else the environment's, else the free cores: :mod:`.threads`);
    ``tta`` > 1 wraps the networks in :class:`TTADenoiser`."""
    config = bundle.config
    dev = pick_device(settings.device)
    used = use_threads(settings.threads) if dev.type == "cpu" else None
    plan = TilePlan(height, width, *tile_settings(config, settings), tile_multiple(config))
    mean = Denoiser(bundle.mean_unet.to(dev), half=settings.half) if config.anchored else None
    net = Denoiser(bundle.unet.to(dev), half=settings.half, anchor_channels=config.anchor_channels)
    if tta != 1:
        net, mean = TTADenoiser(net, tta), (TTADenoiser(mean, tta) if mean is not None else None)
    return RunSetup(dev, plan, net, time.perf_counter(), mean, used, tta, settings)


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def tiled_predict(
    denoiser: Callable[..., torch.Tensor],
    plan: TilePlan,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    timestep,
    batch_size: int,
    on_tile: Callable[[int, int], None] | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """One network evaluation over the whole canvas (B, C, H, W) — or several canvases joined along channels per
    tile (``TilePlan.apply``) — tile by tile.

    ``class_labels`` (B,) follow their images: a network call holds whole tiles, each with all B images in order.
    """
    b = inputs.shape[0] if isinstance(inputs, torch.Tensor) else max(p.shape[0] for p in inputs)

    def call(tiles: torch.Tensor) -> torch.Tensor:
        if class_labels is None:
            return denoiser(tiles, timestep)
        return denoiser(tiles, timestep, class_labels=class_labels.repeat(tiles.shape[0] // b))

    with torch.inference_mode():
        return plan.apply(call, inputs, batch_size=batch_size, on_tile=on_tile)


def _takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def _scaled_input(denoiser: Callable[..., torch.Tensor], scheduler, n_x: int) -> Callable[..., torch.Tensor]:
    """``denoiser`` on tiles whose first ``n_x`` channels (x_t) pass through ``scheduler.scale_model_input`` first.

    Why: scaling the whole canvas made one more image-sized tensor per step (20 MB per 912² block of six channels);
    per tile the same element-wise scaling gives the same values. Identity scalings (DDPM, DDIM) cost nothing."""

    def call(tiles: torch.Tensor, t, **kwargs) -> torch.Tensor:
        x_part = tiles[:, :n_x]
        scaled = scheduler.scale_model_input(x_part, t)
        if scaled is not x_part:
            tiles = scaled if tiles.shape[1] == n_x else torch.cat([scaled, tiles[:, n_x:]], dim=1)
        return denoiser(tiles, t, **kwargs)

    return call


def sample(
    denoiser: Callable[..., torch.Tensor],
    scheduler,
    x_start: torch.Tensor,
    plan: TilePlan,
    generators: list[torch.Generator],
    *,
    condition: torch.Tensor | None = None,
    batch_size: int = 4,
    hooks: SamplerHooks | None = None,
    timesteps: Sequence[int] | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the scheduler's chain from ``x_start`` (B, C, H, W) and return the last sample.

    ``condition`` (B or 1, C_cond, H, W) is concatenated to the scaled x_t as extra network input channels;
    ``class_labels`` (B,) go to a class-conditional network. The chain may also run forwards (DDIM inversion):
    whatever direction the scheduler's timesteps and ``step`` go.
    """
    hooks = hooks or SamplerHooks()
    noisy = _takes_generator(scheduler)
    timesteps = list(scheduler.timesteps if timesteps is None else timesteps)
    n = len(timesteps)
    x = x_start
    scaled = _scaled_input(denoiser, scheduler, x_start.shape[1])
    for i, t in enumerate(timesteps):
        hooks.check_cancel()
        # x_t is scaled tile by tile, and the condition joined per tile (a batch-1 condition serves all seeds):
        # no whole-image copy of either while the network runs
        net_in = x if condition is None else (x, condition)
        model_output = tiled_predict(scaled, plan, net_in, t, batch_size, hooks.tile_callback(i, n), class_labels)
        del net_in
        # the step runs on the cropped canvas, so its noise has the image's size whatever the tiling
        out = scheduler.step(model_output, t, x, **({"generator": generators} if noisy else {}))
        x = out.prev_sample
        if hooks.on_step is not None and getattr(out, "pred_original_sample", None) is not None:
            hooks.on_step(i, int(t), out.pred_original_sample)
    hooks.check_cancel()
    if hooks.progress is not None:
        hooks.progress(Progress(n, n, 0, len(plan)))
    return x
