"""What the user hands in: shapes, channels, dtypes and bad values, through inputs/normalize and predict_stain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec, save_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.inputs import prepare_input, to_channels_first
from napari_virtualstain.core.model import build_unet, default_unet_config
from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm, percentile_normalize
from napari_virtualstain.core.tasks.stain import predict_stain




@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    cfg = BundleConfig(
        name="tiny",
        task="stain",
        objective="residual_shift",
        input_channels=[ChannelSpec("bf", "input", PercentileNorm())],
        output_channels=[ChannelSpec("nuclei", "stain", FixedNorm(0.0, 1.0))],
        unet=default_unet_config(2, 1, sample_size=16, block_out_channels=(8, 16), layers_per_block=1),
        scheduler={"num_train_timesteps": 3},
        tile_size=16,
        tile_overlap=4,
    )
    torch.manual_seed(0)
    return save_bundle(tmp_path_factory.mktemp("inputs") / "b", cfg, build_unet(cfg.unet))


def brightfield_u8(shape=(24, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = 120 + 60 * np.sin(yy / 3.0) * np.cos(xx / 4.0) + rng.normal(0, 10, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def message(exc_info) -> str:
    return str(exc_info.value)


# -- shapes and channels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [3, 4])
def test_rgb_for_grey_model_takes_the_luminance(bundle, c):
    """A colour camera's brightfield: the luminance is predicted, and the provenance says so."""
    from napari_virtualstain.core.inputs import RGB_NOTE, rgb_to_luminance

    rgb = np.random.default_rng(0).integers(0, 255, (24, 20, c)).astype(np.uint8)
    res = predict_stain(bundle, rgb, seed=1, make_labels=False)
    grey = predict_stain(bundle, rgb_to_luminance(rgb), seed=1, make_labels=False)
    np.testing.assert_allclose(res.image, grey.image, rtol=1e-5, atol=1e-5)
    assert res.provenance["input_conversion"] == RGB_NOTE and grey.provenance["input_conversion"] is None
    assert rgb_to_luminance(np.full((2, 2, 3), 100, np.uint8)) == pytest.approx(100.0)


def test_rgb_for_a_two_input_model_refused():
    with pytest.raises(VirtualStainError, match="RGB"):
        to_channels_first(np.zeros((24, 20, 3)), ["a", "b"])


def test_rgb_for_rgb_model_accepted():
    img = np.arange(24 * 20 * 3).reshape(24, 20, 3)
    out = to_channels_first(img, ["r", "g", "b"])
    assert out.shape == (3, 24, 20)
    assert np.array_equal(out[1], img[..., 1])


def test_wrong_channel_count():
    with pytest.raises(VirtualStainError, match="2 input channels"):
        to_channels_first(np.zeros((3, 24, 20)), ["a", "b"], channel_axis=0)
    with pytest.raises(VirtualStainError, match="2 input channels"):
        to_channels_first(np.zeros((24, 20)), ["a", "b"])
    # channels-last with an explicit axis is fine
    img = np.random.default_rng(0).random((24, 20, 2))
    out = to_channels_first(img, ["a", "b"], channel_axis=-1)
    assert out.shape == (2, 24, 20) and np.array_equal(out[1], img[..., 1])
    with pytest.raises(VirtualStainError, match="out of range"):
        to_channels_first(img, ["a", "b"], channel_axis=3)


def test_channel_count_through_predict_stain(bundle):
    with pytest.raises(VirtualStainError, match="1 input channel"):
        predict_stain(bundle, np.random.default_rng(0).random((2, 24, 20)), channel_axis=0)


@pytest.mark.parametrize("shape", [(5, 24, 20), (2, 24, 20)])
def test_stack_refused_with_plane_hint(bundle, shape):
    with pytest.raises(VirtualStainError) as exc:
        predict_stain(bundle, np.random.default_rng(0).random(shape))
    assert "--plane" in message(exc)


@pytest.mark.parametrize("shape, axis", [((2, 3, 24, 20), None), ((2, 1, 24, 20), 1), ((2, 2, 3, 24, 20), None)])
def test_4d_refused(bundle, shape, axis):
    with pytest.raises(VirtualStainError) as exc:
        predict_stain(bundle, np.random.default_rng(0).random(shape), channel_axis=axis)
    assert "--plane" in message(exc)


def test_1d_refused():
    with pytest.raises(VirtualStainError, match="2D"):
        to_channels_first(np.zeros(10), ["bf"])


def test_too_small_refused(bundle):
    with pytest.raises(VirtualStainError, match="8x8"):
        predict_stain(bundle, brightfield_u8((5, 30)))


# -- values ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bundle, bad):
    img = brightfield_u8().astype(np.float32)
    img[3, 4] = bad
    with pytest.raises(VirtualStainError) as exc:
        predict_stain(bundle, img)
    assert "NaN" in message(exc) and "1 NaN/Inf pixel" in message(exc)


