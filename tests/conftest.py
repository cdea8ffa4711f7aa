"""Shared pytest fixtures.

Tests never reach the network: Hugging Face hubs are forced offline here as
well as in the README's test command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# runs pick their threads from the free cores (core.threads); the tiny test networks want one (see below)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["gui_support"]  # the napari widget tests' fixtures (tests/gui_support.py)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout (parent of ``tests/``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout: real microscopy data, read-only."""
    path = (REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (expected ../shared/data beside the repo)")
    return path


def make_tiny_config(objective: str = "residual_shift", tile: int = 32, n_inputs: int = 1):
    """A tiny stain bundle config: Hoechst stain + nuclei boundary/foreground, widths (8, 16)."""
    from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec
    from napari_virtualstain.core.model import default_unet_config
    from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
    from napari_virtualstain.core.schedulers import ResidualShiftScheduler, default_ddpm_config

    outs = [
        ChannelSpec("Hoechst", "stain", FixedNorm(100.0, 1100.0)),
        ChannelSpec("nuclei boundary", "boundary", FixedNorm(0.0, 1.0), "nuclei", "nuclei foreground"),
        ChannelSpec("nuclei foreground", "foreground", FixedNorm(0.0, 1.0), "nuclei"),
    ]
    inputs = [ChannelSpec("brightfield" if n_inputs == 1 else f"z{i}", "input", PercentileNorm()) for i in range(n_inputs)]
    n_in = n_inputs + (len(outs) if objective != "regression" else 0)
    sched = {"residual_shift": lambda: dict(ResidualShiftScheduler().config),
             "ddpm": lambda: default_ddpm_config(num_train_timesteps=100)}.get(objective, lambda: None)()
    return BundleConfig(
        name="tiny", task="stain", objective=objective, input_channels=inputs, output_channels=outs,
        unet=default_unet_config(n_in, len(outs), tile, (8, 16)), scheduler=sched, tile_size=tile, tile_overlap=8,
        pixel_size_um=0.5, training={"data": "synthetic (tests)"},
    )


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory) -> Path:
    """A saved tiny (untrained) residual-shift bundle folder."""
    import torch

    from napari_virtualstain.core.bundle import save_bundle
    from napari_virtualstain.core.model import build_unet

    config = make_tiny_config()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundles") / "tiny"
    save_bundle(path, config, build_unet(config.unet))
    return path


@pytest.fixture(scope="session")
def tiny_ddpm_bundle_dir(tmp_path_factory) -> Path:
    """A saved tiny (untrained) epsilon-DDPM bundle folder (100 training timesteps)."""
    import torch

    from napari_virtualstain.core.bundle import save_bundle
    from napari_virtualstain.core.model import build_unet

    config = make_tiny_config("ddpm")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundles") / "tiny-ddpm"
    save_bundle(path, config, build_unet(config.unet))
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tiny test networks gain nothing from intra-op threads; on a busy 2-core machine they make them ~50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def two_class_field(kind: str, seed: int, shape=(48, 48)) -> np.ndarray:
    """Two-channel synthetic 'cells': DNA spots; 'signal' inside the spots (kind N) or in a ring around them (kind C)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dna = np.zeros(shape)
    signal = np.zeros(shape)
    for _ in range(6):
        cy, cx = rng.uniform(4, shape[0] - 4), rng.uniform(4, shape[1] - 4)
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dna += 200 * np.exp(-r2 / 8)
        signal += 150 * (np.exp(-r2 / 8) if kind == "N" else np.exp(-((np.sqrt(r2) - 5) ** 2) / 3))
    return np.stack([signal, dna]).astype(np.float32) + 10


def train_two_class(out, name: str, invariant=()):
    """A tiny class-conditional model trained for 300 steps on ``two_class_field`` data (classes N and C, channels
    signal + DNA); ``invariant`` channels condition it instead of being generated."""
    import torch

    from napari_virtualstain.train.classcond_data import ClassCondSpec, ClassImage
    from napari_virtualstain.train.loop import TrainOptions, train

    torch.manual_seed(0)
    images = [ClassImage(f"{k}{i}", k, two_class_field(k, 10 * i + (k == "C"))) for k in ("N", "C") for i in range(3)]
    spec = ClassCondSpec(name, ["signal", "DNA"], ["N", "C"], images, source="synthetic (tests)",
                         invariant=list(invariant))
    opts = TrainOptions(objective="ddpm", steps=300, batch_size=8, crop_size=16, lr=2e-3, ema_decay=0.99,
                        val_every=300, block_out_channels=(16, 32), tile_size=16, tile_overlap=4)
    bundle, _ = train(spec, out / name, opts)
    return bundle
