"""`train --networks N`: a deep ensemble from one command (recipe and regression), resumable, and one clear error
where it does not apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.unet import NetworkMean
from napari_virtualstain.train.data import load_folder
from test_train import TINY_CLI, data_folder  # noqa: F401 - the fixture


def _image(folder):
    return np.asarray(load_folder(folder).images[0].inputs[0])


def test_regression_with_two_networks_predicts_the_mean_of_two_seeds(data_folder, tmp_path, capsys):  # noqa: F811
    from napari_virtualstain.cli import main

    out = tmp_path / "ens"
    assert main(["train", str(data_folder), "-o", str(out), "--objective", "regression", "--networks", "2",
                 *TINY_CLI]) == 0
    assert "network 2/2" in capsys.readouterr().err
    bundle = load_bundle(out)
    assert bundle.config.networks == ["network_2.safetensors"] and isinstance(bundle.unet, NetworkMean)
    members = [load_bundle(out / "training_state" / f"member_{i}") for i in (1, 2)]
    assert [m.config.training["seed"] for m in members] == [0, 1]  # two seeds, not one network twice
    a, b = (m.unet.state_dict()["conv_in.weight"] for m in members)
    assert not torch.equal(a, b)
    image = _image(data_folder)
    mean = (predict_stain(members[0], image, make_labels=False).image[0]
            + predict_stain(members[1], image, make_labels=False).image[0]) / 2  # the stain: linear in the outputs
    np.testing.assert_allclose(predict_stain(bundle, image, make_labels=False).image[0], mean, rtol=1e-4, atol=1e-2)
    assert [n["id"] for n in bundle.config.training["networks"]] == [members[1].id]
    # resume with more steps: both members train on, and the bundle is joined again
    assert main(["train", str(data_folder), "-o", str(out), "--objective", "regression", "--networks", "2",
                 *TINY_CLI[:1], "4", *TINY_CLI[2:], "--resume"]) == 0
    assert [load_bundle(out / "training_state" / f"member_{i}").config.training["steps"] for i in (1, 2)] == [4, 4]
    assert load_bundle(out).id != bundle.id


def test_the_recipe_with_two_networks_refines_their_mean(data_folder, tmp_path, capsys):  # noqa: F811
    from napari_virtualstain.cli import main
    from napari_virtualstain.train.recipe import MEAN_DIR, MEAN_ENSEMBLE_DIR

    out = tmp_path / "mine"
    assert main(["train", str(data_folder), "-o", str(out), "--stain-names", "Hoechst", "--networks", "2",
                 *TINY_CLI]) == 0
    err = capsys.readouterr().err
    assert "stage 1/3 mean network 2/2" in err and "mean of 2 networks" in err and "stage 3/3" in err
    bundle = load_bundle(out)
    assert bundle.config.anchored and bundle.config.networks == ["network_2.safetensors"]
    assert isinstance(bundle.mean_unet, NetworkMean) and len(bundle.mean_unet.networks) == 2
    joined = load_bundle(out / MEAN_ENSEMBLE_DIR)
    assert bundle.config.training["mean_model"]["bundle_id"] == joined.id  # the refinement refined the mean of two
    assert load_bundle(out / f"{MEAN_DIR}_2").config.training["seed"] == 1
    assert predict_stain(bundle, _image(data_folder)).labels
    # a resume with nothing left to train says so and keeps every member
    assert main(["train", str(data_folder), "-o", str(out), "--stain-names", "Hoechst", "--networks", "2",
                 *TINY_CLI, "--resume"]) == 0
    assert "done (2 steps, 2 networks)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [(["--objective", "ddpm", "--networks", "2"], "recommended recipe"),
                                           (["--networks", "0"], "1 to 8")])
def test_networks_where_they_do_not_apply_is_one_clear_error(data_folder, tmp_path, capsys, extra, words):  # noqa: F811
    from napari_virtualstain.cli import main

    assert main(["train", str(data_folder), "-o", str(tmp_path / "x"), *extra, *TINY_CLI]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and words in err and "Traceback" not in err
    assert not (tmp_path / "x" / "config.json").exists()


def test_joining_an_ensemble_with_another_network_keeps_every_network(data_folder, tmp_path):  # noqa: F811
    from napari_virtualstain.cli import main
    from napari_virtualstain.train.ensemble import join_networks

    for seed in (0, 1, 2):
        assert main(["train", str(data_folder), "-o", str(tmp_path / f"s{seed}"), "--objective", "regression",
                     "--seed", str(seed), *TINY_CLI]) == 0
    two = join_networks(tmp_path / "s0", [tmp_path / "s1"], tmp_path / "two")
    three = join_networks(two, [tmp_path / "s2"], tmp_path / "three")
    assert three.config.networks == ["network_2.safetensors", "network_3.safetensors"]
    assert len(three.config.training["networks"]) == 2
    image = _image(data_folder)
    singles = [predict_stain(load_bundle(tmp_path / f"s{s}"), image, make_labels=False).image[0] for s in (0, 1, 2)]
    np.testing.assert_allclose(predict_stain(load_bundle(tmp_path / "three"), image, make_labels=False).image[0],
                               np.mean(singles, axis=0), rtol=1e-4, atol=1e-2)
