"""napari dock widgets: thin doors into ``napari_virtualstain.core`` (the same calls the CLI makes).

Shared pieces: ``_controls.ModelControls`` (checkpoint, input layer, device, steps, seed, tiles, batch),
``_runner.Runner`` (one background run at a time, progress, cancel), ``_layers`` (planes in, overlaid layers out).
"""

from .stain import StainWidget
from .synthesize import SynthesizeWidget
from .train import TrainWidget
from .translate import TranslateWidget
from .uncertainty import UncertaintyWidget

__all__ = ["StainWidget", "SynthesizeWidget", "TrainWidget", "TranslateWidget", "UncertaintyWidget"]
