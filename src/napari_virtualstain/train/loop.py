"""The training loop: random crops + flips/rot90, AdamW, EMA weights, validation PSNR/SSIM, resume, a bundle.

Residual-shift objective (CellResDM / ResShift): t ~ U{0..T-1}, x_t = add_noise(x0, eps, t, y), the UNet sees the
scaled x_t with the input channels concatenated and predicts x0; loss = MSE(x̂0, x0).
DDPM objective (DM4ISL-style label-free prediction): t ~ U{0..999}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
the UNet sees x_t with the inputs concatenated and predicts eps; loss = MSE(eps_hat, eps). Sampled with diffusers'
DDIM (few steps) or DDPM (all steps); its x̂0 trajectory feeds the uncertainty maps.
Regression objective: the same UNet (timestep 0) maps the inputs to the targets in one pass; loss = MSE. It is the
honest baseline that the diffusion model has to beat.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..core.bundle import DIFFUSION_OBJECTIVES, OBJECTIVES, BundleConfig, ChannelSpec, save_bundle
from ..core.errors import VirtualStainError
from ..core.metrics import image_metrics
from ..core.model import Denoiser, build_unet, default_unet_config, downsample_factor, fast_bf16, pick_device
from ..core.normalize import FixedNorm, PercentileNorm, fit_fixed_norm
from ..core.postprocess import boundary_target, distance_target, foreground_target
from ..core.sampling import SamplerHooks, tile_multiple
from ..core.schedulers import ResidualShiftScheduler, default_ddpm_config, make_scheduler
from ..core.tasks.stain import encode_inputs, encode_targets, residual_source, run_stain_model
from ..core.tiling import TilePlan, reflect_pad
from . import distributed
from .data import TrainingSpec, split_regions
from .augment import augment_batch
from .distributed import draw_noise
from .objectives import reconstruction_loss
from .progress import TrainProgress  # noqa: F401 - re-exported: the loop's progress lines

log = logging.getLogger(__name__)
STATE_DIR = "training_state"


@dataclass
class TrainOptions:
    objective: str = "residual_shift"
    steps: int = 2000
    batch_size: int = 8
    crop_size: int = 128
    lr: float = 2e-4
    lr_schedule: str = "constant"  # or "cosine": lr * (1 + cos(pi * step / steps)) / 2 after a 100-step warm-up
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    val_every: int = 500
    seed: int = 0
    device: str | None = None
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    tile_size: int = 256
    tile_overlap: int = 32
    kappa: float = 2.0
    num_timesteps: int = 15
    max_val_size: int = 256
    val_steps: int | None = None  # DDIM steps for validating a ddpm model (default 50)
    prediction_type: str = "epsilon"  # ddpm: what the UNet predicts (epsilon as DM4ISL, or v_prediction)
    residual_source: str = "mean_input"  # residual shift: "mean_input" (CellResDM) or "mean_prediction" (anchored)
    mean_from: str | None = None  # mean_prediction: the regression bundle whose network is mu(x) (kept frozen)
    half_weights: bool = False
    max_minutes: float | None = None  # time budget: after a short probe, steps = what fits (GPU recipes)
    precision: str = "auto"  # auto: bf16 autocast where it is fast (AVX-512 bf16/AMX CPUs, bf16 GPUs), else float32
    loss: str = "mse"  # x0 reconstruction loss (train/objectives.py): mse, l1_msssim or spotlight
    distance_head: bool = False  # add a '<set> distance' centre map per labels set (labels route 'distance')
    augment: bool = False  # rotation/zoom + intensity augmentation (train/augment.py) on top of flips/rot90
    stage: str = ""  # shown before the progress (the recipe's "stage 1/3 mean network")
    init: str | None = None  # fine-tune: start from this bundle's weights (train/finetune.py)
    command: str = ""
    extra: dict = field(default_factory=dict)


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


def validate(unet, config: BundleConfig, val_arrays, opts: TrainOptions, device, mean_unet=None) -> dict:
    """Full sampling on the held-out regions (at most max_val_size^2 each); PSNR/SSIM per channel on [0, 1]."""
    anchor = len(config.output_channels) if config.anchored and config.objective == "residual_shift" else 0
    denoiser = Denoiser(unet, anchor_channels=anchor, channels_last=False)  # the model being trained: keep its layout
    mean_denoiser = Denoiser(mean_unet, channels_last=False) if mean_unet is not None else None
    scheduler = make_scheduler(config.objective, config.scheduler, steps=opts.val_steps)
    factor = downsample_factor(config.unet)
    per_channel: dict[str, list[dict]] = {n: [] for n in config.output_names}
    for cond, tgt in val_arrays:
        h, w = (min(s, opts.max_val_size) for s in cond.shape[1:])
        cond_t = torch.from_numpy(np.ascontiguousarray(cond[:, :h, :w]))[None].to(device)
        plan = TilePlan(h, w, opts.tile_size, opts.tile_overlap, factor)
        out, _ = run_stain_model(denoiser, config, cond_t, plan, 0, 4, SamplerHooks(), scheduler, mean_denoiser)
        pred = np.clip((out[0].cpu().numpy() + 1) / 2, 0, 1)
        truth = np.clip((tgt[:, :h, :w] + 1) / 2, 0, 1)
        for c, name in enumerate(config.output_names):
            per_channel[name].append(image_metrics(pred[c], truth[c]))
    return {n: {k: float(np.mean([m[k] for m in ms])) for k in ("psnr", "ssim", "pearson")}
            for n, ms in per_channel.items() if ms}


def _save_state(out: Path, step: int, unet, ema, opt, rng: np.random.Generator, gen: torch.Generator, history):
    """Resume state without pickle: tensors in safetensors, the rest in JSON."""
    from safetensors.torch import save_file

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    opt_sd = opt.state_dict()
    for idx, st in opt_sd["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["torch_rng"] = gen.get_state()
    save_file(tensors, str(state_dir / "state.safetensors"))
    meta = {"step": step, "param_groups": opt_sd["param_groups"], "numpy_rng": rng.bit_generator.state, "history": history}
    (state_dir / "state.json").write_text(json.dumps(meta, default=_jsonable))


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))


def _load_state(out: Path, unet, ema, opt, rng: np.random.Generator, gen: torch.Generator):
    from safetensors.torch import load_file

    state_dir = out / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise VirtualStainError(f"nothing to resume: {state_dir} has no saved training state")
    tensors = load_file(str(state_dir / "state.safetensors"))
    meta = json.loads((state_dir / "state.json").read_text())
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    groups = meta["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    rng.bit_generator.state = meta["numpy_rng"]
    gen.set_state(tensors["torch_rng"])
    return meta["step"], meta["history"]


BUDGET_PROBE_STEPS = 20


def budgeted_steps(opts: TrainOptions, probed: int, seconds: float, start: int) -> int:
    """The step count that fits ``opts.max_minutes`` at the probed speed (10 % kept for validation and saving);
    ``opts.steps`` is lowered to it so the learning-rate schedule ends where training ends."""
    rate = probed / max(seconds, 1e-9)
    fits = start + max(probed, int(rate * (opts.max_minutes * 60 * 0.9 - seconds)))
    opts.steps = min(opts.steps, fits)
    log.info("time budget %.1f min at %.1f steps/s: %d steps", opts.max_minutes, rate, opts.steps)
    return opts.steps


def learning_rate(opts: TrainOptions, step: int) -> float:
    """Stateless schedule (a resumed run gets the same rate at the same step): constant, or warm-up + cosine decay."""
    if opts.lr_schedule == "constant":
        return opts.lr
    if opts.lr_schedule != "cosine":
        raise VirtualStainError(f"lr schedule {opts.lr_schedule!r}: use constant or cosine")
    warm = min(100, max(1, opts.steps // 10))
    if step < warm:
        return opts.lr * (step + 1) / warm
    return opts.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, opts.steps - warm))))


def training_autocast(precision: str, device: torch.device) -> bool:
    """bf16 autocast for the forward/backward pass (weights, optimiser and EMA stay float32)."""
    if precision not in ("auto", "bf16", "float32"):
        raise VirtualStainError(f"precision {precision!r}: use auto, bf16 or float32")
    if precision == "float32":
        return False
    fast = fast_bf16(device)
    if precision == "bf16" and not fast and device.type != "cpu":
        raise VirtualStainError(f"bf16 is not supported on {device}; use --precision float32")
    return precision == "bf16" or fast


@dataclass
class TrainingJob:
    """What differs between tasks; the loop (optimiser, EMA, resume, logging, saving) is shared."""

    config: BundleConfig
    next_batch: Callable[[np.random.Generator], tuple]  # -> tensors for ``loss``
    loss: Callable[..., torch.Tensor]  # (unet, scheduler, batch on device, generator) -> scalar
    validate: Callable[..., dict] | None  # (ema unet, device) -> metrics
    train_regions: list[str]
    val_regions: list[str]
    mean_unet: torch.nn.Module | None = None  # mean-anchored: the frozen mu(x), saved in the same bundle
    provenance: dict = field(default_factory=dict)  # extra facts for config.training (e.g. where mu came from)
    init: object | None = None  # fine-tuning: the Bundle whose weights the network starts from


def stain_job(spec: TrainingSpec, opts: TrainOptions) -> TrainingJob:
    train_regions, val_regions = split_regions(spec)
    if not train_regions:
        raise VirtualStainError("no training images: every image is marked split: val")
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
        return augment_batch(*batch, rng, n_inputs) if opts.augment else batch

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


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def describe_split(spec, job: TrainingJob | None = None) -> str:
    """One line on which pixels train and which are held out for validation: the strip is otherwise a surprise
    that only config.json mentions."""
    if not isinstance(spec, TrainingSpec):
        if job is None:
            return ""
        return f"training on {len(job.train_regions)} image(s); validation: {'; '.join(job.val_regions) or 'none'}"
    train_r, val_r = split_regions(spec)
    if not val_r:
        return (f"validation: none - all of {len(train_r)} image(s) train (val fraction 0 and no image marked "
                "split: val); hold some out with --val-fraction or by marking images split: val")
    if all(xs == slice(None) for _, xs in val_r):
        return (f"validation: {len(val_r)} image(s) marked split: val are held out whole "
                f"({_few([im.name for im, _ in val_r])}); {len(train_r)} image(s) train "
                f"({_few([im.name for im, _ in train_r])})")
    cuts = {im.inputs.shape[-1]: xs.start for im, xs in val_r}  # width -> first held-out column
    held = ", ".join(f"x >= {c} of {w}" for w, c in sorted(cuts.items()))
    kept = ", ".join(sorted({f"x < {c}" for c in cuts.values()}))
    return (f"validation: the right-hand {100 * spec.val_fraction:g} % of each of {len(val_r)} image(s) ({held}) is "
            f"held out; training uses the rest ({kept}); change with --val-fraction or mark images split: val")


def _earlier_commands(out: Path) -> list[str]:
    """The commands of the runs a resume continues, read from the bundle they wrote (config.json)."""
    try:
        training = json.loads((out / "config.json").read_text()).get("training", {})
        commands = training.get("commands") or ([training["command"]] if training.get("command") else [])
        return [str(c) for c in commands]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def train(
    spec,
    out: str | Path,
    opts: TrainOptions,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_validate: Callable[[dict], None] | None = None,
):
    """Train and write a bundle to ``out`` (and resume state to ``out/training_state``); returns (bundle, history).

    Under ``torchrun`` every process runs this; rank 0 writes and returns the bundle, the others return None.

    ``spec``: a paired-stain :class:`TrainingSpec` or a class-conditional ``ClassCondSpec``. ``on_step(step, loss)``
    after every step (raise ``Cancelled`` there to stop: the last validated bundle stays as it was written),
    ``on_validate(record)`` after every validation (step, loss, seconds, val metrics).
    """
    from .classcond import ClassCondSpec, classcond_job

    out = Path(out)
    job = classcond_job(spec, opts) if isinstance(spec, ClassCondSpec) else stain_job(spec, opts)
    config = job.config
    ranks, device = distributed.setup(pick_device(opts.device))  # torchrun: this process's rank and device
    if ranks.main:
        print(describe_split(spec, job), file=sys.stderr, flush=True)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    unet = build_unet(config.unet).to(device)
    if job.init is not None:
        from . import finetune

        finetune.load_init_weights(unet, job.init, config)
        job.provenance.update(finetune.provenance(job.init, opts.init, config))
    elif job.mean_unet is not None and config.objective == "residual_shift":
        # start as mu exactly: the residual head outputs 0 until it has learned something
        torch.nn.init.zeros_(unet.conv_out.weight)
        torch.nn.init.zeros_(unet.conv_out.bias)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    model = distributed.wrap(unet, ranks, device)  # DDP under torchrun: gradients averaged over the ranks
    opt = torch.optim.AdamW(unet.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = training_scheduler(config)
    start, history = (0, [])
    if resume:
        start, history = _load_state(out, unet, ema, opt, rng, gen)
        log.info("resuming at step %d", start)
    # every run that made this bundle, first first: a resume alone would not reproduce it
    commands = [*(_earlier_commands(out) if resume else []), *([opts.command] if opts.command else [])]
    config.training = {
        "data": spec.source, "objective": config.objective, "steps": opts.steps, "seed": opts.seed,
        "package_version": __version__, "command": commands[0] if commands else opts.command, "commands": commands,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("command", "extra")},
        "train_regions": job.train_regions, "val_regions": job.val_regions, **job.provenance, **opts.extra,
    }
    progress = TrainProgress(opts.steps, start, f"{opts.stage + ': ' if opts.stage else ''}train {config.task}/{config.objective}",
                             None if ranks.main else io.StringIO())
    amp = training_autocast(opts.precision, device)
    config.training["precision"] = "bf16" if amp else "float32"
    unet.train()
    t0, running = time.perf_counter(), None
    earlier = float(history[-1].get("seconds", 0.0)) if history else 0.0  # a resumed run's clock carries on
    total = opts.steps
    for step in itertools.count(start):
        if step >= total:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(opts, step)
        # every rank draws the same global batch and trains on its slice (train/distributed.py)
        batch = tuple(t.to(device) for t in distributed.shard(job.next_batch(rng), ranks))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = job.loss(model, scheduler, batch, gen).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(opts.ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not stuck at init
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
            for be, b in zip(ema.buffers(), unet.buffers()):
                be.copy_(b)
        value = distributed.mean_over_ranks(loss.item(), device)
        running = value if running is None else 0.98 * running + 0.02 * value
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if opts.max_minutes and done == start + BUDGET_PROBE_STEPS:
            total = distributed.agree(budgeted_steps(opts, done - start, time.perf_counter() - t0, start), device)
            config.training["steps"] = progress.total = total
        if not ranks.main:
            continue
        if done % opts.val_every == 0 or done == total:
            record = {"step": done, "loss": running, "seconds": round(earlier + time.perf_counter() - t0, 1)}
            if job.validate is not None:
                record["val"] = job.validate(ema, device)
                log.info("step %d val %s", done, record["val"])
            history.append(record)
            _save_state(out, done, unet, ema, opt, rng, gen, history)
            config.training["history"] = history
            save_bundle(out, config, ema, half=opts.half_weights, mean_unet=job.mean_unet)
            progress.update(done, running, record["seconds"], validated=True, val=record.get("val"))
            if on_validate is not None:
                on_validate(dict(record))
        else:
            progress.update(done, running, earlier + time.perf_counter() - t0)
    progress.close()
    bundle = None
    if ranks.main:
        config.training["history"] = history
        if ranks.world > 1:
            config.training["processes"] = ranks.world
        bundle = save_bundle(out, config, ema, half=opts.half_weights, mean_unet=job.mean_unet)
        (out / "training_log.json").write_text(json.dumps(history, indent=2))
    distributed.barrier()
    distributed.teardown()
    return bundle, history
