"""Virtual stain widget: brightfield layer -> one layer per stain channel + instance labels, overlaid on the input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qtpy.QtWidgets import QCheckBox, QFormLayout

from ._base import TaskWidget, per_plane
from ._controls import RunSettings
from ._layers import InputSelection, LayerTuple, iter_add_layers, stack_planes, stain_layer_tuples
from ._runner import Job


@dataclass
class StackedStain:
    """StainResults of every selected plane, stacked on the input's leading axes."""

    image: np.ndarray  # (*lead, C, Y, X)
    channel_names: list[str]
    channel_kinds: list[str]
    labels: dict[str, np.ndarray]  # (*lead, Y, X)
    provenance: dict


def stack_stain_results(results: list, sel: InputSelection) -> StackedStain:
    """Stack per-plane StainResults and merge their provenance (plane, total seconds)."""
    first = results[0]
    provenance = dict(first.provenance)
    provenance.update(sel.plane_note)
    provenance["input"] = sel.layer_name
    if len(results) > 1:
        provenance["seconds"] = round(sum(r.provenance.get("seconds", 0.0) for r in results), 3)
    return StackedStain(
        stack_planes([r.image for r in results], sel.lead_shape),
        list(first.channel_names),
        list(first.channel_kinds),
        {k: stack_planes([r.labels[k] for r in results], sel.lead_shape) for k in first.labels},
        provenance,
    )


def predict_selection(bundle, sel: InputSelection, s: RunSettings, progress, should_cancel) -> StackedStain:
    """The worker side of a virtual-stain run: the same ``predict_stain`` the CLI calls, once per plane."""
    from ..core.tasks.stain import predict_stain

    def predict(array, cb):
        return predict_stain(
            bundle, array, channel_axis=sel.channel_axis, seed=s.seed, tile_size=s.tile_size,
            tile_overlap=s.tile_overlap, batch_size=s.batch_size, device=s.device, sampler=s.sampler, steps=s.steps,
            progress=cb, should_cancel=should_cancel, input_name=sel.layer_name,
        )

    return stack_stain_results(per_plane(sel, predict, progress, should_cancel), sel)


class StainWidget(TaskWidget):
    """Predict the virtual stain of the picked brightfield layer (current plane, or every plane)."""

    run_text = "Predict"

    def build_options(self, form: QFormLayout) -> None:
        self.probabilities = QCheckBox("also add boundary / foreground probabilities")
        self.probabilities.setToolTip("The raw per-pixel probabilities the instance labels are made from")
        form.addRow(self.probabilities)

    def make_job(self, bundle, settings: RunSettings, layer) -> Job:
        sel = self.select_input(bundle, settings, layer)
        probabilities = self.probabilities.isChecked()

        def work(progress, should_cancel) -> list[LayerTuple]:
            stacked = predict_selection(bundle, sel, settings, progress, should_cancel)
            return stain_layer_tuples(
                stacked.image, stacked.channel_names, stacked.channel_kinds, stacked.labels, stacked.provenance,
                sel.geometry, probabilities=probabilities,
            )

        def done(tuples: list[LayerTuple]):
            yield from iter_add_layers(self.viewer, tuples)
            self.warn_if_input_gone(sel)

        return Job(f"Virtual stain of '{sel.layer_name}'", work, done, {"selection": sel})
