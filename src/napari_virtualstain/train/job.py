"""What a training run is: its options (``TrainOptions``) and, per task, the pieces the one loop calls
(``TrainingJob``). Both the loop and the task modules import this; it imports neither."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core.bundle import BundleConfig

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
    tile_size: int = 128  # the bundle's prediction tiles: 128/16 measured fastest on a CPU (docs/benchmarks.md)
    tile_overlap: int = 16
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
    elastic: float = 0.0  # with augment: elastic deformation, displacement sigma in px (train/augment.py); 0 = none
    plane_jitter: bool = False  # with augment: a gain and offset per input plane too (train/augment.py)
    stage: str = ""  # shown before the progress (the recipe's "stage 1/3 mean network")
    init: str | None = None  # fine-tune: start from this bundle's weights (train/finetune.py)
    networks: int = 1  # a deep ensemble: the one-pass network trained under this many seeds (train/ensemble.py)
    command: str = ""
    extra: dict = field(default_factory=dict)


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
