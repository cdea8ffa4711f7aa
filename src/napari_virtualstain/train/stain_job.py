"""The paired-stain training job: crops of input and target regions, the objectives' losses, validation by the
sampler that predicts, and the bundle's config (outputs, scales, UNet).

Residual-shift objective (CellResDM / ResShift): t ~ U{0..T-1}, x_t = add_noise(x0, eps, t, y), the UNet sees the
scaled x_t with the input channels concatenated and predicts x0; loss = MSE(x̂0, x0).
DDPM objective (DM4ISL-style label-free prediction): t ~ U{0..999}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
the UNet sees x_t with the inputs concatenated and predicts eps; loss = MSE(eps_hat, eps). Sampled with diffusers'
DDIM (few steps) or DDPM (all steps); its x̂0 trajectory feeds the uncertainty maps.
Regression objective: the same UNet (timestep 0) maps the inputs to the targets in one pass; loss = MSE. It is the
honest baseline that the diffusion model has to beat.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.bundle import DIFFUSION_OBJECTIVES, OBJECTIVES, BundleConfig, ChannelSpec
from ..core.errors import VirtualStainError
from ..core.metrics import image_metrics, normalize_pair
from ..core.model import Denoiser, default_unet_config, downsample_factor
from ..core.normalize import FixedNorm, PercentileNorm, fit_fixed_norm
from ..core.postprocess import boundary_target, distance_target, foreground_target
from ..core.sampling import SamplerHooks, tile_multiple
from ..core.schedulers import ResidualShiftScheduler, default_ddpm_config, make_scheduler
from ..core.tasks.stain import encode_inputs, encode_targets, residual_source, run_stain_model
from ..core.tiling import TilePlan, reflect_pad
from .augment import augment_batch
from .data import TrainingSpec, split_regions
from .distributed import draw_noise
from .job import TrainingJob, TrainOptions
from .objectives import reconstruction_loss


def output_channels(spec: TrainingSpec, stain_norms: list[FixedNorm], distance: bool = False) -> list[ChannelSpec]:
    """Stains, then for each labels set a boundary channel and the foreground channel that masks its watershed
    (and, with ``distance``, its normalised distance-to-boundary map for sets seeded on their own)."""
    chans = [ChannelSpec(n, "stain", norm) for n, norm in zip(spec.stain_names, stain_norms)]
    for lab in spec.label_names:
        chans.append(ChannelSpec(f"{lab} boundary", "boundary", FixedNorm(0.0, 1.0), lab, f"{lab} foreground",
                                 spec.label_seeds.get(lab)))
        chans.append(ChannelSpec(f"{lab} foreground", "foreground", FixedNorm(0.0, 1.0), lab))
        if distance and not spec.label_seeds.get(lab):
            chans.append(ChannelSpec(f"{lab} distance", "distance", FixedNorm(0.0, 1.0), lab))
    return chans


def build_config(spec: TrainingSpec, opts: TrainOptions, train_regions, mean_bundle=None, init=None) -> BundleConfig:
    """The bundle's config; a mean-anchored model takes its output channels (and their scales) from mu's bundle, a
    fine-tuned one from the bundle it starts from."""
    if opts.objective not in OBJECTIVES:
        raise VirtualStainError(f"unknown objective {opts.objective!r}; use one of {', '.join(OBJECTIVES)}")
    if mean_bundle is not None:
        outs = list(mean_bundle.config.output_channels)
    elif init is not None:
        outs = list(init.config.output_channels)
    else:
        stain_norms = [fit_fixed_norm([im.stains[c][:, xs] for im, xs in train_regions])
                       for c in range(len(spec.stain_names))]
        outs = output_channels(spec, stain_norms, opts.distance_head)
    n_in = len(spec.input_names) + (len(outs) if opts.objective in DIFFUSION_OBJECTIVES else 0)
    n_in += len(outs) if mean_bundle is not None else 0
    unet = default_unet_config(n_in, len(outs), opts.crop_size, tuple(opts.block_out_channels), opts.layers_per_block)
    scheduler = None
    if opts.objective == "residual_shift":
        scheduler = dict(ResidualShiftScheduler(num_train_timesteps=opts.num_timesteps, kappa=opts.kappa).config)
    elif opts.objective == "ddpm":
        if opts.prediction_type not in ("epsilon", "v_prediction"):
            raise VirtualStainError(f"prediction type {opts.prediction_type!r}: use epsilon or v_prediction")
        scheduler = default_ddpm_config(prediction_type=opts.prediction_type)
    factor = downsample_factor(unet)
    if opts.crop_size % factor or opts.tile_size % factor:
        raise VirtualStainError(f"crop size and tile size must be multiples of {factor}")
    stain_names = [c.name for c in outs if c.kind == "stain"]
    return BundleConfig(
        name=spec.name, description=spec.description, task="stain", objective=opts.objective,
        input_channels=[ChannelSpec(n, "input", PercentileNorm()) for n in spec.input_names],
        output_channels=outs, unet=unet, scheduler=scheduler, tile_size=opts.tile_size,
        tile_overlap=opts.tile_overlap, pixel_size_um=spec.pixel_size_um,
        residual_source="mean_prediction" if mean_bundle is not None else "mean_input",
        mean_unet=mean_bundle.config.unet if mean_bundle is not None else None,
        # a nuclear stain can be segmented directly (nuclei <- Hoechst); predict picks the route (labels_from)
        labels_from_stain={spec.label_names[0]: stain_names[0]} if stain_names and spec.label_names else {},
    )


def load_mean_bundle(spec: TrainingSpec, opts: TrainOptions):
    """The frozen mu(x) of a mean-anchored model: a regression bundle with the same input and target channels."""
    from ..core.bundle import load_bundle

    if opts.residual_source not in ("mean_input", "mean_prediction"):
        raise VirtualStainError(f"residual source {opts.residual_source!r}: use mean_input or mean_prediction")
    if opts.residual_source == "mean_input":
        return None
    if opts.objective not in DIFFUSION_OBJECTIVES:
        raise VirtualStainError("--residual-source mean_prediction is for --objective residual_shift or ddpm")
    if not opts.mean_from:
        raise VirtualStainError("--residual-source mean_prediction needs --mean-from BUNDLE: a regression bundle "
                                "trained on the same data first (virtualstain train DATA -o MEAN --objective regression)")
    mean = load_bundle(opts.mean_from)
    c = mean.config
    if c.task != "stain" or c.objective != "regression":
        raise VirtualStainError(f"--mean-from {opts.mean_from}: need a regression stain bundle, got {c.task}/{c.objective}")
    if c.input_names != spec.input_names:
        raise VirtualStainError(f"--mean-from {opts.mean_from}: its inputs {c.input_names} differ from the data's "
                                f"{spec.input_names}")
    distance = any(o.kind == "distance" for o in c.output_channels)  # the refinement follows mu's outputs
    expected = [o.name for o in output_channels(spec, [FixedNorm(0.0, 1.0)] * len(spec.stain_names), distance)]
    if c.output_names != expected:
        raise VirtualStainError(f"--mean-from {opts.mean_from}: its outputs {c.output_names} differ from the data's "
                                f"{expected}")
    return mean


def append_mean_prediction(arrays, mean_unet, opts: TrainOptions, factor: int):
    """Add mu(x) to every region's inputs once (mu is frozen), so training crops carry it like an input plane."""
    from ..core.tasks.stain import with_mean_prediction

    denoiser = Denoiser(mean_unet, channels_last=False)  # the frozen mu also serves training: keep its layout
    out = []
    for cond, tgt in arrays:
        h, w = cond.shape[1:]
        plan = TilePlan(h, w, opts.tile_size, opts.tile_overlap, factor)
        full = with_mean_prediction(denoiser, torch.from_numpy(np.ascontiguousarray(cond))[None], plan, 4)
        out.append((full[0].numpy(), tgt))
    return out


