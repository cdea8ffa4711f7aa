"""ResidualShiftScheduler: the eta schedule (eqs. 2-3), eq. 1 (add_noise), and the reverse step (eqs. 4-5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from napari_virtualstain.core.schedulers import ResidualShiftScheduler


def reference_sqrt_etas(T: int, kappa: float, p: float, min_noise: float, max_noise: float) -> list[float]:
    """Eqs. (2)-(3), computed independently with plain python floats."""
    s1 = min(min_noise / kappa, min_noise)
    b = (max_noise / s1) ** (1.0 / (T - 1))
    return [s1 * b ** ((((t - 1) / (T - 1)) ** p) * (T - 1)) for t in range(1, T + 1)]


def test_default_schedule_endpoints_and_monotone():
    s = ResidualShiftScheduler()
    se = s.sqrt_etas.tolist()
    assert len(se) == 15 == len(s)
    assert se[0] == pytest.approx(0.02, abs=1e-12)  # min(0.04 / 2, 0.04)
    assert se[-1] == pytest.approx(0.99, abs=1e-12)
    assert all(b > a for a, b in zip(se, se[1:])), se
    # etas are the squares, and eta_0 = 0 precedes eta_1
    assert torch.allclose(s.etas, s.sqrt_etas**2)
    assert s.etas_prev[0] == 0 and torch.allclose(s.etas_prev[1:], s.etas[:-1])
    assert (s.alphas > 0).all()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"kappa": 0.5},
        {"kappa": 1.0, "power": 1.0},
        {"num_train_timesteps": 4, "kappa": 3.0, "power": 0.5, "min_noise": 0.1, "max_noise": 0.9},
    ],
)
def test_schedule_matches_formula(kw):
    cfg = {"num_train_timesteps": 15, "kappa": 2.0, "power": 0.3, "min_noise": 0.04, "max_noise": 0.99, **kw}
    s = ResidualShiftScheduler(**cfg)
    ref = reference_sqrt_etas(
        cfg["num_train_timesteps"], cfg["kappa"], cfg["power"], cfg["min_noise"], cfg["max_noise"]
    )
    assert s.sqrt_etas.tolist() == pytest.approx(ref, rel=1e-10)


def test_interior_value_default():
    # t = 8 of 15 with the defaults, written out by hand
    s1, sT, T, p = 0.02, 0.99, 15, 0.3
    b = (sT / s1) ** (1 / (T - 1))
    expected = s1 * b ** (((8 - 1) / (T - 1)) ** p * (T - 1))
    assert float(ResidualShiftScheduler().sqrt_etas[7]) == pytest.approx(expected, rel=1e-12)
    assert 0.4 < expected < 0.6  # the power-law stretch puts the middle step well above the geometric mean


@pytest.mark.parametrize("kappa, first", [(0.5, 0.04), (1.0, 0.04), (2.0, 0.02), (4.0, 0.01)])
def test_first_eta_depends_on_kappa(kappa, first):
    s = ResidualShiftScheduler(kappa=kappa)
    assert float(s.sqrt_etas[0]) == pytest.approx(first, abs=1e-12)
    assert float(s.sqrt_etas[-1]) == pytest.approx(0.99, abs=1e-12)
    # the noisiest state has std kappa * sqrt(eta_T)
    assert s.init_noise_sigma == pytest.approx(kappa * 0.99)


@pytest.mark.parametrize(
    "kw",
    [
        {"num_train_timesteps": 1},
        {"num_train_timesteps": 0},
        {"kappa": 0.0},
        {"kappa": -1.0},
        {"max_noise": 1.0},
        {"max_noise": 0.0},
        {"max_noise": 1.5},
        {"min_noise": 0.0},
        {"min_noise": -0.04},
        {"min_noise": 2.0},  # sqrt(eta_1) above sqrt(eta_T): the schedule would decrease
        {"power": 0.0},  # every eta equal: no step would move towards x0 until the last
        {"power": -1.0},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_invalid_config_raises(kw):
    with pytest.raises(ValueError):
        ResidualShiftScheduler(**kw)


def test_set_timesteps():
    s = ResidualShiftScheduler(num_train_timesteps=6)
    s.set_timesteps(6)
    assert s.timesteps.tolist() == [5, 4, 3, 2, 1, 0]
    s.set_timesteps()  # None: keep the trained length
    assert s.timesteps.tolist() == [5, 4, 3, 2, 1, 0]
    s.set_timesteps(3)  # fewer steps: an evenly spaced subset that keeps both ends of the chain (eq. 6)
    assert s.timesteps.tolist() == [5, 2, 0]
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [5]
    for n in (-1, 7, 50):
        with pytest.raises(ValueError, match="6"):
            s.set_timesteps(n)
    assert s.timesteps.tolist() == [5]  # a refused call leaves the scheduler usable
    s.set_timesteps(0)  # no step: what Bundle.make_scheduler allows only for a mean-anchored bundle (mu alone)
    assert s.timesteps.tolist() == []


def test_config_round_trip():
    """Through JSON, as a bundle's config.json stores it; diffusers' bookkeeping keys of older bundles are ignored."""
    s = ResidualShiftScheduler(num_train_timesteps=7, kappa=1.5, power=0.4, min_noise=0.05, max_noise=0.95)
    assert s.config.kappa == 1.5 and s.config["power"] == 0.4
    stored = json.loads(json.dumps(dict(s.config)))
    loaded = ResidualShiftScheduler.from_config(stored | {"_class_name": "ResidualShiftScheduler",
                                                          "_use_default_values": ["power"]})
    for key in ("num_train_timesteps", "kappa", "power", "min_noise", "max_noise"):
        assert loaded.config[key] == s.config[key]
    assert torch.equal(loaded.sqrt_etas, s.sqrt_etas)
    # also from a plain dict (what a bundle's config.json holds)
    again = ResidualShiftScheduler.from_config(dict(s.config))
    assert torch.equal(again.sqrt_etas, s.sqrt_etas)


def test_add_noise_is_eq1():
    s = ResidualShiftScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 5, 5, generator=g) * 2 - 1
    y = torch.rand(3, 2, 5, 5, generator=g) * 2 - 1
    eps = torch.randn(3, 2, 5, 5, generator=g)
    t = torch.tensor([0, 7, 14])
    out = s.add_noise(x0, eps, t, y)
    for b, ti in enumerate(t.tolist()):
        se = reference_sqrt_etas(15, 2.0, 0.3, 0.04, 0.99)[ti]
        expected = x0[b] + se**2 * (y[b] - x0[b]) + 2.0 * se * eps[b]
        assert torch.allclose(out[b], expected, atol=1e-6)
    # a scalar timestep applies to every item
    out14 = s.add_noise(x0, eps, 14, y)
    assert torch.allclose(out14[2], out[2])
    # zero noise at the noisiest step is almost y; at the first step almost x0
    z = torch.zeros_like(eps)
    assert torch.allclose(s.add_noise(x0, z, 14, y), y, atol=0.02 * 2 + 1e-6)
    assert torch.allclose(s.add_noise(x0, z, 0, y), x0, atol=4e-4 * 2 + 1e-6)


def test_prior_sample_statistics():
    s = ResidualShiftScheduler()
    y = torch.full((1, 1, 64, 128), 0.3)
    x = s.prior_sample(y, generator=torch.Generator().manual_seed(1))
    assert float(x.mean()) == pytest.approx(0.3, abs=0.1)
    assert float(x.std()) == pytest.approx(2.0 * 0.99, rel=0.05)


def test_scale_model_input_unit_scale():
    s = ResidualShiftScheduler()
    x = torch.ones(2, 1, 2, 2)
    out = s.scale_model_input(x, torch.tensor([14, 0]))
    assert float(out[0, 0, 0, 0]) == pytest.approx(1 / math.sqrt(4 * 0.99**2 + 1))
    assert float(out[1, 0, 0, 0]) == pytest.approx(1 / math.sqrt(4 * 0.02**2 + 1))


def test_last_step_returns_prediction_exactly():
    s = ResidualShiftScheduler()
    g = torch.Generator().manual_seed(0)
    x0_hat = torch.randn(2, 1, 4, 4, generator=g)
    x1 = torch.randn(2, 1, 4, 4, generator=g)
    out = s.step(x0_hat, 0, x1, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out.prev_sample, x0_hat, atol=1e-6)
    assert out.pred_original_sample is x0_hat
    # earlier steps are noisy: another seed gives another x_{t-1}
    a = s.step(x0_hat, 5, x1, generator=torch.Generator().manual_seed(1)).prev_sample
    b = s.step(x0_hat, 5, x1, generator=torch.Generator().manual_seed(2)).prev_sample
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("kappa", [2.0, 0.5])
def test_reverse_chain_has_forward_marginals(kappa):
    """With an oracle x0, x_t along the reverse chain is distributed as q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t)."""
    s = ResidualShiftScheduler(kappa=kappa)
    T = len(s)
    n = 8192
    gen = torch.Generator().manual_seed(123)
    x0 = (torch.rand(1, 1, 64, 128, generator=gen) * 2 - 1).double()
    y = (torch.rand(1, 1, 64, 128, generator=gen) * 2 - 1).double()
    x = s.add_noise(x0, torch.randn(x0.shape, generator=gen).double(), T - 1, y)

    def check(x, eta):
        r = (x - (x0 + eta * (y - x0))).flatten()
        var = kappa**2 * eta
        assert abs(float(r.mean())) < 5 * math.sqrt(var / n) + 1e-9
        if var > 0:
            assert float(r.var()) == pytest.approx(var, rel=0.1)
        else:
            assert float(r.abs().max()) < 1e-9

    check(x, float(s.etas[T - 1]))
    for t in s.timesteps.tolist():
        x = s.step(x0, t, x, generator=gen).prev_sample
        check(x, float(s.etas_prev[t]))  # x_{t} in 1-based terms, eta_0 = 0 at the end
    assert torch.allclose(x, x0)


def test_step_accepts_generator_list():
    s = ResidualShiftScheduler()
    x0 = torch.zeros(2, 1, 4, 4)
    xt = torch.ones(2, 1, 4, 4)
    both = s.step(x0, 5, xt, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    one = s.step(x0[:1], 5, xt[:1], generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(both.prev_sample[1:], one.prev_sample)
    with pytest.raises(ValueError):
        s.step(x0, 5, xt, generator=[torch.Generator().manual_seed(1)])
