"""Checkpoint bundles: round trip, stable ids, and a clear BundleError for every kind of bad checkpoint."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec, load_bundle, save_bundle
from napari_virtualstain.core.errors import BundleError
from napari_virtualstain.core.model import build_unet, default_unet_config
from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.settings import RunSettings




def tiny_config(tile=16, T=3) -> BundleConfig:
    return BundleConfig(
        name="tiny",
        task="stain",
        objective="residual_shift",
        input_channels=[ChannelSpec("bf", "input", PercentileNorm())],
        output_channels=[
            ChannelSpec("nuclei", "stain", FixedNorm(100.0, 4000.0)),
            ChannelSpec("cells_boundary", "boundary", FixedNorm(0.0, 1.0), labels="cells", foreground="cells_fg"),
            ChannelSpec("cells_fg", "foreground", FixedNorm(0.0, 1.0)),
        ],
        unet=default_unet_config(4, 3, sample_size=tile, block_out_channels=(8, 16), layers_per_block=1),
        scheduler={"num_train_timesteps": T, "kappa": 2.0},
        tile_size=tile,
        tile_overlap=4,
        pixel_size_um=0.65,
        description="synthetic test bundle",
    )


def tiny_unet(cfg: BundleConfig, seed=0):
    torch.manual_seed(seed)
    return build_unet(cfg.unet)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, config, unet) of one saved bundle; tests that modify it work on a copy."""
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    cfg = tiny_config()
    unet = tiny_unet(cfg)
    save_bundle(path, cfg, unet)
    return path, cfg, unet


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[0], dst)
    return dst


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


IMAGE = np.random.default_rng(0).normal(1000, 200, size=(24, 20)).astype(np.float32)


def test_round_trip(saved):
    path, cfg, unet = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    b = load_bundle(path)
    assert b.config == cfg
    assert b.config.to_dict() == cfg.to_dict()
    ref = unet.state_dict()
    assert set(b.state_dict) == set(ref)
    assert all(torch.equal(b.state_dict[k], ref[k]) for k in ref)
    loaded_unet = b.unet
    assert all(torch.equal(loaded_unet.state_dict()[k], ref[k]) for k in ref)
    assert b.make_scheduler().config.num_train_timesteps == 3
    # the same prediction from the freshly built network and the reloaded one
    p1 = predict_stain(b, IMAGE, seed=1)
    p2 = predict_stain(load_bundle(path), IMAGE, seed=1)
    np.testing.assert_array_equal(p1.image, p2.image)
    assert p1.channel_names == ["nuclei", "cells_boundary", "cells_fg"]
    assert p1.channel_kinds == ["stain", "boundary", "foreground"]
    assert set(p1.labels) == {"cells"} and p1.labels["cells"].shape == IMAGE.shape
    assert p1.provenance["bundle_id"] == b.id


def test_fp16_save(saved, tmp_path):
    path, cfg, unet = saved
    half = save_bundle(tmp_path / "half", cfg, unet, half=True)
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (path / "model.safetensors").stat().st_size
    assert all(v.dtype == torch.float16 for v in half.state_dict.values())
    full = load_bundle(path)
    assert half.id != full.id
    # float32 compute, so only the weights' storage differs (bf16 compute is compared in tests/test_speed.py)
    a = predict_stain(full, IMAGE, seed=2, make_labels=False, settings=RunSettings(half=False)).image
    b = predict_stain(half, IMAGE, seed=2, make_labels=False, settings=RunSettings(half=False)).image
    # stain channel in raw units (range 100..4000), probabilities 0..1
    np.testing.assert_allclose(a[0], b[0], atol=3900 * 2e-3)
    np.testing.assert_allclose(a[1:], b[1:], atol=2e-3)


def test_id_is_sha256_of_weights(saved, tmp_path):
    path, cfg, unet = saved
    b = load_bundle(path)
    assert b.id == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    assert b.short_id == b.id[:12]
    # a copy elsewhere, with another name and description: the same weights, the same id
    shutil.copytree(path, tmp_path / "elsewhere")
    edit_config(tmp_path / "elsewhere", lambda c: c.update(name="renamed", description="x"))
    assert load_bundle(tmp_path / "elsewhere").id == b.id
    # other weights: another id
    other = save_bundle(tmp_path / "other", cfg, tiny_unet(cfg, seed=1))
    assert other.id != b.id


