"""Tiling: tiled == untiled for local networks, no seams, any image size, reflect padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec, save_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.model import build_unet, default_unet_config
from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.tiling import TilePlan, reflect_pad
from napari_virtualstain.core.settings import RunSettings




def smooth_image(h, w, c=1, seed=0, freq=0.3):
    """A smooth random field (sum of a few low-frequency waves), shape (1, c, h, w)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    out = torch.zeros(c, h, w)
    for ch in range(c):
        for _ in range(4):
            fy, fx, ph = (torch.rand(3, generator=g) * torch.tensor([freq, freq, 6.0])).tolist()
            out[ch] += torch.sin(fy * yy + fx * xx + ph)
    return out[None]


def per_pixel(x):
    """A nonlinear per-pixel network with 3 output channels."""
    return torch.cat([torch.tanh(2 * x[:, :1]), x.sum(1, keepdim=True) ** 2, torch.sin(3 * x[:, -1:])], dim=1)


@pytest.mark.parametrize(
    "h, w, tile, overlap",
    [
        (40, 40, 16, 4),  # 3x3 tiles
        (45, 37, 16, 6),  # not divisible by the downsampling factor
        (20, 12, 32, 8),  # smaller than a tile
        (64, 24, 16, 0),  # no overlap
        (100, 9, 32, 16),  # overlap of half a tile, thin image
    ],
)
def test_per_pixel_network_tiled_equals_untiled(h, w, tile, overlap):
    x = torch.randn(2, 2, h, w, generator=torch.Generator().manual_seed(0))
    plan = TilePlan(h, w, tile, overlap, 8)
    out = plan.apply(per_pixel, x, batch_size=3)
    assert out.shape == (2, 3, h, w)
    assert torch.allclose(out, per_pixel(x), atol=1e-5)


def test_plan_geometry():
    plan = TilePlan(45, 37, 16, 6, 8)
    assert plan.padded_shape == (48, 40)
    assert plan.padded_shape[0] % 8 == 0 and plan.padded_shape[1] % 8 == 0
    small = TilePlan(20, 12, 32, 8, 8)
    assert small.padded_shape == (32, 32) and len(small) == 1
    for p in (plan, small, TilePlan(100, 9, 32, 16, 8), TilePlan(40, 40, 16, 0, 8)):
        cover = torch.zeros(p.padded_shape)
        for tl in p.tiles:
            assert tl.window.shape == (p.tile_size, p.tile_size)
            assert (tl.window > 0).all()
            assert tl.window.max() <= 1
            cover[tl.y : tl.y + p.tile_size, tl.x : tl.x + p.tile_size] += tl.window
            assert tl.y + p.tile_size <= p.padded_shape[0] and tl.x + p.tile_size <= p.padded_shape[1]
        assert (cover > 0).all()  # every pixel is predicted
    assert TilePlan(45, 37, 16, 6, 8).describe()["num_tiles"] == len(plan)


def test_overlapping_windows_sum_to_one_on_uniform_grid():
    # tiles at 0, 12, 24 with overlap 4: the sin^2 ramps of neighbours add up to exactly 1
    plan = TilePlan(40, 40, 16, 4, 8)
    assert sorted({t.y for t in plan.tiles}) == [0, 12, 24]
    cover = torch.zeros(plan.padded_shape)
    for tl in plan.tiles:
        cover[tl.y : tl.y + 16, tl.x : tl.x + 16] += tl.window
    assert torch.allclose(cover, torch.ones_like(cover), atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(height=7, width=40, tile_size=16, overlap=4),
        dict(height=40, width=5, tile_size=16, overlap=4),
        dict(height=40, width=40, tile_size=20, overlap=4),  # not a multiple of 8
        dict(height=40, width=40, tile_size=16, overlap=9),  # more than half a tile
        dict(height=40, width=40, tile_size=16, overlap=-1),
    ],
)
def test_bad_plans_raise(kw):
    with pytest.raises(VirtualStainError):
        TilePlan(multiple=8, **kw)


def tile_rim_mask(plan: TilePlan, rim: int) -> torch.Tensor:
    """Pixels within ``rim`` of an edge of some tile that is not the canvas edge (where a tile sees less context)."""
    ph, pw = plan.padded_shape
    t = plan.tile_size
    m = torch.zeros(ph, pw, dtype=torch.bool)
    for tl in plan.tiles:
        if tl.y > 0:
            m[tl.y : tl.y + rim, tl.x : tl.x + t] = True
        if tl.y + t < ph:
            m[tl.y + t - rim : tl.y + t, tl.x : tl.x + t] = True
        if tl.x > 0:
            m[tl.y : tl.y + t, tl.x : tl.x + rim] = True
        if tl.x + t < pw:
            m[tl.y : tl.y + t, tl.x + t - rim : tl.x + t] = True
    return m[: plan.height, : plan.width]