def region_arrays(config: BundleConfig, spec: TrainingSpec, regions, min_size: int):
    """Normalised (inputs, targets) float32 arrays per region, reflect-padded up to ``min_size``."""
    arrays = []
    for im, xs in regions:
        cond = encode_inputs(config, im.inputs)[:, :, xs]
        raw = [*im.stains]
        for lab in spec.label_names:
            raw += [boundary_target(im.labels[lab]), foreground_target(im.labels[lab])]
            if f"{lab} distance" in config.output_names:
                raw.append(distance_target(im.labels[lab]))
        tgt = encode_targets(config, np.stack(raw))[:, :, xs]
        t = torch.from_numpy(np.concatenate([cond, tgt]))
        t = reflect_pad(t, max(0, min_size - t.shape[-2]), max(0, min_size - t.shape[-1]))
        arrays.append((t[: cond.shape[0]].numpy(), t[cond.shape[0] :].numpy()))
    return arrays


def random_batch(arrays, batch_size: int, crop: int, rng: np.random.Generator):
    """Random crops with random flips/rot90 (the same for input and target), regions weighted by area."""
    areas = np.array([a[0].shape[1] * a[0].shape[2] for a in arrays], dtype=np.float64)
    xs, ys = [], []
    for r in rng.choice(len(arrays), size=batch_size, p=areas / areas.sum()):
        cond, tgt = arrays[r]
        y0 = rng.integers(0, cond.shape[1] - crop + 1)
        x0 = rng.integers(0, cond.shape[2] - crop + 1)
        both = np.concatenate([cond[:, y0 : y0 + crop, x0 : x0 + crop], tgt[:, y0 : y0 + crop, x0 : x0 + crop]])
        both = np.rot90(both, k=int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            both = both[:, :, ::-1]
        xs.append(both[: cond.shape[0]])
        ys.append(both[cond.shape[0] :])
    return torch.from_numpy(np.ascontiguousarray(xs)), torch.from_numpy(np.ascontiguousarray(ys))


def training_scheduler(config: BundleConfig):
    """The training-time noise schedule (all timesteps), or None for regression."""
    if config.objective == "residual_shift":
        return ResidualShiftScheduler.from_config(config.scheduler)
    if config.objective == "ddpm":
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config.scheduler)
    return None


