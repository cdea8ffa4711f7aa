"""Virtual staining: brightfield -> stain, boundary and foreground channels (+ instance labels), CellResDM-style.

The residual-shift chain needs ``y`` with the shape of the output. Two sources (``residual_source``):

- ``mean_input`` (CellResDM as published): the mean of the normalised input channels (a single brightfield plane, or
  the mean of all z-planes), broadcast to every output channel;
- ``mean_prediction`` (predict, then refine: Whang et al., CVPR 2022; CorrDiff, Mardani et al. 2024): the output of
  a one-pass mean predictor mu(x) stored in the same bundle. The chain runs from y = mu(x) to x0, the network sees
  mu(x) beside the inputs and predicts x0 - mu(x) (``Denoiser(anchor_channels=...)`` adds mu back), so its first
  estimate is already mu's and the chain only adds what mu cannot know.

The same anchor for the DDPM objective (CorrDiff): the DDPM generates the residual r = x0 - mu(x), conditioned on the
inputs and mu(x); the prediction (and every step's x̂0 given to the hooks) is mu(x) + r.

The network always sees the full input (every plane) as extra channels, concatenated to the scaled x_t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bundle import Bundle, BundleConfig
from ..errors import VirtualStainError
from ..inputs import RGB_NOTE, is_colour_for_grey, prepare_input, rescale_planes, resize_planes, to_channels_first
from ..normalize import FixedNorm, as_float, fixed_denormalize, fixed_normalize, percentile_levels, percentile_normalize
from ..postprocess import (
    LABEL_HALO,
    boundaries_to_labels,
    distance_to_labels,
    labels_in_blocks,
    stain_threshold,
    stain_to_labels,
)
from ..schedulers import randn_per_item
from ..settings import DEFAULT, RunSettings
from ..sampling import (
    Progress,
    RunSetup,
    SamplerHooks,
    make_generators,
    sample,
    setup_run,
    tile_multiple,
    tile_settings,
    tiled_predict,
)
from ..tiling import TilePlan, pack_in_place, reflect_pad


@dataclass
class StainResult:
    """Predicted channels (C, Y, X) in the units of the training stains (boundary/foreground: 0..1 probabilities),
    instance labels per boundary channel, and the provenance every output file/layer carries."""

    image: np.ndarray
    channel_names: list[str]
    channel_kinds: list[str]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    sample_std: np.ndarray | None = None  # with k > 1 samples averaged: their per-pixel std (output units)

    def channel(self, name: str) -> np.ndarray:
        return self.image[self.channel_names.index(name)]


def encode_inputs(config: BundleConfig, chw: np.ndarray, levels: list[tuple] | None = None) -> np.ndarray:
    """Per-image percentile normalisation of every input channel, as stored in the bundle; with ``levels``
    (:func:`input_levels` of a whole field) a block of the field is normalised as the whole field would be."""
    out = np.empty_like(chw, dtype=np.float32)
    for c, spec in enumerate(config.input_channels):
        out[c] = percentile_normalize(chw[c : c + 1], spec.normalization, what=f"input channel {spec.name!r}",
                                      levels=None if levels is None else levels[c : c + 1])[0]
    return out


def input_levels(config: BundleConfig, chw: np.ndarray) -> list[tuple]:
    """The (low, high) each input channel of a whole field is normalised between (see :func:`encode_inputs`)."""
    return [percentile_levels(chw[c], spec.normalization, f"input channel {spec.name!r} channel 0")
            for c, spec in enumerate(config.input_channels)]


def encode_targets(config: BundleConfig, chw: np.ndarray) -> np.ndarray:
    """Targets (stains in raw units, boundary/foreground in 0..1) -> the network's [-1, 1] space."""
    return fixed_normalize(chw, [_target_norm(s) for s in config.output_channels])


def decode_outputs(config: BundleConfig, chw: np.ndarray, inplace: bool = False) -> np.ndarray:
    out = fixed_denormalize(chw, [_target_norm(s) for s in config.output_channels], inplace=inplace)
    for c, spec in enumerate(config.output_channels):
        if spec.kind != "stain":
            np.clip(out[c], 0.0, 1.0, out=out[c])
    return out


def _target_norm(spec) -> FixedNorm:
    return spec.normalization if isinstance(spec.normalization, FixedNorm) else FixedNorm(0.0, 1.0)