def test_conv3x3_interior_agreement():
    torch.manual_seed(0)
    weight = torch.randn(2, 1, 3, 3)
    fn = lambda x: F.conv2d(x, weight, padding=1)  # noqa: E731
    x = smooth_image(48, 40, seed=1) + 0.1 * torch.randn(1, 1, 48, 40)
    plan = TilePlan(48, 40, 16, 6, 8)
    assert plan.padded_shape == (48, 40) and len(plan) > 4
    tiled = plan.apply(fn, x)
    full = fn(x)
    rim = tile_rim_mask(plan, 1)
    assert rim.any() and (~rim).sum() > rim.sum()
    # away from tile edges the result is exact
    assert torch.allclose(tiled[..., ~rim], full[..., ~rim], atol=1e-5)
    # at tile edges the blend gives the wrong (zero-padded) value only a small weight
    err = (tiled - full).abs().max()
    assert err < 0.05 * full.abs().max()


def border_spikes(out: torch.Tensor, plan: TilePlan) -> float:
    """Largest excess of the gradient across a tile edge over the gradient just before/after it (a seam detector)."""
    t = plan.tile_size
    excess = []
    for axis, starts, size in ((0, {tl.y for tl in plan.tiles}, out.shape[0]), (1, {tl.x for tl in plan.tiles}, out.shape[1])):
        g = (out.diff(dim=axis)).abs()
        g = g if axis == 0 else g.T
        edges = sorted({s for s in starts if s > 0} | {s + t for s in starts if s + t < size})
        for e in edges:  # g[e - 1] is the step from pixel e - 1 to e, across the edge
            excess.append(float((g[e - 1] - torch.maximum(g[e - 2], g[e])).max()))
    assert excess
    return max(excess)


def test_no_seams_for_smooth_network():
    x = smooth_image(64, 56, seed=2, freq=0.1)
    fn = lambda t: torch.sin(t) + 0.1 * t**2  # noqa: E731
    plan = TilePlan(64, 56, 16, 4, 8)
    out = plan.apply(fn, x)[0, 0]
    grad_max = max(out.diff(dim=0).abs().max(), out.diff(dim=1).abs().max())
    # the step across a tile edge is no larger than the steps beside it (up to the curvature of a smooth image)
    assert border_spikes(out, plan) < 0.05 * grad_max
    assert border_spikes(fn(x)[0, 0], plan) < 0.05 * grad_max  # the untiled output has none either
    # and the merged output is the smooth function itself (no dips where windows taper)
    assert torch.allclose(out, fn(x)[0, 0], atol=1e-5)
    # a network with a small per-tile offset (like a per-tile normalisation): seams without overlap, none with it
    fn_tile = lambda t: fn(t) + 0.02 * t.mean()  # noqa: E731
    assert border_spikes(plan.apply(fn_tile, x)[0, 0], plan) < 0.05 * grad_max
    hard = TilePlan(64, 56, 16, 0, 8)
    assert border_spikes(hard.apply(fn_tile, x)[0, 0], hard) > 0.1 * grad_max


def test_overlap_blending_removes_steps_between_tiles():
    """A network whose output depends on the whole tile (per-tile offset): overlap turns steps into ramps."""
    x = smooth_image(64, 64, seed=3)
    fn = lambda t: t + t.mean(dim=(-2, -1), keepdim=True)  # noqa: E731

    def max_jump(overlap):
        out = TilePlan(64, 64, 16, overlap, 8).apply(fn, x)[0, 0]
        return max((out[1:] - out[:-1]).abs().max(), (out[:, 1:] - out[:, :-1]).abs().max())

    intrinsic = max((x[0, 0, 1:] - x[0, 0, :-1]).abs().max(), (x[0, 0, :, 1:] - x[0, 0, :, :-1]).abs().max())
    hard = max_jump(0)
    soft = max_jump(8)
    assert hard > 3 * intrinsic  # visible seams without overlap ...
    assert soft < 0.5 * hard  # ... much smaller jumps with the blend


def test_reflect_pad_larger_than_image():
    a = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = reflect_pad(a, 10, 9)
    assert out.shape == (1, 1, 13, 13)
    assert np.array_equal(out[0, 0].numpy(), np.pad(a[0, 0].numpy(), ((0, 10), (0, 9)), mode="reflect"))
    assert torch.equal(reflect_pad(a, 0, 0), a)
    # a plan for a tiny image pads it up to a whole tile and crops it back
    img = torch.randn(1, 1, 9, 8)
    plan = TilePlan(9, 8, 64, 8, 8)
    assert plan.pad(img).shape[-2:] == (64, 64)
    assert torch.equal(plan.crop(plan.pad(img)), img)


def test_on_tile_reports_each_call():
    plan = TilePlan(40, 40, 16, 4, 8)
    calls = []
    plan.apply(per_pixel, torch.randn(2, 2, 40, 40), batch_size=4, on_tile=lambda d, n: calls.append((d, n)))
    # two images share batch_size=4 -> two tiles per call
    assert calls == [(2, 9), (4, 9), (6, 9), (8, 9), (9, 9)]


