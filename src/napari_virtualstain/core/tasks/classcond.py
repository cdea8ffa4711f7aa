"""Class-conditional DDPM: condition translation (PhenDiff) and class-conditional synthesis.

Translation: DDIM-invert the image to noise under its *source* class (no guidance, deterministic), then regenerate
it with DDIM (eta = 0) under the *target* class. The same latent regenerated under the source class is the
**reconstruction control**: what inversion + regeneration change on their own. ``difference = translated - control``
is then the class effect, not inversion error. Target and control run as one batch of two chains.

``strength`` < 1 inverts only to that fraction of the schedule (an SDEdit-style partial inversion): the cells keep
more of their layout, the phenotype can move less. PhenDiff inverts fully (strength 1).

Classifier-free guidance: the network was trained with ~10 % of labels replaced by the null class, so
eps = eps(null) + w * (eps(class) - eps(null)); w = 1 is plain conditional sampling.

Images are scaled with the checkpoint's fixed per-channel range (fit on its training data), so intensities stay
comparable between conditions — a per-image percentile scale would erase the very differences we look for.

Invariant channels (a bundle's ``input_channels``, e.g. DNA for an NF-kB translocation): they condition every
network call and are never inverted or generated, so the translated image keeps exactly the source's nuclei and only
the variable channels (``output_channels``) move; their difference is 0 by construction. Without invariant
channels the whole image is inverted and regenerated (PhenDiff as published).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ... import __version__
from ..bundle import Bundle, BundleConfig
from ..errors import VirtualStainError
from ..inputs import prepare_input
from ..model import Denoiser, downsample_factor
from ..normalize import fixed_denormalize, fixed_normalize
from ..sampling import Progress, SamplerHooks, make_generators, sample, setup_run
from ..settings import DEFAULT, RunSettings
from ..schedulers import randn_per_item


class GuidedDenoiser(torch.nn.Module):
    """Classifier-free guidance inside one network call: conditional and null-class halves of a doubled batch."""

    def __init__(self, denoiser: Denoiser, null_class: int, scale: float = 1.0):
        super().__init__()
        self.denoiser, self.null_class, self.scale = denoiser, int(null_class), float(scale)

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, timestep, class_labels=class_labels)
        null = torch.full_like(class_labels, self.null_class)
        both = self.denoiser(torch.cat([x, x]), timestep, class_labels=torch.cat([class_labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def _require_classcond(bundle: Bundle) -> BundleConfig:
    config = bundle.config
    if config.task != "classcond":
        raise VirtualStainError(
            f"checkpoint {config.name!r} is a {config.task!r} model without classes; translation and synthesis need a "
            "class-conditional checkpoint (task classcond, trained with 'virtualstain train --task classcond')"
        )
    return config


def _norms(config: BundleConfig):
    return [c.normalization for c in config.output_channels]


def _condition(config: BundleConfig, given: np.ndarray | None, device) -> torch.Tensor | None:
    """The invariant channels (units) as the network's conditioning: (1, C_in, H, W), on their fixed scale."""
    if given is None:
        return None
    return torch.from_numpy(fixed_normalize(given, [c.normalization for c in config.input_channels]))[None].to(device)