def training_loss(unet, scheduler, config: BundleConfig, cond, x0, generator: torch.Generator,
                  loss: str = "mse") -> torch.Tensor:
    """The objective's loss on one batch; ``loss`` (train/objectives.py) scores a predicted x0 (regression,
    residual shift); the DDPM's noise prediction keeps MSE."""
    kinds = [c.kind for c in config.output_channels]
    if scheduler is None:
        pred = unet(cond, torch.zeros(cond.shape[0], device=cond.device, dtype=torch.long)).sample
        return reconstruction_loss(loss, pred, x0, kinds)
    t, noise = draw_noise(scheduler.config.num_train_timesteps, tuple(x0.shape), generator)
    t, noise = t.to(x0.device), noise.to(x0.device)
    if config.objective == "ddpm":
        if config.anchored:  # CorrDiff: generate the residual x0 - mu(x); mu is the condition's last channels
            x0 = x0 - cond[:, -x0.shape[1]:]
        x_t = scheduler.add_noise(x0, noise, t)
        pred = unet(torch.cat([x_t, cond], dim=1), t).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(pred, target)
    y = residual_source(config, cond)
    x_t = scheduler.add_noise(x0, noise, t, residual_source=y)
    pred = unet(torch.cat([scheduler.scale_model_input(x_t, t), cond], dim=1), t).sample
    if config.anchored:  # the network predicts x0 - mu(x); mu is y
        pred = pred.float() + y
    return reconstruction_loss(loss, pred, x0, kinds)


