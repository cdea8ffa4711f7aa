"""How a task runs, as one object every task takes (diffusers' pipelines take their call arguments the same way).

``RunSettings`` says where and in what pieces the work runs and how it reports back — never *what* is computed:
seeds, steps, samples, thresholds and classes stay the task's own arguments. The CLI builds it from its options
(``cli_files.run_settings``), the widgets from their controls (``_widgets/_controls.RunChoices``), scripts by hand:

    predict_stain(bundle, image, seed=0, settings=RunSettings(tile_size=256, threads=1, progress=print))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """The run's settings; every field's default lets the bundle or the machine decide."""

    tile_size: int | None = None  # None: the bundle's tile size
    tile_overlap: int | None = None  # None: the bundle's overlap
    batch_size: int = 4  # tiles per network call
    device: str | None = None  # "cpu", "cuda", "cuda:1", "mps"; None: a GPU if there is one, else the CPU
    half: bool | None = None  # bf16/fp16 autocast; None: where it is fast (core.model.Denoiser), float32 elsewhere
    threads: int | None = None  # CPU intra-op threads; None: the environment's, else the free cores (core.threads)
    block_size: int | None = None  # stain prediction of big fields: None: automatic, 0: never (tasks.stain.block_plan)
    progress: Callable[[Any], None] | None = None  # called with a sampling.Progress after every network call
    should_cancel: Callable[[], bool] | None = None  # polled between network calls; True stops with Cancelled

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **changes)


DEFAULT = RunSettings()


def time_left(elapsed: float, fraction: float) -> str:
    """'~40 s left' / '~3 min left' from the pace so far, once a run is 2 % in and 10 s old (earlier guesses mislead);
    the CLI's progress lines and the widgets' progress bars both show it."""
    if fraction <= 0.02 or elapsed <= 10 or fraction >= 1:
        return ""
    left = elapsed * (1 - fraction) / fraction
    return f"~{left:.0f} s left" if left < 90 else f"~{left / 60:.0f} min left"