def residual_source(config: BundleConfig, cond: torch.Tensor) -> torch.Tensor:
    """y for the residual shift: mu(x) (the last channels of a mean-anchored condition, see ``with_mean_prediction``)
    or the mean normalised input plane, one copy per output channel."""
    n_out = len(config.output_channels)
    if config.residual_source == "mean_prediction":
        return cond[:, -n_out:]
    if config.residual_source != "mean_input":
        raise VirtualStainError(f"unknown residual_source {config.residual_source!r} in the checkpoint")
    return cond.mean(dim=1, keepdim=True).expand(-1, n_out, -1, -1).contiguous()


def with_mean_prediction(mean_denoiser, cond: torch.Tensor, plan: TilePlan, batch_size: int,
                         on_tile=None) -> torch.Tensor:
    """(1, C_in, H, W) inputs -> (1, C_in + C_out, H, W): the inputs with mu(x) appended (one tiled network pass)."""
    mu = tiled_predict(mean_denoiser, plan, cond, 0, batch_size, on_tile)
    return torch.cat([cond, mu.to(cond.dtype)], dim=1)


def label_route(config: BundleConfig, labels_from: str | None) -> str:
    """Which route instance labels take: the bundle's validated default unless the user picks one."""
    route = labels_from or config.sampling.get("labels_from", "boundaries")
    if route not in ("boundaries", "stain", "distance"):
        raise VirtualStainError(f"labels from {route!r}: use 'boundaries', 'stain' or 'distance'")
    if route not in config.label_routes():
        what = "names no stain to segment labels from" if route == "stain" else "has no distance (centre) channel"
        raise VirtualStainError(f"checkpoint {config.name!r} {what}; use labels from "
                                f"{' or '.join(repr(r) for r in config.label_routes())}")
    return route


LABEL_THRESHOLDS = ("boundary_threshold", "foreground_threshold", "center_threshold")


def label_thresholds(config: BundleConfig, **given) -> dict[str, float]:
    """The labels thresholds: the ones given (not None), else the bundle's validated ``sampling`` values, else 0.5."""
    out = {}
    for key in LABEL_THRESHOLDS:
        value = given.get(key)
        out[key] = float(value if value is not None else config.sampling.get(key, 0.5))
    return out


def labels_from_channels(config: BundleConfig, image: np.ndarray, labels_from: str | None = None,
                         block: int | None = None, on_block=None, **thresholds) -> dict[str, np.ndarray]:
    """Instance labels for every boundary channel; re-run it with other thresholds without the network.

    ``boundary_threshold`` / ``foreground_threshold`` / ``center_threshold`` (distance route: where a centre map
    seeds a nucleus) default to the bundle's validated ``sampling`` values (``label_thresholds``).

    ``labels_from`` "stain": labels sets that the bundle maps to a stain (nuclei <- Hoechst) are segmented from the
    predicted stain (``stain_to_labels``); "distance": sets with a distance channel are seeded at its centres
    (``distance_to_labels``); "boundaries": from the boundary/foreground channels. Channels that take their
    seeds from another labels set (cells from nuclei) are done after it, always over their boundary channel.

    ``block``: a field with a side over ``block`` + 2 halos is labelled block by block and stitched
    (``postprocess.labels_in_blocks``; the stain route thresholds every block at the whole field's Otsu level), so
    the labels of a big field need the memory of one block, not a field-wide watershed; ``on_block(done, total)``
    follows them.
    """
    route = label_route(config, labels_from)
    t = label_thresholds(config, **thresholds)
    h, w = image.shape[-2:]
    if not block or max(h, w) <= block + 2 * LABEL_HALO:
        return _labels_of(config, image, route, t, {})
    levels = {}  # the field's Otsu level per stain-route set (inf: a flat field has no nuclei in any block)
    for name, stain in (config.labels_from_stain.items() if route == "stain" else ()):
        level = stain_threshold(image[config.output_names.index(stain)])
        levels[name] = np.inf if level is None else level
    return labels_in_blocks(lambda ys, xs: _labels_of(config, image[:, ys, xs], route, t, levels), (h, w), block,
                            on_block=on_block)