def validation_window(height: int, width: int, max_side: int) -> tuple[int, int]:
    """How much of a validation region the loop scores: all of it up to ``max_side``² pixels (a narrow strip keeps
    its whole length: ISL's 512 x 77 strips are scored whole), else the top-left ``max_side``² (validation during
    training must stay cheap)."""
    budget = max_side * max_side
    h, w = min(height, max_side), min(width, max_side)
    if height > h and w < max_side:
        h = min(height, budget // w)
    if width > w and h < max_side:
        w = min(width, budget // h)
    return h, w


def _validation_scale(pred: np.ndarray, truth: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A stain is scored on its truth's 1-99.8 % range (``normalize_pair``, as ``virtualstain evaluate`` does, so the
    live curve and evaluate agree); label maps, and a flat truth that has no range, on their fixed [0, 1] range."""
    if kind == "stain":
        try:
            return normalize_pair(pred, truth)[:2]
        except VirtualStainError:  # a constant truth
            pass
    return np.clip((pred + 1) / 2, 0, 1), np.clip((truth + 1) / 2, 0, 1)


def validate(unet, config: BundleConfig, val_arrays, opts: TrainOptions, device, mean_unet=None) -> dict:
    """Full sampling on the held-out regions (each whole up to max_val_size² pixels: :func:`validation_window`);
    Pearson r, PSNR and SSIM per channel, stains on their truth's percentile range (:func:`_validation_scale`)."""
    # the model being trained: keep its layout
    denoiser = Denoiser(unet, anchor_channels=config.anchor_channels, channels_last=False)
    mean_denoiser = Denoiser(mean_unet, channels_last=False) if mean_unet is not None else None
    scheduler = make_scheduler(config.objective, config.scheduler, steps=opts.val_steps,
                               zero_steps=config.takes_zero_steps)
    factor = downsample_factor(config.unet)
    per_channel: dict[str, list[dict]] = {n: [] for n in config.output_names}
    for cond, tgt in val_arrays:
        h, w = validation_window(*cond.shape[1:], opts.max_val_size)
        cond_t = torch.from_numpy(np.ascontiguousarray(cond[:, :h, :w]))[None].to(device)
        plan = TilePlan(h, w, opts.tile_size, opts.tile_overlap, factor)
        out, _ = run_stain_model(denoiser, config, cond_t, plan, 0, 4, SamplerHooks(), scheduler, mean_denoiser)
        pred = out[0].cpu().numpy()
        for c, spec in enumerate(config.output_channels):
            per_channel[spec.name].append(image_metrics(*_validation_scale(pred[c], tgt[c, :h, :w], spec.kind)))
    return {n: {k: float(np.mean([m[k] for m in ms])) for k in ("psnr", "ssim", "pearson")}
            for n, ms in per_channel.items() if ms}


def stain_job(spec: TrainingSpec, opts: TrainOptions) -> TrainingJob:
    train_regions, val_regions = split_regions(spec)
    if not train_regions:
        raise VirtualStainError("no training images: every image is marked split: val")
    if opts.elastic < 0 or (opts.elastic > 0 and not opts.augment):
        raise VirtualStainError(f"--elastic {opts.elastic:g}: the elastic deformation's sigma is a number of px >= 0, "
                                "and it is part of the augmentation: add --augment")
    if opts.plane_jitter and not opts.augment:
        raise VirtualStainError("--plane-jitter is part of the augmentation: add --augment")
    mean = load_mean_bundle(spec, opts)
    init = None
    if opts.init:
        from . import finetune

        init = finetune.load_init(opts.init)
        arch = finetune.init_unet_config(init, opts.objective, mean is not None)
        opts.block_out_channels, opts.layers_per_block = tuple(arch["block_out_channels"]), arch["layers_per_block"]
        if opts.distance_head or any(o.kind == "distance" for o in init.config.output_channels):
            opts.distance_head = True  # the source's centre map carries over (or the user asked for one)
        same = finetune.same_outputs(init, spec.input_names, [o.name for o in output_channels(
            spec, [FixedNorm(0.0, 1.0)] * len(spec.stain_names), opts.distance_head)])
    config = build_config(spec, opts, train_regions, mean, init if init is not None and same else None)
    train_arrays = region_arrays(config, spec, train_regions, opts.crop_size)
    val_arrays = region_arrays(config, spec, val_regions, 0) if val_regions else []
    mean_unet = mean.unet if mean is not None else None
    if mean_unet is not None:
        train_arrays = append_mean_prediction(train_arrays, mean_unet, opts, tile_multiple(config))
    n_inputs = len(spec.input_names)

    def next_batch(rng):
        batch = random_batch(train_arrays, opts.batch_size, opts.crop_size, rng)
        return augment_batch(*batch, rng, n_inputs, opts.elastic, opts.plane_jitter) if opts.augment else batch

    return TrainingJob(
        config,
        next_batch,
        lambda unet, sched, batch, gen: training_loss(unet, sched, config, batch[0], batch[1], gen, opts.loss),
        (lambda ema, device: validate(ema, config, val_arrays, opts, device, mean_unet)) if val_arrays else None,
        [f"{im.name}[:, {xs.start}:{xs.stop}]" for im, xs in train_regions],
        [f"{im.name}[:, {xs.start}:{xs.stop}]" for im, xs in val_regions],
        mean_unet,
        {"mean_model": {"from": str(opts.mean_from), "bundle_name": mean.config.name, "bundle_id": mean.id,
                        "training": mean.config.training}} if mean is not None else {},
        init,
    )
