"""Schedulers: the residual-shift one written here; DDPM/DDIM/DDIMInverse come from diffusers.

``make_scheduler`` is the one place that turns a bundle's objective + stored scheduler config into a ready-to-step
scheduler, so predict, validation, uncertainty and translation all sample the same way.
"""

from __future__ import annotations

from .residual_shift import ResidualShiftScheduler, ResidualShiftSchedulerOutput, randn_per_item

__all__ = [
    "DIFFUSION_SAMPLERS",
    "ResidualShiftScheduler",
    "ResidualShiftSchedulerOutput",
    "default_ddpm_config",
    "make_scheduler",
    "randn_per_item",
]

#: samplers a DDPM-trained (epsilon) bundle can use; residual shift has exactly one
DIFFUSION_SAMPLERS = ("ddim", "ddpm")
DEFAULT_DDIM_STEPS = 50


def default_ddpm_config(num_train_timesteps: int = 1000, prediction_type: str = "epsilon", **overrides) -> dict:
    """DDPM training schedule: cosine betas (better than linear for small images), x̂0 clipped to [-1, 1],
    trailing timestep spacing so a short DDIM schedule starts at the noisiest step."""
    from diffusers import DDPMScheduler

    settings = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing="trailing") | overrides
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type, **settings)
    return {k: v for k, v in sched.config.items() if not k.startswith("_")}


def make_scheduler(objective: str, config: dict | None, sampler: str | None = None, steps: int | None = None,
                   zero_steps: bool = False):
    """A scheduler with its timesteps set, or None for a one-pass regression model.

    residual_shift: its full short chain, or ``steps`` evenly spaced steps of it (eq. 6 of ``residual_shift.py``).
    ddpm: ``sampler`` "ddim" (default, ``steps`` default 50, eta 0) or "ddpm" (``steps`` default: every training step);
    "ddim_inverse" runs DDIM forwards (image -> noise) on the same timesteps, for translation.
    ``zero_steps``: 0 steps (a chain with no timesteps: the mean network alone) is allowed — only for a
    mean-anchored residual-shift bundle (``BundleConfig.takes_zero_steps``).
    """
    from ..errors import VirtualStainError

    if steps == 0 and not zero_steps:
        raise VirtualStainError("0 steps (the mean network alone) applies to a mean-anchored residual-shift "
                                "checkpoint only: use 1 or more steps")

    if objective == "regression":
        if sampler not in (None, "") or steps is not None:
            raise VirtualStainError("a regression checkpoint predicts in one pass: it takes no --sampler or --steps")
        return None
    if objective == "residual_shift":
        if sampler not in (None, "", "residual_shift"):
            raise VirtualStainError(
                f"sampler {sampler!r} does not apply to a residual-shift checkpoint (it has its own {config.get('num_train_timesteps')}-step chain)"
            )
        sched = _from_config(ResidualShiftScheduler, config)
        try:
            sched.set_timesteps(steps)
        except ValueError as exc:
            raise VirtualStainError(str(exc)) from None
        return sched
    if objective in ("ddpm",):
        from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

        sampler = sampler or "ddim"
        classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "ddim_inverse": DDIMInverseScheduler}
        if sampler not in classes:
            raise VirtualStainError(f"unknown sampler {sampler!r}; use one of {', '.join(DIFFUSION_SAMPLERS)}")
        cls = classes[sampler]
        sched = _from_config(cls, config)
        total = sched.config.num_train_timesteps
        n = steps if steps is not None else (total if sampler == "ddpm" else DEFAULT_DDIM_STEPS)
        if not isinstance(n, int) or not 1 <= n <= total:
            raise VirtualStainError(f"steps must be between 1 and {total} (the model's training steps); got {n}")
        sched.set_timesteps(n)
        return sched
    raise VirtualStainError(f"unknown objective {objective!r}")


def _from_config(cls, config):
    """``cls.from_config`` with only the keys ``cls`` takes (a DDPM config feeds DDIM and DDIMInverse quietly)."""
    import inspect

    from ..errors import BundleError

    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls.from_config({k: v for k, v in config.items() if k in accepted})
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise BundleError(f"config.json: bad 'scheduler': {exc}") from None