def _labels_of(config: BundleConfig, image: np.ndarray, route: str, t: dict[str, float],
               stain_levels: dict[str, float]) -> dict[str, np.ndarray]:
    names = config.output_names
    todo = [(c, s) for c, s in enumerate(config.output_channels) if s.kind == "boundary"]
    todo.sort(key=lambda cs: cs[1].seeds is not None)
    labels: dict[str, np.ndarray] = {}
    for c, spec in todo:
        name = spec.labels or spec.name
        if route == "stain" and name in config.labels_from_stain:
            labels[name] = stain_to_labels(image[names.index(config.labels_from_stain[name])],
                                           threshold=stain_levels.get(name))
            continue
        fg = image[names.index(spec.foreground)] if spec.foreground in names else None
        if route == "distance" and name in config.distance_channels:
            labels[name] = distance_to_labels(image[names.index(config.distance_channels[name])], fg,
                                              seed_threshold=t["center_threshold"],
                                              foreground_threshold=t["foreground_threshold"])
            continue
        seeds = labels.get(spec.seeds) if spec.seeds else None
        labels[name] = boundaries_to_labels(image[c], fg, seeds=seeds, boundary_threshold=t["boundary_threshold"],
                                            foreground_threshold=t["foreground_threshold"])
    return {(s.labels or s.name): labels[s.labels or s.name] for _, s in sorted(todo)}