def _split_channels(config: BundleConfig, chw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """An image's channels (in ``config.image_names`` order) -> normalised variable channels, and the invariant
    channels as they came (None without any)."""
    names = config.image_names
    variable = fixed_normalize(chw[[names.index(n) for n in config.output_names]], _norms(config))
    if not config.input_channels:
        return variable, None
    return variable, chw[[names.index(n) for n in config.input_names]]


def _join_channels(config: BundleConfig, variable: np.ndarray, given: np.ndarray | None) -> np.ndarray:
    """Generated variable channels (units) + the given invariant channels (units, as they came) in image order."""
    if given is None:
        return variable
    names = config.image_names
    out = np.empty((len(names), *variable.shape[1:]), np.float32)
    out[[names.index(n) for n in config.output_names]] = variable
    out[[names.index(n) for n in config.input_names]] = given
    return out


def _check_common(steps: int, guidance: float) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise VirtualStainError(f"steps must be a positive integer, got {steps!r}")
    if not np.isfinite(guidance) or guidance < 0:
        raise VirtualStainError(f"guidance scale must be 0 or more (1 = no guidance), got {guidance}")


def _fitted(config: BundleConfig, height: int, width: int, settings: RunSettings) -> RunSettings:
    """A field that fits in one of the bundle's tiles runs as one tile of its own size (rounded up to the network's
    downsampling): no reflect padding up to the tile and no extra work. The run's own tile size, where given, wins."""
    if settings.tile_size is not None:
        return settings
    m = downsample_factor(config.unet)
    side = -(-max(height, width) // m) * m
    return settings if side >= config.tile_size else settings.replace(tile_size=side, tile_overlap=0)


def _phase(progress: Callable[[Progress], None] | None, offset: int, total: int):
    """Report a phase's steps as part of the whole job (inversion steps, then regeneration steps)."""
    if progress is None:
        return None
    return lambda p: progress(Progress(min(offset + p.step, total), total, p.tile, p.num_tiles))


@dataclass
class TranslationResult:
    """(C, Y, X) arrays in the image's units: translated, reconstruction control, and their difference."""

    translated: np.ndarray
    control: np.ndarray
    difference: np.ndarray
    channel_names: list[str]
    provenance: dict = field(default_factory=dict)


def translate(
    bundle: Bundle,
    image: np.ndarray,
    source: str,
    target: str,
    *,
    steps: int = 50,
    guidance: float | None = None,
    strength: float | None = None,
    channel_axis: int | None = None,
    input_name: str | None = None,
    settings: RunSettings = DEFAULT,
) -> TranslationResult:
    """Translate one 2D image from class ``source`` to ``target`` (any size: tiled beyond the tile size).

    ``guidance`` / ``strength`` default to the bundle's ``sampling`` (chosen on held-out crops by
    ``benchmarks/eval_translation.py``), else 1 and 1 (plain conditional sampling, full inversion as PhenDiff)."""
    config = _require_classcond(bundle)
    src, tgt = config.class_index(source), config.class_index(target)
    guidance = float(config.sampling.get("guidance", 1.0) if guidance is None else guidance)
    strength = float(config.sampling.get("strength", 1.0) if strength is None else strength)
    _check_common(steps, guidance)
    if not 0.0 < strength <= 1.0:
        raise VirtualStainError(f"strength (how far to invert, as a fraction of the schedule) must be in (0, 1]; got {strength}")
    chw = prepare_input(image, config.image_names, channel_axis, what=input_name or "image")
    x0, given = _split_channels(config, chw)
    run = setup_run(bundle, chw.shape[1], chw.shape[2], _fitted(config, *chw.shape[1:], settings))
    dev, plan, denoiser, batch_size = run.device, run.plan, run.denoiser, run.batch_size
    progress, should_cancel = settings.progress, settings.should_cancel
    inverse = bundle.make_scheduler("ddim_inverse", steps)
    ddim = bundle.make_scheduler("ddim", steps)
    k = max(1, round(strength * steps))
    up = list(inverse.timesteps[:k])  # image -> noise at the k-th timestep
    down = list(ddim.timesteps[steps - k:])  # back from that timestep
    same = src == tgt
    total = k + k

    x = torch.from_numpy(x0)[None].to(dev)
    cond = _condition(config, given, dev)
    hooks = SamplerHooks(progress=_phase(progress, 0, total), should_cancel=should_cancel)
    latent = sample(denoiser, inverse, x, plan, make_generators([0]), condition=cond, batch_size=batch_size,
                    hooks=hooks, timesteps=up, class_labels=torch.tensor([src], device=dev))
    labels = [tgt] if same else [tgt, src]
    guided = GuidedDenoiser(denoiser, config.null_class, guidance)
    hooks = SamplerHooks(progress=_phase(progress, k, total), should_cancel=should_cancel)
    out = sample(guided, ddim, latent.expand(len(labels), -1, -1, -1).contiguous(), plan, make_generators(range(len(labels))),
                 condition=cond, batch_size=batch_size, hooks=hooks, timesteps=down,
                 class_labels=torch.tensor(labels, device=dev))
    decoded = [_join_channels(config, fixed_denormalize(o, _norms(config)), given) for o in out.cpu().numpy()]
    translated = decoded[0]
    control = decoded[0] if same else decoded[1]
    provenance = {
        **bundle.provenance(),
        "source_class": source,
        "target_class": target,
        "source_equals_target": same,
        "sampler": "ddim_inversion+ddim",
        "steps": steps,
        "strength": strength,
        "inverted_to_timestep": int(up[-1]),
        "guidance_scale": guidance,
        "invariant_channels": config.input_names,
        **run.provenance(np.shape(image), input_name),
    }
    if same:
        provenance["note"] = "source = target: the translation is the reconstruction control itself"
    return TranslationResult(translated, control, (translated - control).astype(np.float32), config.image_names,
                             provenance)


@dataclass
class SynthesisResult:
    """(N, C, H, W) samples in image units."""

    images: np.ndarray
    channel_names: list[str]
    provenance: dict = field(default_factory=dict)


def synthesize(
    bundle: Bundle,
    class_name: str,
    n: int,
    *,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 1.0,
    size: int | None = None,
    condition: np.ndarray | None = None,
    channel_axis: int | None = None,
    settings: RunSettings = DEFAULT,
) -> SynthesisResult:
    """``n`` samples of ``class_name`` (sample ``i`` uses seed ``seed + i``, whatever the batching).

    A bundle with invariant channels generates its variable channels *given* them: ``condition`` holds the invariant
    channels (e.g. a DNA image; several as ``channel_axis``), the samples take its size and carry it unchanged."""
    config = _require_classcond(bundle)
    cls = config.class_index(class_name)
    _check_common(steps, guidance)
    if not isinstance(n, int) or n < 1:
        raise VirtualStainError(f"number of samples must be a positive integer, got {n!r}")
    given = cond = None
    if config.input_channels:
        if condition is None:
            raise VirtualStainError(
                f"checkpoint {config.name!r} generates {', '.join(config.output_names)} given "
                f"{', '.join(config.input_names)}: give the {', '.join(config.input_names)} image to generate for "
                "(CLI: --condition FILE; napari: the condition layer)")
        given = prepare_input(condition, config.input_names, channel_axis, what="condition image")
        height, width = given.shape[1:]
        if height < 8 or width < 8:
            raise VirtualStainError(f"the condition image is {height}x{width}; it must be at least 8x8 pixels")
        run = setup_run(bundle, height, width, _fitted(config, height, width, settings))  # tiled as a translation
        cond = _condition(config, given, run.device)
    else:
        if condition is not None:
            raise VirtualStainError(f"checkpoint {config.name!r} has no invariant channels; it takes no condition image")
        size = int(size or config.unet.get("sample_size", config.tile_size))
        factor = downsample_factor(config.unet)
        if size < 8 or size % factor:
            raise VirtualStainError(f"sample size {size} must be a multiple of {factor} (the network's downsampling), at least 8")
        height = width = size
        run = setup_run(bundle, size, size, _fitted(config, size, size, settings))
    dev, plan, batch_size = run.device, run.plan, run.batch_size
    progress, should_cancel = settings.progress, settings.should_cancel
    denoiser = GuidedDenoiser(run.denoiser, config.null_class, guidance)
    ddim = bundle.make_scheduler("ddim", steps)
    group = max(1, batch_size)
    n_groups = -(-n // group)
    images = []
    for g in range(n_groups):
        seeds = list(range(seed + g * group, seed + min(n, (g + 1) * group)))
        gens = make_generators(seeds)
        x = randn_per_item((len(seeds), len(config.output_channels), height, width), gens).to(dev) * ddim.init_noise_sigma
        offset = g * steps

        def report(p, offset=offset):
            if progress is not None:
                progress(Progress(offset + p.step, n_groups * steps, p.tile, p.num_tiles))

        hooks = SamplerHooks(progress=report, should_cancel=should_cancel)
        out = sample(denoiser, ddim, x, plan, gens, condition=cond, batch_size=batch_size, hooks=hooks,
                     class_labels=torch.full((len(seeds),), cls, device=dev))
        images += [_join_channels(config, fixed_denormalize(o, _norms(config)), given) for o in out.cpu().numpy()]
    provenance = {
        **bundle.provenance(),
        "class": class_name,
        "n": n,
        "seeds": list(range(seed, seed + n)),
        "sampler": "ddim",
        "steps": steps,
        "guidance_scale": guidance,
        "size": size if given is None else [height, width],
        "invariant_channels": config.input_names,
        "device": str(dev),
        "seconds": round(time.perf_counter() - run.started, 3),
        "package_version": __version__,
    }
    return SynthesisResult(np.stack(images).astype(np.float32), config.image_names, provenance)