def test_missing_config_json(copy):
    (copy / "config.json").unlink()
    with pytest.raises(BundleError, match="config.json"):
        load_bundle(copy)


def test_missing_path(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize(
    "key",
    ["format", "format_version", "name", "task", "objective", "input_channels", "output_channels", "unet", "tile_size"],
)
def test_config_missing_key(copy, key):
    edit_config(copy, lambda c: c.pop(key))
    with pytest.raises(BundleError, match=f"'{key}'"):
        load_bundle(copy)


@pytest.mark.parametrize("key", ["in_channels", "out_channels", "block_out_channels"])
def test_unet_missing_key(copy, key):
    edit_config(copy, lambda c: c["unet"].pop(key))
    with pytest.raises(BundleError, match=f"'{key}'"):
        load_bundle(copy)


def test_missing_scheduler_for_residual_shift(copy):
    edit_config(copy, lambda c: c.pop("scheduler"))
    with pytest.raises(BundleError, match="scheduler"):
        load_bundle(copy)


def test_bad_scheduler_values(copy):
    edit_config(copy, lambda c: c["scheduler"].update(kappa=-1.0))
    with pytest.raises(BundleError, match="scheduler"):
        load_bundle(copy).make_scheduler()


def test_invalid_json(copy):
    (copy / "config.json").write_text('{"format": "napari-virtualstain-bundle", "name": ')
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(copy)
    (copy / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(copy)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(format="something-else"), ["format", "something-else"]),
        (lambda c: c.update(format_version=99), ["format_version", "99", "upgrade"]),
        (lambda c: c.update(task="segment"), ["task", "segment"]),
        (lambda c: c.update(objective="gan"), ["objective", "gan"]),
        (lambda c: c.update(tile_size="256"), ["tile_size", "int"]),
        (lambda c: c.update(tile_size=15), ["tile_size", "multiple of 2"]),
        (lambda c: c.update(tile_size=0), ["tile_size", "positive"]),
        (lambda c: c.update(format_version=True), ["format_version"]),
        (lambda c: c.update(pixel_size_um="0.5um"), ["pixel_size_um"]),
        (lambda c: c.update(unet="UNet2DModel"), ["unet", "dict"]),
        (lambda c: c["output_channels"][1].update(kind="mask"), ["cells_boundary", "mask"]),
        (lambda c: c["output_channels"][0].update(normalization={"method": "percentile"}), ["nuclei", "fixed"]),
        (lambda c: c["output_channels"][0].update(normalization={"method": "zscore"}), ["nuclei", "zscore"]),
        (lambda c: c["output_channels"][0].pop("normalization"), ["nuclei", "normalization"]),
        (lambda c: c["output_channels"][1].update(foreground="nope"), ["cells_boundary", "nope"]),
        (lambda c: c["input_channels"][0].pop("name"), ["input_channels[0]", "name"]),
        (lambda c: c.update(output_channels=[]), ["output_channels"]),
        (lambda c: c["unet"].update(in_channels=3), ["in_channels=3", "in_channels=4"]),
        (lambda c: c["unet"].update(out_channels=1), ["out_channels=1", "out_channels=3"]),
    ],
)
def test_bad_config_values(copy, edit, words):
    edit_config(copy, edit)
    with pytest.raises(BundleError) as exc:
        load_bundle(copy)
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_truncated_weights(copy):
    w = copy / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="safetensors") as exc:
        load_bundle(copy)
    assert "truncated" in str(exc.value)


def test_garbage_weights(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(copy)


def test_missing_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="model.safetensors"):
        load_bundle(copy)


