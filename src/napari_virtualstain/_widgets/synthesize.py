"""Synthesize widget: N new images of one class from a class-conditional checkpoint, one layer per channel.

``core.tasks.classcond.synthesize`` (sample i uses seed ``seed + i``, whatever the batching); each channel becomes a
layer with the samples on its leading axis, so the slider pages through them. A checkpoint with invariant channels
(NF-kB given DNA) generates for a condition layer the user picks; its channels come back unchanged beside the samples.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel

from ..core.errors import VirtualStainError
from ._base import TaskWidget, describe_progress
from ._controls import GUIDANCE_TIP, RunChoices, follow_layers, spin_box
from ._layers import iter_add_layers, json_safe, robust_limits, stain_colormap
from ._runner import Job


def synthesis_layer_tuples(result, class_name: str, pixel_size_um: float | None,
                           invariant: tuple[str, ...] = ()) -> list[tuple]:
    """(N, C, H, W) -> one additive layer per channel, (N, H, W), named '<channel> synthetic (<class>)' — or
    '<channel> condition' for an invariant channel, which is the user's own image carried along, not generated;
    an RGB checkpoint (channels R, G, B) gives one RGB layer (N, H, W, 3)."""
    prov = json_safe(result.provenance)
    px = float(pixel_size_um) if pixel_size_um else 1.0
    if [n.upper() for n in result.channel_names] in (["R", "G", "B"], ["R", "G", "B", "A"]):  # an RGB checkpoint
        data = np.moveaxis(result.images, 1, -1)
        return [(data, {
            "name": f"RGB synthetic ({class_name})", "rgb": True, "contrast_limits": robust_limits(data),
            "scale": (1.0, px, px), "axis_labels": ("sample", "y", "x"), "metadata": {**prov, "channel": "RGB"},
        }, "image")]
    out = []
    for c, name in enumerate(result.channel_names):
        data = result.images[:, c]
        label = f"{name} condition (kept)" if name in invariant else f"{name} synthetic ({class_name})"
        out.append((data, {
            "name": label, "colormap": stain_colormap(name, c), "blending": "additive",
            "contrast_limits": robust_limits(data), "scale": (1.0, px, px),
            "axis_labels": ("sample", "y", "x"), "metadata": {**prov, "channel": name},
        }, "image"))
    return out


class SynthesizeWidget(TaskWidget):
    """Generate images of one class (no input layer)."""

    run_text = "Synthesize"
    tasks = ("classcond",)
    needs_input = False
    allow_all_planes = False
    show_tiles = False
    show_sampler = False

    def build_options(self, form: QFormLayout) -> None:
        self.class_name = QComboBox()
        form.addRow("Class", self.class_name)
        self.count = spin_box(1, 1024, 4, "Number of images; image i uses seed seed+i")
        form.addRow("Count", self.count)
        self.size = spin_box(8, 4096, 8, "Edge of each square image (pixels; a multiple of the network's downsampling)")
        form.addRow("Size", self.size)
        self.guidance = spin_box(0.0, 20.0, 1.0, GUIDANCE_TIP, step=0.5)
        form.addRow("Guidance", self.guidance)
        self.condition = QComboBox()
        self.condition.setToolTip("The invariant channel(s) to generate for (e.g. a DNA image): the samples keep them")
        self.condition.currentTextChanged.connect(self._size_from_condition)
        self.condition_label = QLabel("Condition layer")
        form.addRow(self.condition_label, self.condition)
        follow_layers(self, self.viewer, "_on_layers_event")

    def _on_layers_event(self, event) -> None:
        if event.type in ("inserted", "removed", "name"):
            self.refresh_conditions()

    def refresh_conditions(self) -> None:
        """Offer the Image layers with as many channels as the checkpoint's invariant channels."""
        bundle = self.controls.bundle
        needed = bundle.config.input_names if bundle is not None else []
        current = self.condition.currentText()
        self.condition.clear()
        if needed:
            for layer in reversed(self.viewer.layers):
                if type(layer).__name__ == "Image" and "bundle_id" not in layer.metadata and not layer.rgb and (
                        (layer.data.ndim == 2 and len(needed) == 1)
                        or (layer.data.ndim == 3 and layer.data.shape[0] == len(needed))):
                    self.condition.addItem(layer.name)
            if self.condition.findText(current) >= 0:
                self.condition.setCurrentIndex(self.condition.findText(current))
        self.condition.setVisible(bool(needed))
        self.condition_label.setVisible(bool(needed))
        if needed:
            self.condition_label.setText(f"Condition ({', '.join(needed)})")
        self.size.setEnabled(not needed)
        self._size_from_condition()

    def _size_from_condition(self, *_) -> None:
        """With a condition layer the greyed Size box shows the size the samples will have: the layer's."""
        name = self.condition.currentText()
        if self.condition.isVisibleTo(self) and name in self.viewer.layers:
            self.size.setValue(int(max(self.viewer.layers[name].data.shape[-2:])))

    def on_bundle_changed(self, bundle) -> None:
        self.class_name.clear()
        if bundle is None:
            if hasattr(self, "condition"):
                self.refresh_conditions()
            return
        from ..core.model import downsample_factor

        c = bundle.config
        self.class_name.addItems(list(getattr(c, "classes", [])))
        factor = downsample_factor(c.unet)
        self.size.setSingleStep(factor)
        self.size.setMinimum(max(8, factor))
        self.size.setValue(int(c.unet.get("sample_size", c.tile_size)))
        self.refresh_conditions()

    def make_job(self, bundle, s: RunChoices, layer=None) -> Job:
        class_name = self.class_name.currentText()
        if not class_name:
            raise VirtualStainError("Choose a class (the checkpoint lists its classes)")
        n, size, guidance = int(self.count.value()), int(self.size.value()), float(self.guidance.value())
        pixel = bundle.config.pixel_size_um
        condition = None
        if bundle.config.input_channels:
            name = self.condition.currentText()
            if not name or name not in self.viewer.layers:
                raise VirtualStainError(
                    f"{bundle.config.name} generates {', '.join(bundle.config.output_names)} given "
                    f"{', '.join(bundle.config.input_names)}: open a {', '.join(bundle.config.input_names)} image and "
                    "pick it as the condition layer")
            data = self.viewer.layers[name].data
            if data.ndim > (2 if len(bundle.config.input_names) == 1 else 3):
                raise VirtualStainError(f"the condition layer '{name}' has {data.ndim} dimensions; pick a 2D image")
            condition = np.array(data, dtype=np.float32)  # a copy: the user's layer is never touched

        def work(progress, should_cancel):
            from ..core.tasks.classcond import synthesize

            result = synthesize(
                bundle, class_name, n, seed=s.seed, steps=s.steps or 50, guidance=guidance,
                size=None if condition is not None else size, condition=condition,
                channel_axis=0 if condition is not None and condition.ndim == 3 else None,
                settings=s.with_feedback(lambda p: progress(p.fraction, describe_progress(p)), should_cancel),
            )
            return synthesis_layer_tuples(result, class_name, pixel, tuple(bundle.config.invariant_names))

        def done(tuples):
            yield from iter_add_layers(self.viewer, tuples)
            self.viewer.reset_view()  # the samples, not the grid or image the view was zoomed on

        return Job(f"Synthesis of {n} '{class_name}' image{'s' if n > 1 else ''}", work, done)
