"""Objectives that place nuclei: the distance (centre) head, the losses, augmentation, test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.metrics import match_labels
from napari_virtualstain.core.postprocess import boundaries_to_labels, distance_target, distance_to_labels
from napari_virtualstain.core.tasks.stain import labels_from_channels, predict_stain
from napari_virtualstain.train.augment import augment_batch, elastic_field
from napari_virtualstain.train.data import load_folder
from napari_virtualstain.train.loop import TrainOptions, train
from napari_virtualstain.train.objectives import ms_ssim, reconstruction_loss, soft_dice

from test_train import TINY, data_folder  # noqa: F401 - the fixture


def _touching_discs():
    """Rows of discs of radius 6 whose edges touch (centres 11 px apart): the case where seeds must be centres."""
    yy, xx = np.mgrid[:64, :96]
    labels = np.zeros((64, 96), np.int32)
    n = 0
    for cy in (14, 40):
        for cx in range(10, 90, 11):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = n
    return labels


def test_distance_target_is_one_at_each_centre_and_low_at_its_edge():
    labels = _touching_discs()
    d = distance_target(labels)
    assert d.max() == pytest.approx(1.0) and d[labels == 0].max() == 0
    for i in range(1, labels.max() + 1):
        inside = d[labels == i]
        assert inside.max() == pytest.approx(1.0) and inside.min() < 0.3


def test_distance_route_splits_touching_nuclei_where_a_blurred_boundary_map_merges_them():
    from scipy import ndimage as ndi

    from napari_virtualstain.core.postprocess import boundary_target, foreground_target

    labels = _touching_discs()
    # what a network that has not fitted sharp edges gives: every map blurred by 1.5 px
    dist = ndi.gaussian_filter(distance_target(labels), 1.5)
    fg = ndi.gaussian_filter(foreground_target(labels), 1.5)
    bnd = ndi.gaussian_filter(boundary_target(labels), 1.5)
    from_distance = match_labels(labels, distance_to_labels(dist, fg), 0.5)
    from_boundaries = match_labels(labels, boundaries_to_labels(bnd, fg), 0.5)
    assert from_distance["f1"] > 0.95
    assert from_distance["f1"] > from_boundaries["f1"] + 0.2


def test_ms_ssim_is_one_for_identical_images_and_drops_with_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 128, 128, generator=g)
    assert torch.allclose(ms_ssim(a, a), torch.ones(2, 1), atol=1e-4)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert (ms_ssim(a, noisy) < 0.9).all()


def test_spotlight_weighs_foreground_errors_more_than_background_ones():
    kinds = ["stain", "foreground"]
    target = -torch.ones(1, 2, 32, 32)
    target[:, :, 8:16, 8:16] = 1.0  # one bright nucleus, its foreground 1
    err_fg, err_bg = target.clone(), target.clone()
    err_fg[:, 0, 8:12, 8:12] -= 0.5  # 16 stain pixels wrong inside the nucleus ...
    err_bg[:, 0, 20:24, 20:24] += 0.5  # ... or 16 in the background
    fg_loss = reconstruction_loss("spotlight", err_fg, target, kinds)
    bg_loss = reconstruction_loss("spotlight", err_bg, target, kinds)
    assert fg_loss > 5 * bg_loss
    assert reconstruction_loss("mse", err_fg, target, kinds) == pytest.approx(
        reconstruction_loss("mse", err_bg, target, kinds).item())
    assert soft_dice(torch.ones(1, 4, 4), torch.ones(1, 4, 4)) == pytest.approx(0.0, abs=0.05)
    with pytest.raises(VirtualStainError, match="loss 'huber'"):
        reconstruction_loss("huber", target, target, kinds)


def test_augmentation_moves_input_and_target_together_and_leaves_appended_planes():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:64, :64]
    blob = torch.from_numpy(((yy - 20) ** 2 + (xx - 40) ** 2 < 64).astype(np.float32))
    cond = torch.stack([blob, blob * 0.5])[None].repeat(4, 1, 1, 1)  # plane 0 an image, plane 1 "mu(x)"
    target = blob[None, None].repeat(4, 1, 1, 1)
    c2, t2 = augment_batch(cond, target, rng, n_image_inputs=1)
    assert c2.shape == cond.shape and t2.shape == target.shape
    assert torch.equal(cond[:, 1] * 2, target[:, 0])  # inputs untouched
    for i in range(4):  # plane 1 moved only geometrically, exactly as the target did
        assert torch.allclose(c2[i, 1] * 2, t2[i, 0], atol=1e-5)
    assert not torch.allclose(c2[:, 0], cond[:, 0])
    again = augment_batch(cond, target, np.random.default_rng(3), n_image_inputs=1)
    assert torch.equal(again[0], c2) and torch.equal(again[1], t2)  # the run's generator decides: resumable


def test_elastic_deformation_bends_input_and_target_alike_and_is_off_by_default():
    yy, xx = np.mgrid[:64, :64]
    blob = torch.from_numpy(((yy - 32) ** 2 + (xx - 32) ** 2 < 100).astype(np.float32))
    cond = torch.stack([blob, blob * 0.5])[None].repeat(16, 1, 1, 1)
    target = blob[None, None].repeat(16, 1, 1, 1)
    plain = augment_batch(cond, target, np.random.default_rng(5), n_image_inputs=1)
    off = augment_batch(cond, target, np.random.default_rng(5), n_image_inputs=1, elastic=0.0)
    assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])  # 0 draws nothing: old runs unchanged
    c2, t2 = augment_batch(cond, target, np.random.default_rng(5), n_image_inputs=1, elastic=3.0)
    assert torch.allclose(c2[:, 1] * 2, t2[:, 0], atol=1e-5)  # the same displacement moved both
    assert not torch.allclose(t2, plain[1])  # ... and it did move something
    field = elastic_field((64, 64), 3.0, np.random.default_rng(0))
    assert field.shape == (2, 64, 64) and 1.0 < float(field.std()) < 6.0  # px, about sigma
    assert float((field[:, 1:] - field[:, :-1]).abs().max()) < 1.0  # smooth: neighbours move together



def test_plane_jitter_moves_the_planes_of_a_stack_apart_and_is_off_by_default():
    flat = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32)
    cond = flat.repeat(8, 3, 1, 1)  # three identical planes, as a z-stack of one field
    target = flat.repeat(8, 1, 1, 1)
    shared = augment_batch(cond, target, np.random.default_rng(2), n_image_inputs=3)
    c2, t2 = augment_batch(cond, target, np.random.default_rng(2), n_image_inputs=3, plane_jitter=True)

    def plane_mean_spread(c):  # per crop, how far apart the planes' means are (pixel noise averages out)
        return float((c.mean(dim=(2, 3)).amax(1) - c.mean(dim=(2, 3)).amin(1)).mean())

    assert plane_mean_spread(shared[0]) < 0.01  # shared draws move the three planes together
    assert plane_mean_spread(c2) > 0.03  # with the jitter each plane got its own gain/offset
    assert float(t2.min()) >= -1e-5 and float(t2.max()) <= 1 + 1e-5  # the target: geometry only, never a gain


def test_plane_jitter_without_augmentation_says_what_to_add(data_folder, tmp_path):  # noqa: F811
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    with pytest.raises(VirtualStainError, match="add --augment"):
        train(spec, tmp_path / "b", TrainOptions(**TINY, objective="regression", plane_jitter=True))
    assert not (tmp_path / "b").exists()  # nothing half-written

@pytest.mark.parametrize("loss", ["spotlight", "l1_msssim"])
def test_distance_head_training_gives_a_distance_route(data_folder, tmp_path, loss):  # noqa: F811
    spec = load_folder(data_folder, stain_names=["Hoechst"])
    opts = TrainOptions(**{**TINY, "crop_size": 48}, objective="regression", distance_head=True, loss=loss,
                        augment=True)
    train(spec, tmp_path / "b", opts)
    bundle = load_bundle(tmp_path / "b")
    c = bundle.config
    assert c.output_names == ["Hoechst", "nuclei boundary", "nuclei foreground", "nuclei distance"]
    assert c.label_routes() == ["boundaries", "stain", "distance"]
    assert c.training["options"]["loss"] == loss and c.training["options"]["augment"]
    image = np.asarray(load_folder(data_folder).images[0].inputs[0])
    res = predict_stain(bundle, image, labels_from="distance")
    assert res.provenance["labels_from"] == "distance" and res.labels["nuclei"].shape == image.shape
    assert set(labels_from_channels(c, res.image, "boundaries")) == {"nuclei"}
    if loss != "spotlight":
        return
    from napari_virtualstain.train.defaults import choose_sampling, write_sampling

    result = choose_sampling(bundle, spec, tta=(1, 4))
    chosen = result["chosen"]
    assert chosen["labels_from"] in c.label_routes() and chosen["tta"] in (1, 4) and "steps" not in chosen
    assert [r["tta"] for r in result["tta_sweep"]] == [1, 4]
    again = write_sampling(tmp_path / "b", chosen, "test")
    assert again.id == bundle.id and again.config.sampling["tta"] == chosen["tta"]
    assert predict_stain(again, image).provenance["tta"] == chosen["tta"]  # the validated default is used


def test_distance_route_on_a_bundle_without_the_channel_names_the_routes_it_has(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    with pytest.raises(VirtualStainError, match="no distance"):
        predict_stain(bundle, np.zeros((32, 32), np.float32), labels_from="distance")


def test_tta_is_exact_for_a_symmetric_network_and_costs_its_passes(tiny_bundle_dir):
    from napari_virtualstain.core.model import TTADenoiser, dihedral

    x = torch.arange(2 * 3 * 8 * 16, dtype=torch.float32).reshape(2, 3, 8, 16)
    for k in range(4):
        for flip in (False, True):
            assert torch.equal(dihedral(dihedral(x, k, flip), k, flip, inverse=True), x)

    class Shift(torch.nn.Module):  # not symmetric: output = input moved one pixel right
        def precision(self):
            return "float32"

        def forward(self, x, t, class_labels=None):
            return torch.roll(x, 1, dims=-1)

    square = torch.rand(1, 1, 16, 16)
    assert torch.equal(TTADenoiser(Shift(), 1)(square, 0), Shift()(square, 0))
    avg = TTADenoiser(Shift(), 4)(square, 0)  # turned back, the four shifts point four ways: a cross blur
    expected = sum(torch.roll(square, s, dims=d) for s, d in ((1, -1), (-1, -1), (1, -2), (-1, -2))) / 4
    assert torch.allclose(avg, expected, atol=1e-6)
    with pytest.raises(VirtualStainError, match="1, 2, 4, 8"):
        TTADenoiser(Shift(), 3)

    bundle = load_bundle(tiny_bundle_dir)
    image = np.random.default_rng(0).random((40, 56)).astype(np.float32)
    plain = predict_stain(bundle, image, make_labels=False)
    eight = predict_stain(bundle, image, make_labels=False, tta=8)
    assert eight.provenance["tta"] == 8 and plain.provenance["tta"] == 1
    assert eight.provenance["network_passes"] == 8 * plain.provenance["network_passes"]
    assert eight.image.shape == plain.image.shape and not np.allclose(eight.image, plain.image)


def test_fine_tuning_starts_from_the_source_weights_and_records_it(data_folder, tmp_path):  # noqa: F811
    from napari_virtualstain.cli import main

    spec = load_folder(data_folder, stain_names=["Hoechst"])
    train(spec, tmp_path / "src", TrainOptions(**TINY, objective="regression"))
    source = load_bundle(tmp_path / "src")
    # one step at a vanishing rate: the fine-tuned network is still the source's
    train(spec, tmp_path / "ft", TrainOptions(**{**TINY, "steps": 1, "val_every": 1, "lr": 1e-12,
                                                "block_out_channels": (4, 8)}, objective="regression",
                                             init=str(tmp_path / "src")))
    tuned = load_bundle(tmp_path / "ft")
    assert tuned.config.unet == source.config.unet  # the source's widths, not the (4, 8) asked for
    assert tuned.config.output_channels == source.config.output_channels  # and its stain scale
    init = tuned.config.training["init_from"]
    assert init["id"] == source.id and init["name"] == source.config.name and not init["new_head"]
    image = np.asarray(spec.images[0].inputs[0])
    a = predict_stain(source, image, make_labels=False).image
    b = predict_stain(tuned, image, make_labels=False).image
    assert np.allclose(a, b, atol=1e-3 * (np.abs(a).max() + 1))
    # other outputs (no labels): a new last layer, everything else carried over
    only_stain = load_folder(data_folder, stain_names=["Hoechst"])
    only_stain.label_names = []
    train(only_stain, tmp_path / "head", TrainOptions(**{**TINY, "steps": 1, "val_every": 1}, objective="regression",
                                                      init=str(tmp_path / "src")))
    head = load_bundle(tmp_path / "head")
    assert head.config.output_names == ["Hoechst"] and head.config.training["init_from"]["new_head"]
    src_sd, head_sd = source.unet.state_dict(), head.unet.state_dict()
    assert torch.allclose(src_sd["conv_in.weight"].float(), head_sd["conv_in.weight"].float(), atol=1e-2)
    # a different number of input planes: one clear error
    two = load_folder(data_folder, stain_names=["Hoechst"])
    for im in two.images:
        im.inputs = np.concatenate([im.inputs, im.inputs])
    two.input_names = ["z0", "z1"]
    with pytest.raises(VirtualStainError, match="takes 1 input plane"):
        train(two, tmp_path / "bad", TrainOptions(**TINY, objective="regression", init=str(tmp_path / "src")))
    assert not (tmp_path / "bad" / "config.json").exists()
    assert main(["train", str(data_folder), "-o", str(tmp_path / "cc"), "--task", "classcond",
                 "--init", str(tmp_path / "src")]) == 2


def test_train_without_an_objective_runs_the_recommended_recipe_into_one_bundle(data_folder, tmp_path, capsys):  # noqa: F811
    from napari_virtualstain.cli import main
    from napari_virtualstain.train.recipe import MEAN_DIR, saved_step

    from test_train import TINY_CLI

    out = tmp_path / "mine"
    assert main(["train", str(data_folder), "-o", str(out), "--stain-names", "Hoechst", *TINY_CLI]) == 0
    err = capsys.readouterr().err
    assert "stage 1/3 mean network" in err and "stage 2/3 refinement" in err and "stage 3/3 sampling" in err
    bundle = load_bundle(out)
    c = bundle.config
    assert c.objective == "residual_shift" and c.anchored and bundle.mean_unet is not None
    assert {"steps", "samples", "labels_from", "tta"} <= set(c.sampling) and (out / "defaults.json").is_file()
    assert c.training["recipe"].startswith("recommended") and c.training["mean_model"]["bundle_name"] == "mine"
    assert predict_stain(bundle, np.asarray(load_folder(data_folder).images[0].inputs[0])).labels
    # --resume with more steps: the mean network trains on, the refinement starts again on the new mu
    assert main(["train", str(data_folder), "-o", str(out), "--stain-names", "Hoechst", *TINY_CLI[:1], "4",
                 *TINY_CLI[2:], "--resume"]) == 0
    assert "starts again" in capsys.readouterr().err
    assert saved_step(out / MEAN_DIR) == 4 and saved_step(out) == 2
    assert load_bundle(out).config.training["mean_model"]["training"]["steps"] == 4


def test_l1_msssim_stays_finite_under_bf16_autocast_and_a_nan_loss_stops_training(data_folder, tmp_path):  # noqa: F811
    """Round 3's first L1+MS-SSIM run went NaN at step 1 under bf16 autocast (SSIM's variances in bf16)."""
    from napari_virtualstain.train.data import load_config

    spec = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo-stain.yaml")
    losses = []
    train(spec, tmp_path / "ms", TrainOptions(objective="regression", loss="l1_msssim", crop_size=128, batch_size=2,
                                              steps=3, val_every=100, block_out_channels=(8, 16), precision="bf16"),
          on_step=lambda step, value: losses.append(value))
    assert len(losses) == 3 and all(np.isfinite(losses))

    import napari_virtualstain.train.stain_job as sj

    spec = load_folder(data_folder, stain_names=["Hoechst"])
    real = sj.reconstruction_loss
    sj.reconstruction_loss = lambda *a, **k: real(*a, **k) * float("nan")
    try:
        with pytest.raises(VirtualStainError, match="diverged"):
            train(spec, tmp_path / "nan", TrainOptions(**TINY, objective="regression"))
    finally:
        sj.reconstruction_loss = real
