"""A bundle whose one-pass network is the mean of several independently trained ones (a deep ensemble)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_config
from napari_virtualstain.core.bundle import load_bundle, save_bundle
from napari_virtualstain.core.errors import BundleError
from napari_virtualstain.core.model import build_unet
from napari_virtualstain.core.settings import RunSettings
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.unet import NetworkMean

EXACT = RunSettings(half=False, threads=1)


def _nets(config, seeds):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_unet(config.unet))
    return out


@pytest.fixture()
def pair(tmp_path):
    """Two single-network regression bundles and the bundle holding both as one mean."""
    config = make_tiny_config("regression")
    a, b = _nets(config, (0, 1))
    single_a = save_bundle(tmp_path / "a", make_tiny_config("regression"), a)
    single_b = save_bundle(tmp_path / "b", make_tiny_config("regression"), b)
    both = make_tiny_config("regression")
    both.networks = ["network_2.safetensors"]
    return single_a, single_b, save_bundle(tmp_path / "ab", both, a, networks=[b])


def test_a_bundle_of_two_networks_predicts_their_mean(pair):
    single_a, single_b, both = pair
    assert isinstance(both.unet, NetworkMean) and (both.path / "network_2.safetensors").is_file()
    image = np.random.default_rng(0).random((48, 40)).astype(np.float32) * 1000
    pa, pb, pab = (predict_stain(b, image, make_labels=False, settings=EXACT) for b in (single_a, single_b, both))
    # the networks' outputs are averaged: a stain (linear in them) is the mean of the two predictions; boundary and
    # foreground probabilities are the sigmoid of the mean logit, between the two
    np.testing.assert_allclose(pab.image[0], (pa.image[0] + pb.image[0]) / 2, rtol=1e-5, atol=1e-3)
    lo, hi = np.minimum(pa.image[1:], pb.image[1:]), np.maximum(pa.image[1:], pb.image[1:])
    assert np.all((pab.image[1:] >= lo - 1e-5) & (pab.image[1:] <= hi + 1e-5))
    assert pab.provenance["network_passes"] == 2 and pa.provenance["network_passes"] == 1
    assert "mean of 2 independently trained" in both.summary()


def test_the_id_covers_every_network_and_a_missing_one_is_named(pair):
    single_a, _, both = pair
    assert both.id != single_a.id
    path = both.path / "network_2.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert load_bundle(both.path).id != both.id
    path.unlink()
    with pytest.raises(BundleError, match="network_2.safetensors"):
        load_bundle(both.path)


@pytest.mark.parametrize("networks, words", [(["model.safetensors"], "distinct"), (["m.pt"], ".safetensors"),
                                            (["../x.safetensors"], "file names")])
def test_bad_networks_are_a_clear_error(pair, networks, words):
    _, _, both = pair
    cfg = json.loads((both.path / "config.json").read_text())
    (both.path / "config.json").write_text(json.dumps(cfg | {"networks": networks}))
    with pytest.raises(BundleError, match="networks") as err:
        load_bundle(both.path)
    assert words in str(err.value)


def test_the_networks_of_an_anchored_bundle_are_its_mean_networks(tmp_path):
    """A mean-anchored bundle's further networks join mu(x); the refinement is one network; saving a mean of networks as mu
    writes it back as the same networks."""
    from conftest import make_tiny_config as tiny

    config = tiny()
    anchored = type(config)(**{**config.__dict__, "residual_source": "mean_prediction",
                               "unet": {**config.unet, "in_channels": config.unet["in_channels"] + 3},
                               "mean_unet": make_tiny_config("regression").unet})
    mu_a, mu_b = _nets(make_tiny_config("regression"), (0, 1))
    torch.manual_seed(2)
    refine = build_unet(anchored.unet)
    bundle = save_bundle(tmp_path / "anchored", anchored, refine, mean_unet=NetworkMean([mu_a, mu_b]))
    assert bundle.config.networks == ["network_2.safetensors"]
    assert isinstance(bundle.mean_unet, NetworkMean) and not isinstance(bundle.unet, NetworkMean)
    image = np.random.default_rng(1).random((40, 40)).astype(np.float32) * 1000
    res = predict_stain(bundle, image, make_labels=False, steps=2, settings=EXACT)
    assert res.provenance["network_passes"] == 2 + 2


def test_fine_tuning_from_a_bundle_of_networks_starts_from_its_first(pair):
    from napari_virtualstain.train.finetune import load_init_weights

    single_a, _, both = pair
    fresh = build_unet(both.config.unet)
    load_init_weights(fresh, both, both.config)
    for k, v in single_a.unet.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_the_mean_network_of_an_anchored_ensemble_exports_as_all_its_networks(tmp_path):
    """The one-pass view of an anchored bundle (what bioimage.io export writes) keeps every network of mu."""
    from napari_virtualstain.core.export import _mean_only

    config = make_tiny_config()
    anchored = type(config)(**{**config.__dict__, "residual_source": "mean_prediction",
                               "unet": {**config.unet, "in_channels": config.unet["in_channels"] + 3},
                               "mean_unet": make_tiny_config("regression").unet})
    mu_a, mu_b = _nets(make_tiny_config("regression"), (0, 1))
    bundle = save_bundle(tmp_path / "anchored", anchored, build_unet(anchored.unet), mean_unet=NetworkMean([mu_a, mu_b]))
    mean = _mean_only(bundle)
    assert isinstance(mean.unet, NetworkMean) and len(mean.unet.networks) == 2
    image = np.random.default_rng(2).random((40, 40)).astype(np.float32) * 1000
    res = predict_stain(mean, image, make_labels=False, settings=EXACT)
    assert res.provenance["network_passes"] == 2