def test_the_nan_advice_works_for_a_wide_hole(bundle, tmp_path, capsys):
    """The message names --fill-nan; it fills a 12 x 20 px hole (a median filter would leave it) and predicts."""
    import tifffile

    from napari_virtualstain.cli import main
    from napari_virtualstain.core.normalize import fill_non_finite

    img = brightfield_u8().astype(np.float32)
    img[10:22, 8:28] = np.nan
    filled = fill_non_finite(img)
    assert np.isfinite(filled).all() and np.array_equal(filled[~np.isnan(img)], img[~np.isnan(img)])
    path = tmp_path / "holey.tif"
    tifffile.imwrite(path, img)
    out = tmp_path / "out"
    assert main(["predict", "-c", str(bundle.path), str(path), "-o", str(out), "-q"]) == 2
    assert "--fill-nan" in capsys.readouterr().err
    assert main(["predict", "-c", str(bundle.path), str(path), "-o", str(out), "-q", "--fill-nan"]) == 0
    assert (out / "holey_virtualstain.tif").is_file() and "filled" in capsys.readouterr().err


@pytest.mark.parametrize("value, dtype", [(0, np.uint16), (7.5, np.float32)])
def test_constant_image_refused(bundle, value, dtype):
    with pytest.raises(VirtualStainError, match="constant"):
        predict_stain(bundle, np.full((24, 20), value, dtype))


def test_nearly_constant_image_is_accepted():
    # 99.8 % of the pixels equal: the percentiles coincide, min/max still carry the information
    img = np.zeros((50, 50), np.float32)
    img[0, 0] = 1.0
    out = percentile_normalize(img[None])
    assert np.isfinite(out).all() and out.min() == -1.0 and out.max() == 1.0


def test_non_numeric_dtype_refused():
    with pytest.raises(VirtualStainError, match="dtype"):
        prepare_input(np.zeros((24, 20), np.complex64), ["bf"])


# -- dtypes -----------------------------------------------------------------------------------------------------------


def dtype_versions():
    u8 = brightfield_u8()
    return {
        "uint8": u8,
        "uint16": u8.astype(np.uint16) * 257,
        "float32": u8.astype(np.float32) / 255.0,
        "float64": u8.astype(np.float64) / 255.0 * 3.0 - 1.0,
        "int32": u8.astype(np.int32) - 128,
    }


def test_dtypes_give_same_normalised_input():
    versions = dtype_versions()
    normed = {k: percentile_normalize(prepare_input(v, ["bf"])) for k, v in versions.items()}
    ref = normed["uint8"]
    assert ref.dtype == np.float32 and ref.shape == (1, 24, 20)
    # low percentile -> -1, high percentile -> +1
    lo, hi = np.percentile(ref, [1.0, 99.8])
    assert lo == pytest.approx(-1.0, abs=1e-5) and hi == pytest.approx(1.0, abs=1e-5)
    for k, v in normed.items():
        np.testing.assert_allclose(v, ref, atol=1e-5, err_msg=k)


def test_dtypes_give_same_prediction(bundle):
    versions = dtype_versions()
    preds = {k: predict_stain(bundle, v, seed=5, make_labels=False).image for k, v in versions.items()}
    ref = preds["uint8"]
    assert ref.std() > 1e-3  # the network does depend on its input
    for k, v in preds.items():
        np.testing.assert_allclose(v, ref, atol=1e-4, err_msg=k)
    # ... while another image gives another prediction
    other = predict_stain(bundle, brightfield_u8(seed=1)[::-1].copy(), seed=5, make_labels=False).image
    assert np.abs(other - ref).max() > 1e-3


@pytest.mark.parametrize("shape", [(10, 13), (8, 8), (16, 9)])
def test_image_smaller_than_a_tile(bundle, shape):
    img = brightfield_u8(shape)
    res = predict_stain(bundle, img, seed=0)
    assert res.image.shape == (1, *shape)
    assert res.provenance["num_tiles"] == 1 and res.provenance["padded_shape"] == [16, 16]
    assert res.provenance["input_shape"] == list(shape)
    assert np.isfinite(res.image).all()


def test_a_labels_image_is_recognised_and_a_microscope_image_is_not(shared_data):
    import tifffile

    from napari_virtualstain.core.inputs import labels_warning

    stack = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")
    assert "labels image" in labels_warning(stack[2, 9]) and "labels image" in labels_warning(stack[3, 9])
    assert labels_warning(stack[1, 9]) is None and labels_warning(stack[0, 9]) is None  # brightfield, Hoechst
    assert labels_warning(tifffile.imread(shared_data / "nuclei_dsb2018" / "img2d.tif")) is None
    assert "labels image" in labels_warning(tifffile.imread(shared_data / "nuclei_dsb2018" / "mask2d.tif"))
    assert labels_warning(stack[2, 9].astype(np.float32)) is None  # float images are never taken for labels