def initial_sample(config: BundleConfig, scheduler, cond: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """x_T for one chain per generator: residual shift starts at y + noise, DDPM/DDIM at pure noise."""
    b = len(generators)
    if config.objective == "residual_shift":
        y = residual_source(config, cond).expand(b, -1, -1, -1)
        return scheduler.prior_sample(y, generator=generators)
    shape = (b, len(config.output_channels), *cond.shape[-2:])
    return randn_per_item(shape, generators).to(cond.device) * scheduler.init_noise_sigma


def run_stain_model(denoiser, config: BundleConfig, cond: torch.Tensor, plan: TilePlan, seed: int | Sequence[int],
                    batch_size: int, hooks: SamplerHooks, scheduler=None,
                    mean_denoiser=None) -> tuple[torch.Tensor, int]:
    """Normalised inputs (1, C_in, H, W) -> normalised outputs (B, C_out, H, W), one chain per seed (B = number of
    seeds, run as one batch); shared by predict, uncertainty and validation. Regression ignores seeds (B = 1).

    Returns the outputs and the number of network passes (a mean-anchored chain: one for mu(x) + its steps)."""
    if scheduler is not None:
        passes = len(scheduler.timesteps)
        if config.anchored:
            if mean_denoiser is None:
                raise VirtualStainError(f"checkpoint {config.name!r} is mean-anchored but its mean network is missing")
            hooks.check_cancel()
            cond = with_mean_prediction(mean_denoiser, cond, plan, batch_size, hooks.tile_callback(0, passes + 1))
            hooks = _shifted(hooks, passes + 1)
            passes += 1
            if len(scheduler.timesteps) == 0:  # 0 steps (config.takes_zero_steps): mu(x) alone, every seed's output
                n = 1 if isinstance(seed, int) else len(seed)
                return cond[:, -len(config.output_channels):].expand(n, -1, -1, -1).clone(), passes
        mu = cond[:, -len(config.output_channels):] if config.anchored and config.objective == "ddpm" else None
        if mu is not None and hooks.on_step is not None:  # the chain's x̂0 is a residual: report mu + residual
            inner = hooks.on_step
            hooks = SamplerHooks(hooks.progress, hooks.should_cancel, lambda i, t, x0: inner(i, t, x0 + mu))
        generators = make_generators([seed] if isinstance(seed, int) else list(seed))
        # x_T is handed over, not kept here: a big field's chain holds one x_t at a time
        out = sample(denoiser, scheduler, initial_sample(config, scheduler, cond, generators), plan, generators,
                     condition=cond, batch_size=batch_size, hooks=hooks)
        return (out + mu if mu is not None else out), passes
    hooks.check_cancel()
    out = tiled_predict(denoiser, plan, cond, 0, batch_size, hooks.tile_callback(0, 1))
    hooks.check_cancel()
    return out, 1


def network_passes(config: BundleConfig, scheduler) -> int:
    """Network passes of one prediction: one per step of the chain, plus mu's for a mean-anchored bundle; one for a
    one-pass model (what progress counts: a mean of networks, ``config.networks``, is one step)."""
    return len(scheduler.timesteps) + int(config.anchored) if scheduler is not None else 1


def _shifted(hooks: SamplerHooks, total: int) -> SamplerHooks:
    """The chain's progress reported as steps 1..total-1 of ``total`` (step 0 was the mean prediction)."""
    if hooks.progress is None:
        return hooks
    inner = hooks.progress
    return SamplerHooks(lambda p: inner(Progress(min(p.step + 1, total), total, p.tile, p.num_tiles)),
                        hooks.should_cancel, hooks.on_step)


def prepare_stain_run(bundle: Bundle, image: np.ndarray, channel_axis: int | None, input_name: str | None,
                      settings: RunSettings) -> tuple[torch.Tensor, RunSetup]:
    """Checked, normalised inputs (1, C_in, H, W) on the device, and the run setup; shared by predict and uncertainty."""
    chw = prepare_input(image, bundle.config.input_names, channel_axis, what=input_name or "image")
    run = setup_run(bundle, chw.shape[1], chw.shape[2], settings)
    return torch.from_numpy(encode_inputs(bundle.config, chw))[None].to(run.device), run


def sampler_name(config: BundleConfig, scheduler) -> str:
    if scheduler is None:
        return "one pass"
    if len(scheduler.timesteps) == 0:
        return "mean network"
    return "residual_shift" if config.objective == "residual_shift" else type(scheduler).__name__.replace("Scheduler", "").lower()


def predict_stain(
    bundle: Bundle,
    image: np.ndarray,
    *,
    channel_axis: int | None = None,
    seed: int = 0,
    make_labels: bool = True,
    input_name: str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    samples: int | None = None,
    labels_from: str | None = None,
    pixel_size_um: float | None = None,
    rescale: bool = False,
    tta: int | None = None,
    thresholds: dict | None = None,
    settings: RunSettings = DEFAULT,
) -> StainResult:
    """Predict every output channel of ``bundle`` for one 2D image (any size; tiled when larger than a tile).

    ``settings``: tiles, batch, device, precision, threads, progress and Cancel (:class:`~..settings.RunSettings`).
    Fields with a side longer than twice ``settings.block_size`` (default: over ``BLOCKS_ABOVE``, in blocks of
    ``MAX_BLOCK``; 0: never) run block by block (:func:`block_plan`), so memory stays that of one block plus the
    output whatever the field's size.

    ``pixel_size_um``: the input's, recorded in the provenance; with ``rescale`` the input is resampled to the model's
    pixel size, predicted, and the prediction resampled back onto the input's grid (labels are made after that).

    ``samples`` k > 1: k chains (seeds ``seed .. seed+k-1``) run as one batch and their mean is returned, with their
    std in ``sample_std`` — sample averaging trades realism for accuracy (Whang et al. 2022). Default: the bundle's
    validated ``sampling.samples`` (else 1).

    ``tta``: average the network's outputs over 1, 2, 4 or 8 flips/quarter turns of every tile (n network passes
    per pass; default: the bundle's validated ``sampling.tta``, else 1).

    Labels (``make_labels``) are made here for every door — CLI, widgets, scripts — by ``labels_from_channels`` with
    ``labels_from`` and ``thresholds`` (``boundary_threshold``, ``foreground_threshold``, ``center_threshold``; the
    bundle's validated values where not given), all recorded in the provenance.
    """
    config = bundle.config
    if config.task != "stain":
        raise VirtualStainError(f"checkpoint {config.name!r} is a {config.task!r} model, not a virtual-stain model")
    k = resolve_samples(config, samples)
    route = label_route(config, labels_from) if make_labels else None
    what = input_name or "image"
    channels = to_channels_first(image, config.input_names, channel_axis, what)  # a view of the caller's array
    chw = as_float(channels, what)  # (prepare_input, keeping the view for a big field's blocks)
    input_shape = chw.shape[1:]
    factor = rescale_factor(config, pixel_size_um) if rescale else None
    if factor is not None:
        chw = rescale_planes(chw, factor)
    blocks = block_plan(config, chw.shape[1], chw.shape[2], settings.block_size, tile_settings(config, settings))
    side = (blocks.tile_size,) * 2 if blocks is not None else chw.shape[1:]
    n_tta = int(tta or config.sampling.get("tta", 1))
    run = setup_run(bundle, *side, settings, tta=n_tta)
    if blocks is None:
        cond = torch.from_numpy(encode_inputs(config, chw))[None].to(run.device)
    else:  # normalised block by block at the whole field's levels: no normalised copy of a big field is held
        levels = input_levels(config, chw)
        cond = _block_inputs(config, chw if factor is not None else channels, levels, run.device)
    del chw, channels
    scheduler = bundle.make_scheduler(sampler, steps)
    seeds = [seed + i for i in range(k)] if scheduler is not None else seed
    if blocks is None:
        out, passes = run_stain_model(run.denoiser, config, cond, run.plan, seeds, run.batch_size,
                                      SamplerHooks.of(settings), scheduler, run.mean_denoiser)
    else:
        out, passes = _run_in_blocks(run, config, cond, blocks, seeds, scheduler)
    arrays = out.cpu().numpy()
    del out
    if len(arrays) == 1:  # no stacked copy of a big field
        # packed and decoded in the canvas's own memory: a big field's output is held once
        result_img, spread = decode_outputs(config, pack_in_place(arrays[0]), inplace=True), None
    else:
        decoded = np.stack([decode_outputs(config, o) for o in arrays])
        result_img, spread = decoded.mean(axis=0), decoded.std(axis=0)
    if factor is not None:  # back onto the input's pixel grid
        result_img = resize_planes(result_img, input_shape)
        spread = resize_planes(spread, input_shape) if spread is not None else None
    provenance = {
        **bundle.provenance(),
        "seed": int(seed) if scheduler is not None else None,
        "samples": len(arrays),
        "sampler": sampler_name(config, scheduler),
        "steps": len(scheduler.timesteps) if scheduler is not None else 1,
        "network_passes": (passes + len(config.networks)) * n_tta,  # every network of a mean of networks runs
        "labels_from": route,
        **run.provenance(np.shape(image), input_name),
        "input_pixel_size_um": pixel_size_um,
        "model_pixel_size_um": config.pixel_size_um,
        "rescaled_by": factor,
        "input_conversion": RGB_NOTE if is_colour_for_grey(image, len(config.input_channels), channel_axis) else None,
    }
    if blocks is not None:
        provenance["blocks"] = {"block_size": blocks.tile_size, "block_overlap": blocks.overlap,
                                "num_blocks": len(blocks)}
    if make_labels:
        used = label_thresholds(config, **(thresholds or {}))
        provenance.update(used)
        labels = labels_from_channels(config, result_img, route, block=blocks.tile_size if blocks else None,
                                      on_block=_labels_feedback(settings), **used)
    else:
        labels = {}
    return StainResult(result_img, config.output_names, [s.kind for s in config.output_channels], labels, provenance,
                       spread)


def _labels_feedback(settings: RunSettings):
    """Progress ('labels · block 3/36') and Cancel between the labels blocks of a big field."""
    hooks = SamplerHooks.of(settings)

    def on_block(done: int, total: int) -> None:
        if settings.progress is not None:
            settings.progress(Progress(1, 1, 1, 1, done - 1, total, phase="labels"))
        if done < total:
            hooks.check_cancel()

    return on_block


BLOCKS_ABOVE = 2048  # by default, fields with a side over this run block by block ...
MAX_BLOCK = 1024  # ... in blocks of at most 1024² (a block's canvases are the working memory; docs/benchmarks.md, "Memory")
BLOCK_OVERLAP = 64
BLOCK_SEED_STRIDE = 1_000_003  # block j draws its noise from seed + j * stride: blocks must not share a noise field


def block_plan(config: BundleConfig, height: int, width: int, block_size: int | None = None,
               tiles: tuple[int, int] | None = None) -> TilePlan | None:
    """Square overlapping blocks of at most ``block_size`` for a field with a side longer than twice that (default
    None: blocks of at most ``MAX_BLOCK`` for a side over ``BLOCKS_ABOVE``; 0: never); smaller fields run whole
    (blocking them would buy little memory for extra work).

    Each block runs the whole chain on its own canvas (inputs normalised at the whole field's levels), and the
    blocks' outputs are blended with the tiler's smooth windows, so peak memory no longer grows with the field beyond
    the output itself. The block side is chosen among the sides the network's ``tiles`` (size, overlap; the bundle's
    by default) cover exactly (128/16 tiles: 464, 576, ..., 912, 1024) as the one that needs the fewest network tiles
    over the whole field (ties: the larger block, fewer seams): a 6000² field runs in 7 x 7 blocks of 912², each
    8 x 8 tiles (blocks of 736² cost 81 x 49 tiles, 27 % more). Blocks draw their own noise, so a blocked field is not
    pixel-identical to an unblocked run of the same seed; a deterministic pass differs as much as any other tile grid
    does (the networks normalise per tile).
    """
    limit = MAX_BLOCK if block_size is None else int(block_size)
    above = BLOCKS_ABOVE if block_size is None else 2 * limit
    if limit <= 0 or (height <= above and width <= above):
        return None
    multiple = tile_multiple(config)
    smallest = max(config.tile_size, 2 * BLOCK_OVERLAP + multiple)
    if limit < smallest:
        raise VirtualStainError(f"block size {limit} is too small: use at least {smallest} (or 0 for no blocks)")
    tile, overlap = tiles or (config.tile_size, config.tile_overlap)
    stride = tile - overlap

    def blocks_along(length: int, side: int) -> int:
        return 1 if length <= side else math.ceil((length - BLOCK_OVERLAP) / (side - BLOCK_OVERLAP))

    def network_tiles(side: int) -> int:
        per_block = (1 if side <= tile else math.ceil((side - overlap) / stride)) ** 2
        return blocks_along(height, side) * blocks_along(width, side) * per_block

    sides = [s for s in range(tile, limit + 1, stride) if s % multiple == 0 and s >= smallest]  # tiles fill them
    if not sides:  # tiles that fill no allowed block side: the smallest multiple covering the field in n blocks
        n = blocks_along(max(height, width), limit)
        sides = [math.ceil(((max(height, width) - BLOCK_OVERLAP) / n + BLOCK_OVERLAP) / multiple) * multiple]
    side = min(sides, key=lambda s: (network_tiles(s), -s))
    return TilePlan(height, width, side, BLOCK_OVERLAP, multiple)


def _block_inputs(config: BundleConfig, source: np.ndarray, levels: list[tuple], device):
    """The tiler's input for a field run in blocks: ``(y, x, side) ->`` the normalised (1, C, side, side) block at
    (y, x) of the padded field, made from ``source`` (the caller's array, any dtype) when the block is reached."""
    h, w = source.shape[1:]

    def block(y: int, x: int, side: int) -> torch.Tensor:
        part = as_float(source[:, y : min(y + side, h), x : min(x + side, w)])
        bottom, right = y + side - min(y + side, h), x + side - min(x + side, w)
        if bottom or right:  # past the field's edge: the field's own reflection, as TilePlan.pad would give
            part = reflect_pad(torch.from_numpy(part), bottom, right).numpy()
        return torch.from_numpy(encode_inputs(config, part, levels))[None].to(device)

    return block


def _run_in_blocks(run: RunSetup, config: BundleConfig, cond, blocks: TilePlan, seeds,
                   scheduler) -> tuple[torch.Tensor, int]:
    """``run_stain_model`` block by block; the k samples of a block ride as channels through the tiler's merge."""
    passes = network_passes(config, scheduler)
    progress, should_cancel = run.settings.progress, run.settings.should_cancel
    n_out, n_blocks, done = len(config.output_channels), len(blocks), [0]

    def one_block(sub: torch.Tensor) -> torch.Tensor:
        j = done[0]
        report = None
        if progress is not None:
            report = lambda p: progress(Progress(p.step, p.num_steps, p.tile, p.num_tiles, j, n_blocks))  # noqa: E731
        block_seeds = [s + BLOCK_SEED_STRIDE * j for s in seeds] if isinstance(seeds, list) else seeds
        out, _ = run_stain_model(run.denoiser, config, sub, run.plan, block_seeds, run.batch_size,
                                 SamplerHooks(progress=report, should_cancel=should_cancel), scheduler,
                                 run.mean_denoiser)
        done[0] += 1
        return out.reshape(1, -1, *out.shape[-2:])

    merged = blocks.apply(one_block, cond, batch_size=1)
    return merged.reshape(-1, n_out, *merged.shape[-2:]), passes


def rescale_factor(config: BundleConfig, input_um: float | None) -> float | None:
    """How much to resample the input so its pixels are the model's (None: already within 1 %)."""
    if not input_um or not config.pixel_size_um:
        raise VirtualStainError(
            "rescaling needs both pixel sizes: give the image's (--pixel-size UM, or a layer scale in napari)"
            if not input_um else f"checkpoint {config.name!r} records no pixel size, so there is nothing to rescale to")
    factor = input_um / config.pixel_size_um
    return None if abs(factor - 1.0) < 0.01 else factor


def resolve_samples(config: BundleConfig, samples: int | None) -> int:
    k = int(config.sampling.get("samples", 1) if samples is None else samples)
    if k < 1:
        raise VirtualStainError(f"samples must be 1 or more (the number of chains averaged); got {k}")
    if k > 1 and config.objective == "regression":
        raise VirtualStainError("a regression checkpoint predicts in one pass: it has nothing to average (samples 1)")
    return k