# -- through predict_stain ----------------------------------------------------------------------------------------


class PerPixelUNet(torch.nn.Module):
    """Stands in for the UNet: x0_hat = 0.5 * scaled x_t + tanh(2 * condition), pixel by pixel."""

    def __init__(self, n_out):
        super().__init__()
        self.n_out = n_out
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, class_labels=None):
        class Out:
            pass

        o = Out()
        o.sample = 0.5 * x[:, : self.n_out] + torch.tanh(2 * x[:, self.n_out :].mean(1, keepdim=True)) + self.dummy
        return o


def tiny_bundle(path, tile=16, overlap=4, T=4):
    cfg = BundleConfig(
        name="tiny",
        task="stain",
        objective="residual_shift",
        input_channels=[ChannelSpec("bf", "input", PercentileNorm())],
        output_channels=[ChannelSpec("nuclei", "stain", FixedNorm(0.0, 100.0))],
        unet=default_unet_config(2, 1, sample_size=tile, block_out_channels=(8, 16), layers_per_block=1),
        scheduler={"num_train_timesteps": T},
        tile_size=tile,
        tile_overlap=overlap,
    )
    torch.manual_seed(0)
    return save_bundle(path, cfg, build_unet(cfg.unet))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle(tmp_path_factory.mktemp("tiling_bundle"))


def test_predict_stain_tiled_equals_untiled(bundle, monkeypatch):
    monkeypatch.setitem(bundle.__dict__, "unet", PerPixelUNet(1))
    img = smooth_image(45, 37, seed=4)[0, 0].numpy() * 1000 + 3000
    whole = predict_stain(bundle, img, seed=3, make_labels=False, settings=RunSettings(tile_size=64))
    tiled = predict_stain(bundle, img, seed=3, make_labels=False, settings=RunSettings(tile_size=16, tile_overlap=4))
    assert whole.provenance["num_tiles"] == 1 and tiled.provenance["num_tiles"] > 4
    assert whole.image.shape == tiled.image.shape == (1, 45, 37)
    # the seed's noise is drawn at the image size, so tiling does not change the result
    np.testing.assert_allclose(tiled.image, whole.image, atol=1e-3)  # in stain units (0..100 range)
    other = predict_stain(bundle, img, seed=4, make_labels=False, settings=RunSettings(tile_size=64))
    assert np.abs(other.image - whole.image).max() > 0.1


@pytest.mark.parametrize("shape", [(9, 12), (21, 30), (33, 17)])
def test_predict_stain_any_size(bundle, shape):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    res = predict_stain(bundle, img, seed=0)
    assert res.image.shape == (1, *shape)
    assert np.isfinite(res.image).all()
    assert res.provenance["padded_shape"][0] % 2 == 0 and res.provenance["padded_shape"][0] >= shape[0]


def test_predict_stain_progress_and_cancel(bundle):
    from napari_virtualstain.core.errors import Cancelled

    img = smooth_image(40, 40, seed=5)[0, 0].numpy()
    events = []
    res = predict_stain(bundle, img, seed=0, make_labels=False, settings=RunSettings(progress=events.append))
    n_tiles = res.provenance["num_tiles"]
    assert n_tiles == 9 and res.provenance["steps"] == 4
    # batch_size 4: ceil(9 / 4) = 3 network calls per step, then one final report
    assert [(e.step, e.tile) for e in events] == [(s, k) for s in range(4) for k in (4, 8, 9)] + [(4, 0)]
    assert events[-1].fraction == 1.0

    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    events.clear()
    with pytest.raises(Cancelled):
        predict_stain(bundle, img, seed=0, settings=RunSettings(progress=events.append, should_cancel=should_cancel))
    # checked before each step and after each network call but a step's last: the third check (after the second call
    # of step 0) stops the run there — one network call after the request, not at the end of the step
    assert [(e.step, e.tile) for e in events] == [(0, 4), (0, 8)]


def test_pack_in_place_makes_a_crop_contiguous_in_its_own_buffer():
    """A big field's cropped canvas becomes C-contiguous without a second output-sized copy."""
    from napari_virtualstain.core.tiling import pack_in_place

    rng = np.random.default_rng(0)
    canvas = rng.random((3, 37, 45)).astype(np.float32)
    crop = canvas[:, :30, :41]
    expected = crop.copy()
    packed = pack_in_place(crop)
    assert packed.flags.c_contiguous and packed.shape == (3, 30, 41)
    np.testing.assert_array_equal(packed, expected)
    assert np.shares_memory(packed, canvas)  # the canvas's own memory, no new buffer
    whole = rng.random((2, 8, 8)).astype(np.float32)
    assert pack_in_place(whole) is whole
    odd = rng.random((8, 8, 3)).astype(np.float32).transpose(2, 0, 1)  # not a crop of a C-ordered canvas: copied
    np.testing.assert_array_equal(pack_in_place(odd), odd)
