"""The shared sampler loop: oracle recovery, seeds, progress, cancel."""

from __future__ import annotations

import pytest
import torch

from napari_virtualstain.core.errors import Cancelled
from napari_virtualstain.core.model import Denoiser, build_unet, default_unet_config
from napari_virtualstain.core.sampling import SamplerHooks, make_generators, sample
from napari_virtualstain.core.schedulers import ResidualShiftScheduler
from napari_virtualstain.core.tiling import TilePlan




def oracle(n_out: int):
    """A 'network' that returns the condition channels (= the true x0) of its input tiles."""

    def denoiser(tiles, t):
        return tiles[:, n_out:].clone()

    return denoiser


@pytest.fixture(scope="module")
def tiny_denoiser():
    torch.manual_seed(0)
    unet = build_unet(
        default_unet_config(2, 1, sample_size=16, block_out_channels=(8, 16), layers_per_block=1)
    ).eval()
    return Denoiser(unet)


def run(denoiser, cond, seeds, *, T=4, tile=16, overlap=4, hooks=None, batch_size=4):
    s = ResidualShiftScheduler(num_train_timesteps=T)
    gens = make_generators(seeds)
    y = cond.mean(dim=1, keepdim=True)
    x_start = s.prior_sample(y, generator=gens)
    plan = TilePlan(cond.shape[-2], cond.shape[-1], tile, overlap, 8)
    return sample(denoiser, s, x_start, plan, gens, condition=cond, hooks=hooks, batch_size=batch_size)


@pytest.mark.parametrize("shape", [(1, 2, 40, 36), (2, 1, 20, 12)])
def test_oracle_recovers_x0(shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    s = ResidualShiftScheduler()
    gens = make_generators(range(shape[0]))
    y = torch.rand(shape, generator=g) * 2 - 1  # any y: the chain must end at x0
    x_start = s.prior_sample(y, generator=gens)
    plan = TilePlan(shape[-2], shape[-1], 16, 4, 8)
    steps = []
    out = sample(
        oracle(shape[1]), s, x_start, plan, gens, condition=x0,
        hooks=SamplerHooks(on_step=lambda i, t, x0_hat: steps.append((i, t, x0_hat))),
    )
    assert out.shape == x0.shape
    assert torch.allclose(out, x0, atol=1e-5)
    assert [(i, t) for i, t, _ in steps] == [(i, 14 - i) for i in range(15)]
    assert all(torch.allclose(x, x0, atol=1e-5) for _, _, x in steps)


def test_same_seed_same_result_different_seed_different(tiny_denoiser):
    cond = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = run(tiny_denoiser, cond, [7])
    b = run(tiny_denoiser, cond, [7])
    c = run(tiny_denoiser, cond, [8])
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_seed_batch_equals_single_runs(tiny_denoiser):
    cond = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    both = run(tiny_denoiser, cond.expand(2, -1, -1, -1), [11, 12])
    first = run(tiny_denoiser, cond, [11])
    second = run(tiny_denoiser, cond, [12])
    assert torch.allclose(both[0:1], first, atol=1e-4)
    assert torch.allclose(both[1:2], second, atol=1e-4)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_progress_per_tile_and_step():
    cond = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    plan = TilePlan(40, 40, 16, 4, 8)
    n_tiles = len(plan)
    assert n_tiles == 9
    events = []
    on_step = []
    run(oracle(1), cond, [0], T=3, batch_size=1,
        hooks=SamplerHooks(progress=events.append, on_step=lambda i, t, x: on_step.append(i)))
    assert len(events) == 3 * n_tiles + 1
    for i in range(3):
        per_step = events[i * n_tiles : (i + 1) * n_tiles]
        assert [(e.step, e.num_steps, e.tile, e.num_tiles) for e in per_step] == [
            (i, 3, k, n_tiles) for k in range(1, n_tiles + 1)
        ]
    assert (events[-1].step, events[-1].num_steps) == (3, 3)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert on_step == [0, 1, 2]


def test_batch_size_groups_tiles():
    cond = torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    calls = []

    def net(tiles, t):
        calls.append(tiles.shape[0])
        return tiles[:, 1:]

    events = []
    run(net, cond, [0], T=2, batch_size=4, hooks=SamplerHooks(progress=events.append))
    assert calls == [4, 4, 1] * 2  # 9 tiles in calls of at most batch_size samples
    assert [e.tile for e in events[:3]] == [4, 8, 9]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_cancel_after_k_steps(k):
    cond = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    steps = []
    checks = {"n": 0}

    def should_cancel():
        checks["n"] += 1
        return checks["n"] > k

    result = None
    with pytest.raises(Cancelled):
        result = run(oracle(1), cond, [0], T=5,
                     hooks=SamplerHooks(should_cancel=should_cancel, on_step=lambda i, t, x: steps.append(i)))
    assert result is None
    assert steps == list(range(k))  # stopped between steps: no further network call after the request


def test_cancel_after_last_step_returns_nothing():
    cond = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(0))
    steps = []
    with pytest.raises(Cancelled):
        run(oracle(1), cond, [0], T=3,
            hooks=SamplerHooks(should_cancel=lambda: len(steps) == 3, on_step=lambda i, t, x: steps.append(i)))
    assert steps == [0, 1, 2]
