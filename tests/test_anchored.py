"""Mean-anchored residual shift (predict, then refine), fewer steps, sample averaging and the labels route."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from napari_virtualstain.core.bundle import MEAN_WEIGHTS_NAME, load_bundle
from napari_virtualstain.core.errors import BundleError, VirtualStainError
from napari_virtualstain.core.schedulers import ResidualShiftScheduler
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.train.data import load_folder
from napari_virtualstain.train.loop import TrainOptions, train

from test_train import TINY, _synthetic_field, data_folder  # noqa: F401  (fixture)
from napari_virtualstain.core.settings import RunSettings


@pytest.fixture()
def anchored_pair(data_folder, tmp_path):  # noqa: F811
    spec = load_folder(data_folder, input_names=["brightfield"], stain_names=["Hoechst"])
    mean, _ = train(spec, tmp_path / "mu", TrainOptions(**TINY, objective="regression"))
    opts = TrainOptions(**TINY, residual_source="mean_prediction", mean_from=str(tmp_path / "mu"))
    anchored, history = train(spec, tmp_path / "anchored", opts)
    return mean, anchored, history


def test_anchored_bundle_is_one_folder_with_one_id(anchored_pair, tmp_path):
    mean, anchored, history = anchored_pair
    folder = tmp_path / "anchored"
    assert (folder / MEAN_WEIGHTS_NAME).is_file() and (folder / "model.safetensors").is_file()
    loaded = load_bundle(folder)
    assert loaded.config.anchored and loaded.id == anchored.id
    assert loaded.config.training["mean_model"]["bundle_id"] == mean.id
    # the id covers both networks: changing mu's weights changes the id
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["residual_source"] == "mean_prediction" and cfg["mean_model"]["weights"] == MEAN_WEIGHTS_NAME
    assert cfg["unet"]["in_channels"] == 1 + 2 * 3  # x_t + brightfield + mu(x)
    assert (folder / MEAN_WEIGHTS_NAME).read_bytes() == (tmp_path / "mu" / "model.safetensors").read_bytes()
    state = load_file(str(folder / MEAN_WEIGHTS_NAME))
    first = next(iter(state))
    state[first] = state[first] + 1
    save_file(state, str(folder / MEAN_WEIGHTS_NAME))
    assert load_bundle(folder).id != anchored.id
    assert "val" in history[-1]


def test_anchored_bundle_without_its_mean_network_is_refused(anchored_pair, tmp_path):
    (tmp_path / "anchored" / MEAN_WEIGHTS_NAME).unlink()
    with pytest.raises(BundleError, match=MEAN_WEIGHTS_NAME):
        load_bundle(tmp_path / "anchored")


def test_untrained_refinement_returns_mu_exactly(data_folder, tmp_path):  # noqa: F811
    """With the residual head at its zero init, every x̂0 is mu(x): the chain ends on the regression prediction."""
    spec = load_folder(data_folder, input_names=["brightfield"], stain_names=["Hoechst"])
    train(spec, tmp_path / "mu", TrainOptions(**TINY, objective="regression"))
    opts = TrainOptions(**{**TINY, "steps": 0}, residual_source="mean_prediction", mean_from=str(tmp_path / "mu"))
    bundle, _ = train(spec, tmp_path / "a0", opts)
    bf, _, _ = _synthetic_field(5)
    mu = predict_stain(load_bundle(tmp_path / "mu"), bf, make_labels=False, settings=RunSettings(half=False)).image
    refined = predict_stain(bundle, bf, make_labels=False, seed=3, settings=RunSettings(half=False))
    np.testing.assert_allclose(refined.image, mu, atol=1e-3 * np.abs(mu).max())
    assert refined.provenance["network_passes"] == refined.provenance["steps"] + 1


def test_anchored_prediction_fewer_steps_and_sample_averaging(anchored_pair):
    _, bundle, _ = anchored_pair
    bf, _, _ = _synthetic_field(7)
    full = predict_stain(bundle, bf, make_labels=False, settings=RunSettings(half=False))
    assert full.provenance["steps"] == 15 and full.sample_std is None
    four = predict_stain(bundle, bf, make_labels=False, steps=4, settings=RunSettings(half=False))
    assert four.provenance["steps"] == 4 and four.provenance["network_passes"] == 5
    avg = predict_stain(bundle, bf, make_labels=False, steps=4, samples=3, seed=1, settings=RunSettings(half=False))
    one = [predict_stain(bundle, bf, make_labels=False, steps=4, seed=s, settings=RunSettings(half=False)).image for s in (1, 2, 3)]
    np.testing.assert_allclose(avg.image, np.mean(one, axis=0), atol=1e-4 * np.abs(avg.image).max() + 1e-5)
    assert avg.sample_std.shape == avg.image.shape and avg.provenance["samples"] == 3
    with pytest.raises(VirtualStainError, match="between 1 and 15"):
        predict_stain(bundle, bf, steps=16)


def test_zero_steps_is_the_mean_network_alone(anchored_pair, tmp_path):
    """0 steps = mu(x) in one pass, whatever the seed; a checkpoint without a mean network refuses 0 steps."""
    mean, bundle, _ = anchored_pair
    bf, _, _ = _synthetic_field(7)
    plain = RunSettings(half=False)
    mu = predict_stain(mean, bf, make_labels=False, settings=plain).image
    zero = predict_stain(bundle, bf, make_labels=False, steps=0, seed=5, samples=3, settings=plain)
    np.testing.assert_allclose(zero.image, mu, atol=1e-5 * np.abs(mu).max())
    assert zero.provenance["steps"] == 0 and zero.provenance["network_passes"] == 1
    assert zero.provenance["sampler"] == "mean network" and float(np.abs(zero.sample_std).max()) < 1e-5 * np.abs(mu).max()
    cfg = json.loads((tmp_path / "anchored" / "config.json").read_text())
    cfg["sampling"] = {"steps": 0}
    (tmp_path / "anchored" / "config.json").write_text(json.dumps(cfg))
    default = predict_stain(load_bundle(tmp_path / "anchored"), bf, make_labels=False, settings=plain)
    assert default.provenance["steps"] == 0  # a validated default of 0 steps is used as such
    with pytest.raises(VirtualStainError, match="mean-anchored"):
        predict_stain(mean, bf, steps=0)
    spec = load_folder(tmp_path / "data", input_names=["brightfield"], stain_names=["Hoechst"])  # data_folder's
    plain_rs, _ = train(spec, tmp_path / "rs0", TrainOptions(**{**TINY, "steps": 1}))
    with pytest.raises(VirtualStainError, match="1 or more steps"):
        predict_stain(plain_rs, bf, steps=0)


def test_validated_defaults_offer_the_mean_network_alone(anchored_pair, tmp_path):
    """choose_sampling scores 0 steps (mu alone) beside the chains; a chosen 0 is written, reloads and is used."""
    from napari_virtualstain.train.defaults import choose_sampling, write_sampling

    _, bundle, _ = anchored_pair
    spec = load_folder(tmp_path / "data", input_names=["brightfield"], stain_names=["Hoechst"])  # data_folder's
    result = choose_sampling(bundle, spec, steps=(1, 15), samples=(1, 2), tta=(1,))
    rows = {r["steps"]: r["r"] for r in result["steps_sweep"]}
    assert sorted(rows) == [0, 1, 15]
    chosen = result["chosen"]["steps"]
    assert chosen == min(s for s, r in rows.items() if r >= max(rows.values()) - result["tolerance"])
    again = write_sampling(tmp_path / "anchored", result["chosen"], "test")
    bf, _, _ = _synthetic_field(7)
    assert predict_stain(again, bf, make_labels=False).provenance["steps"] == chosen
    forced = write_sampling(tmp_path / "anchored", {**result["chosen"], "steps": 0}, "test")
    assert forced.config.sampling["steps"] == 0 and predict_stain(forced, bf).provenance["network_passes"] == 1
    assert "steps 0 (the mean network alone" in forced.summary()  # what `virtualstain info` prints


def test_mean_prediction_needs_a_matching_regression_bundle(data_folder, tmp_path):  # noqa: F811
    spec = load_folder(data_folder, input_names=["brightfield"], stain_names=["Hoechst"])
    with pytest.raises(VirtualStainError, match="--mean-from"):
        train(spec, tmp_path / "x", TrainOptions(**TINY, residual_source="mean_prediction"))
    rs, _ = train(spec, tmp_path / "rs", TrainOptions(**{**TINY, "steps": 1}))
    with pytest.raises(VirtualStainError, match="regression"):
        train(spec, tmp_path / "y", TrainOptions(**TINY, residual_source="mean_prediction", mean_from=str(tmp_path / "rs")))


def test_respaced_schedule_keeps_the_chain_ends_and_matches_consecutive_steps():
    sched = ResidualShiftScheduler()
    sched.set_timesteps(4)
    ts = sched.timesteps.tolist()
    assert ts[0] == 14 and ts[-1] == 0 and len(ts) == 4
    # with all steps, eq. (6) is eq. (4)-(5): a respaced step over one index equals the trained step
    full = ResidualShiftScheduler()
    x, x0 = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    noise = torch.randn(1, 1, 8, 8)
    a = full.step(x0, 9, x, noise=noise).prev_sample
    eta, eta_prev = float(full.etas[9]), float(full.etas[8])
    expected = (eta_prev / eta) * x + (1 - eta_prev / eta) * x0 + 2.0 * np.sqrt(eta_prev / eta * (eta - eta_prev)) * noise
    torch.testing.assert_close(a, expected.float(), rtol=1e-5, atol=1e-5)
    # a jump 14 -> 9 uses eta_9 as the previous eta; the last step is deterministic (x̂0 itself)
    b = sched.step(x0, 14, x, noise=noise).prev_sample
    e14, e9 = float(sched.etas[14]), float(sched.etas[9])
    torch.testing.assert_close(b, ((e9 / e14) * x + (1 - e9 / e14) * x0 + 2.0 * np.sqrt(e9 / e14 * (e14 - e9)) * noise).float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.step(x0, 0, x, noise=noise).prev_sample, x0)


def test_anchored_ddpm_generates_the_residual_on_top_of_mu(anchored_pair, data_folder, tmp_path):  # noqa: F811
    """CorrDiff-style DDPM: the chain makes x0 - mu(x); predictions and the x̂0 the maps average are mu + residual."""
    from napari_virtualstain.core.uncertainty import predict_uncertainty

    spec = load_folder(data_folder, input_names=["brightfield"], stain_names=["Hoechst"])
    opts = TrainOptions(**TINY, objective="ddpm", prediction_type="v_prediction", residual_source="mean_prediction",
                        mean_from=str(tmp_path / "mu"))
    bundle, _ = train(spec, tmp_path / "ddpm", opts)
    assert bundle.config.anchored and bundle.config.objective == "ddpm"
    assert bundle.config.unet["in_channels"] == 3 + 1 + 3
    bf, _, _ = _synthetic_field(9)
    mu = predict_stain(load_bundle(tmp_path / "mu"), bf, make_labels=False, settings=RunSettings(half=False)).image
    res = predict_stain(bundle, bf, make_labels=False, steps=3, settings=RunSettings(half=False))
    assert res.provenance["network_passes"] == 4 and np.isfinite(res.image).all()
    unc = predict_uncertainty(bundle, bf, mode="steps", steps=5, window=(0.0, 1.0), make_labels=False,
                              settings=RunSettings(half=False))
    # the averaged x̂0 lives in output units around mu, not around 0 (a residual that forgot mu would)
    hoechst = 0
    assert abs(unc.maps["avg"][hoechst].mean() - mu[hoechst].mean()) < abs(mu[hoechst].mean()) + 1e-6
    assert np.corrcoef(unc.maps["avg"][hoechst].ravel(), mu[hoechst].ravel())[0, 1] > 0.3