def test_pickle_file_is_refused(saved, tmp_path):
    _, _, unet = saved
    pt = tmp_path / "x.pt"
    torch.save(unet.state_dict(), pt)
    with pytest.raises(BundleError, match="pickle") as exc:
        load_bundle(pt)
    assert "safetensors" in str(exc.value)  # says what to do instead


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_without_suffix_is_refused(saved, tmp_path, legacy):
    _, _, unet = saved
    f = tmp_path / "weights"
    torch.save(unet.state_dict(), f, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(f)


def test_plain_pickle_is_refused(tmp_path):
    f = tmp_path / "model"
    f.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(f)


def test_folder_with_pickle_weights_instead_of_safetensors(copy, saved):
    (copy / "model.safetensors").unlink()
    torch.save(saved[2].state_dict(), copy / "model.pt")
    with pytest.raises(BundleError, match="pickle") as exc:
        load_bundle(copy)
    assert "model.pt" in str(exc.value)


def test_folder_with_only_model_pt(saved, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save(saved[2].state_dict(), d / "model.pt")
    with pytest.raises(BundleError) as exc:
        load_bundle(d)
    msg = str(exc.value)
    assert "config.json" in msg
    assert "model.pt" in msg and "pickle" in msg.lower()  # tell the user why their .pt is not enough


def test_weights_not_matching_unet(copy, saved):
    cfg = saved[1]
    other = dict(cfg.unet, block_out_channels=[16, 16])
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_unet(other).state_dict().items()}, str(copy / "model.safetensors"))
    b = load_bundle(copy)
    with pytest.raises(BundleError, match="does not match"):
        b.unet
    with pytest.raises(BundleError, match="does not match"):
        predict_stain(b, IMAGE)


def test_weights_with_missing_tensor(copy, saved):
    state = {k: v.contiguous() for k, v in saved[2].state_dict().items()}
    state.pop(next(iter(state)))
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(copy).unet


def test_unet_config_not_a_unet(copy):
    edit_config(copy, lambda c: c["unet"].update(down_block_types=["NoSuchBlock2D", "DownBlock2D"]))
    with pytest.raises(BundleError, match="unet"):
        load_bundle(copy).unet


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(tile_overlap="abc"), ["tile_overlap"]),
        (lambda c: c.update(tile_overlap=-3), ["tile_overlap"]),
        (lambda c: c.update(tile_overlap=100), ["tile_overlap"]),  # more than half the 16-pixel tile
        (lambda c: c["input_channels"][0].update(normalization="percentile"), ["input_channels[0]", "normalization"]),
        (lambda c: c["unet"].update(block_out_channels=8), ["block_out_channels"]),
        (lambda c: c.update(training="imagenet"), ["training"]),
        (lambda c: c["output_channels"][0].update(normalization={"method": "fixed", "vmin": 5, "vmax": 5}), ["nuclei"]),
    ],
    ids=["overlap-str", "overlap-negative", "overlap-too-big", "norm-not-object", "block-out-int", "training-str",
         "fixed-vmin-eq-vmax"],
)
def test_more_bad_config_values_give_bundle_error(copy, edit, words):
    """Wrong types/values must be a BundleError at load time, not a TypeError/AttributeError (or a crash) later."""
    edit_config(copy, edit)
    with pytest.raises(BundleError) as exc:
        b = load_bundle(copy)
        b.summary()
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_input_with_fixed_normalisation_loads_and_predicts_or_is_refused(copy):
    edit_config(copy, lambda c: c["input_channels"][0].update(normalization={"method": "fixed", "vmin": 0, "vmax": 2000}))
    try:
        b = load_bundle(copy)
    except BundleError as exc:
        assert "input_channels[0]" in str(exc) and "normalisation" in str(exc).replace("normalization", "normalisation")
        return
    out = predict_stain(b, IMAGE, make_labels=False)  # must not crash with an AttributeError
    assert np.isfinite(out.image).all()


def test_weights_field_pointing_to_pickle_is_refused(tiny_bundle_dir, tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    cfg = json.loads((tiny_bundle_dir / "config.json").read_text())
    cfg["weights"] = "model.pt"
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save({"x": torch.zeros(1)}, folder / "model.pt")
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(folder)
