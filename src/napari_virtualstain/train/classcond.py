"""Training a class-conditional DDPM (translation / synthesis): epsilon loss with class embeddings and ~10 % of the
labels replaced by the null class (condition dropout), so one network also gives the unconditional eps that
classifier-free guidance needs. Runs inside the shared loop in ``loop.train``.

Invariant channels (``invariant: [DNA]``): channels a condition does not change are concatenated to x_t as
conditioning, never noised or generated; the network learns p(variable | invariant, class) — where NF-kB sits
relative to the nuclei that are there — instead of spending capacity on redrawing the nuclei.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.bundle import BundleConfig, ChannelSpec
from ..core.errors import VirtualStainError
from ..core.model import default_unet_config, downsample_factor
from ..core.normalize import fit_fixed_norm, fixed_normalize
from ..core.schedulers import default_ddpm_config
from ..core.tiling import reflect_pad
from .job import TrainingJob
from .classcond_data import ClassCondSpec
from .distributed import draw_noise

__all__ = ["ClassCondSpec", "classcond_job", "build_classcond_config"]


def classcond_schedule() -> dict:
    """Zero terminal SNR (rescaled linear betas) + v-prediction + trailing spacing (Lin et al. 2024, as PhenDiff).

    Why: translation inverts the image all the way to t = T. With an epsilon model and a schedule whose last
    alpha_bar is ~0 (cosine, capped), the inverse step into T and the first regeneration step divide the model's
    small eps mismatch by sqrt(alpha_bar_T) and blow it up; v-prediction keeps both x̂0 and eps well conditioned at
    every t, and zero terminal SNR makes "noise" at T really carry no image, so regeneration under another class
    starts from the same place training did. x̂0 is not clipped: real images exceed the training percentile range.
    """
    return default_ddpm_config(prediction_type="v_prediction", beta_schedule="linear", rescale_betas_zero_snr=True,
                               clip_sample=False)


def build_classcond_config(spec: ClassCondSpec, opts) -> BundleConfig:
    if opts.objective != "ddpm":
        raise VirtualStainError(f"a class-conditional model is a DDPM; objective {opts.objective!r} does not apply")
    if not spec.classes:
        raise VirtualStainError("no classes in the training data")
    spec.check_invariant()
    norms = {name: fit_fixed_norm([im.image[c] for im in spec.images]) for c, name in enumerate(spec.channel_names)}
    n_out, n_in = len(spec.variable), len(spec.invariant)
    unet = default_unet_config(n_out + n_in, n_out, opts.crop_size, tuple(opts.block_out_channels), opts.layers_per_block)
    unet["num_class_embeds"] = len(spec.classes) + 1
    factor = downsample_factor(unet)
    if opts.crop_size % factor or opts.tile_size % factor:
        raise VirtualStainError(f"crop size and tile size must be multiples of {factor}")
    return BundleConfig(
        name=spec.name, description=spec.description, task="classcond", objective="ddpm",
        input_channels=[ChannelSpec(c, "input", norms[c]) for c in spec.invariant],
        output_channels=[ChannelSpec(c, "stain", norms[c]) for c in spec.variable],
        unet=unet, scheduler=classcond_schedule(), tile_size=opts.tile_size, tile_overlap=opts.tile_overlap,
        pixel_size_um=spec.pixel_size_um, classes=list(spec.classes),
        image_channels=list(spec.channel_names) if spec.invariant else [],
    )


def classcond_job(spec: ClassCondSpec, opts):
    config = build_classcond_config(spec, opts)
    by_name = {c.name: c.normalization for c in config.output_channels + config.input_channels}
    norms = [by_name[c] for c in spec.channel_names]
    out_idx = [spec.channel_names.index(c) for c in spec.variable]
    in_idx = [spec.channel_names.index(c) for c in spec.invariant]
    arrays, labels = [], []
    for im in spec.images:
        t = torch.from_numpy(fixed_normalize(im.image, norms))
        t = reflect_pad(t, max(0, opts.crop_size - t.shape[-2]), max(0, opts.crop_size - t.shape[-1]))
        arrays.append(t.numpy())
        labels.append(spec.classes.index(im.class_name))
    labels = np.asarray(labels)
    # every class equally often, whatever its image count/area; within a class, images weighted by area
    areas = np.array([a.shape[1] * a.shape[2] for a in arrays], dtype=np.float64)
    per_class = np.array([areas[labels == c].sum() for c in range(len(spec.classes))])
    weights = areas / per_class[labels]
    weights /= weights.sum()
    dropout = float(opts.extra.get("cond_dropout", 0.1))

    def next_batch(rng: np.random.Generator):
        xs, ys = [], []
        for r in rng.choice(len(arrays), size=opts.batch_size, p=weights):
            a = arrays[r]
            y0 = rng.integers(0, a.shape[1] - opts.crop_size + 1)
            x0 = rng.integers(0, a.shape[2] - opts.crop_size + 1)
            crop = np.rot90(a[:, y0 : y0 + opts.crop_size, x0 : x0 + opts.crop_size], k=int(rng.integers(4)), axes=(1, 2))
            if rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            xs.append(crop)
            ys.append(config.null_class if rng.random() < dropout else labels[r])
        return torch.from_numpy(np.ascontiguousarray(xs)), torch.as_tensor(ys, dtype=torch.long)

    def loss(unet, scheduler, batch, gen: torch.Generator) -> torch.Tensor:
        images, cls = batch
        x0 = images[:, out_idx]
        t, noise = draw_noise(scheduler.config.num_train_timesteps, tuple(x0.shape), gen)
        t, noise = t.to(x0.device), noise.to(x0.device)
        net_in = scheduler.add_noise(x0, noise, t)
        if in_idx:  # invariant channels: given as they are, as the brightfield is to a stain model
            net_in = torch.cat([net_in, images[:, in_idx]], dim=1)
        pred = unet(net_in, t, class_labels=cls).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        return F.mse_loss(pred, target)

    counts = {c: int((labels == i).sum()) for i, c in enumerate(spec.classes)}
    return TrainingJob(config, next_batch, loss, None,
                       [f"{im.class_name}/{im.name} {tuple(im.image.shape)}" for im in spec.images],
                       [f"none (held-out data are not read; images per class: {counts})"])
