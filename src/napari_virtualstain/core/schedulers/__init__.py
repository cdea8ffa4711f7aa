"""Schedulers: the residual-shift one written here; DDPM/DDIM come from diffusers."""

from .residual_shift import ResidualShiftScheduler, ResidualShiftSchedulerOutput

__all__ = ["ResidualShiftScheduler", "ResidualShiftSchedulerOutput"]
