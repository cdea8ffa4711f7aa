"""Residual-shift diffusion scheduler (ResShift, Yue et al. 2023; used for virtual staining by CellResDM).

Instead of diffusing a target towards pure noise, residual shifting moves it towards the *input* image ``y``:

    (1)  x_t = x0 + eta_t * (y - x0) + kappa * sqrt(eta_t) * eps,          eps ~ N(0, I)

so the chain only has to bridge the residual ``y - x0``; ~15 steps are enough. The schedule of ``eta`` is geometric
in ``sqrt(eta)`` with a power-law stretch of the step axis (``p``):

    (2)  sqrt(eta_1) = min(min_noise / kappa, min_noise),  sqrt(eta_T) = 0.99 (``max_noise``)
    (3)  sqrt(eta_t) = sqrt(eta_1) * b ** (((t - 1) / (T - 1)) ** p * (T - 1)),  b = (sqrt(eta_T) / sqrt(eta_1)) ** (1 / (T - 1))

The network predicts x0 directly; the reverse step is the Gaussian posterior q(x_{t-1} | x_t, x0 = x̂0):

    (4)  mean = (eta_{t-1} / eta_t) * x_t + (alpha_t / eta_t) * x̂0,   alpha_t = eta_t - eta_{t-1}
    (5)  var  = kappa**2 * (eta_{t-1} / eta_t) * alpha_t                (no noise at the last step, eta_0 = 0)

Sampling starts from x_T = y + kappa * sqrt(eta_T) * eps (eq. 1 with eta_T ~ 1, the x0 term dropped).

Fewer steps: the forward process is Markov with independent Gaussian increments, so for any s < t
q(x_t | x_s, x0) = N(x_s + (eta_t - eta_s)(y - x0), kappa^2 (eta_t - eta_s) I) and the posterior keeps the form of
eqs. (4)-(5) with eta_{t-1} replaced by eta_s:

    (6)  mean = (eta_s / eta_t) * x_t + ((eta_t - eta_s) / eta_t) * x̂0,   var = kappa**2 * (eta_s / eta_t) * (eta_t - eta_s)

A model trained on all T steps can therefore be sampled on any subset that ends at the first step (``set_timesteps``).

Written in diffusers' style (a ``config``, ``from_config``, ``set_timesteps``, ``step`` and ``add_noise``), without
importing diffusers (whose import costs ~70 MB and seconds before a prediction starts). Timesteps are
0-based as in diffusers: index ``i`` holds eta_{i+1}, i.e. timestep ``T - 1`` is the noisiest and ``0`` the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ResidualShiftScheduler", "ResidualShiftSchedulerOutput", "randn_per_item"]


@dataclass
class ResidualShiftSchedulerOutput:
    """What one reverse step returns.

    prev_sample: x_{t-1}, the input of the next step.
    pred_original_sample: the x̂0 the step was taken with (hooks average it for DDPMavg-style maps).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def randn_per_item(shape, generator) -> torch.Tensor:
    """CPU standard normal noise; with a list of generators, one per batch item (as diffusers' ``randn_tensor``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        out = torch.empty(tuple(shape))
        for item, g in zip(out, generator):  # drawn into place: no per-item copies to stack
            torch.randn(tuple(shape[1:]), generator=g, out=item)
        return out
    return torch.randn(tuple(shape), generator=generator)


class SchedulerConfig(dict):
    """A scheduler's settings: a dict (stored as the bundle's ``scheduler``), read as attributes too (``config.kappa``)
    as diffusers' configs are."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ResidualShiftScheduler:
    """Scheduler for residual-shift diffusion; see the module docstring for the equations."""

    order = 1

    @classmethod
    def from_config(cls, config: dict) -> ResidualShiftScheduler:
        """From a stored config; diffusers' bookkeeping keys (``_class_name``, ``_use_default_values``, ...) ignored."""
        return cls(**{k: v for k, v in dict(config).items() if not k.startswith("_")})

    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        power: float = 0.3,
        min_noise: float = 0.04,
        max_noise: float = 0.99,
    ):
        if num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if kappa <= 0:
            raise ValueError("kappa must be positive")
        if not 0 < max_noise < 1:
            raise ValueError("max_noise (sqrt(eta_T)) must lie in (0, 1)")
        if not 0 < min(min_noise / kappa, min_noise) < max_noise:
            raise ValueError("min_noise must be positive and give sqrt(eta_1) = min(min_noise/kappa, min_noise) < max_noise")
        if power <= 0:
            raise ValueError("power must be positive")
        self.config = SchedulerConfig(num_train_timesteps=num_train_timesteps, kappa=kappa, power=power,
                                      min_noise=min_noise, max_noise=max_noise)
        self.sqrt_etas = self._sqrt_eta_schedule(num_train_timesteps, kappa, power, min_noise, max_noise)
        self.etas = self.sqrt_etas**2
        # eta_{t-1} for every t; eta_0 = 0 makes the last step deterministic (eq. 5).
        self.etas_prev = torch.cat([torch.zeros(1, dtype=torch.float64), self.etas[:-1]])
        self.alphas = self.etas - self.etas_prev
        self.set_timesteps(None)
        self.init_noise_sigma = kappa * float(self.sqrt_etas[-1])

    @staticmethod
    def _sqrt_eta_schedule(T: int, kappa: float, power: float, min_noise: float, max_noise: float) -> torch.Tensor:
        """Eqs. (2)-(3), in float64 so the endpoints are exact."""
        sqrt_eta_1 = min(min_noise / kappa, min_noise)
        base = (max_noise / sqrt_eta_1) ** (1.0 / (T - 1))
        t = torch.arange(1, T + 1, dtype=torch.float64)
        exponent = ((t - 1) / (T - 1)) ** power * (T - 1)
        return sqrt_eta_1 * base**exponent

    # -- diffusers scheduler API -------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None):
        """Sample over all T trained steps (default) or an evenly spaced subset of ``num_inference_steps`` of them
        that always holds the noisiest and the last step (eq. 6). 0: no step (a mean-anchored bundle's mean
        prediction alone, ``Bundle.make_scheduler``)."""
        T = self.config.num_train_timesteps
        n = T if num_inference_steps is None else int(num_inference_steps)
        if not 0 <= n <= T:
            raise ValueError(f"steps must be between 1 and {T} (the steps this residual-shift model was trained with); got {n}")
        picked = sorted({int(round(v)) for v in torch.linspace(T - 1, 0, n).tolist()}, reverse=True) if n else []
        self.num_inference_steps = len(picked)
        self.timesteps = torch.tensor(picked, dtype=torch.long, device=device)
        # eta_s of the step each timestep goes to (0 after the last one)
        self._prev_eta = {t: (float(self.etas[s]) if s is not None else 0.0)
                          for t, s in zip(picked, [*picked[1:], None])}

    def _per_sample(self, values: torch.Tensor, timesteps, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=values.device).long().reshape(-1)
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Divide x_t by its approximate std, sqrt(kappa^2 * eta_t + 1), so the network sees unit-scale inputs."""
        eta = self._per_sample(self.etas, timestep, sample)
        return sample / torch.sqrt(self.config.kappa**2 * eta + 1.0)

    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        residual_source: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. (1): x_t from x0 (``original_samples``), y (``residual_source``) and eps (``noise``)."""
        eta = self._per_sample(self.etas, timesteps, original_samples)
        sqrt_eta = self._per_sample(self.sqrt_etas, timesteps, original_samples)
        return original_samples + eta * (residual_source - original_samples) + self.config.kappa * sqrt_eta * noise

    def prior_sample(
        self, residual_source: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_T = y + kappa * sqrt(eta_T) * eps: where sampling starts."""
        if noise is None:
            noise = randn_per_item(residual_source.shape, generator)
        noise = noise.to(device=residual_source.device, dtype=residual_source.dtype)
        return residual_source + self.init_noise_sigma * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ResidualShiftSchedulerOutput | tuple:
        """Eqs. (4)-(6): draw the next sample given x_t (``sample``) and the network's x̂0 (``model_output``).

        Noise is drawn on the CPU from ``generator`` (or given as ``noise``), so a seed gives the same result on any
        device; a list of generators draws batch item ``b`` from ``generator[b]`` (one seed per item).
        """
        t = int(timestep)
        x0_hat = model_output
        eta = float(self.etas[t])
        eta_prev = self._prev_eta.get(t, float(self.etas_prev[t]))  # a timestep off the schedule: one trained step
        alpha = eta - eta_prev
        # in place on one fresh canvas: a big field's step allocates one image, not four
        mean = x0_hat.mul(alpha / eta).add_(sample, alpha=eta_prev / eta)
        if eta_prev > 0:
            if noise is None:
                noise = randn_per_item(sample.shape, generator)
            noise = noise.to(device=sample.device, dtype=sample.dtype)
            std = math.sqrt(self.config.kappa**2 * (eta_prev / eta) * alpha)
            prev = mean.add_(noise, alpha=std)
        else:
            prev = mean
        if not return_dict:
            return (prev, x0_hat)
        return ResidualShiftSchedulerOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
