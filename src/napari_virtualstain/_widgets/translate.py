"""Translate widget: show an image as it would look under another condition, with its reconstruction control.

``core.tasks.classcond.translate`` inverts the image under its source class and regenerates it under the target
class; the same latent regenerated under the source class is the control, so ``difference = translated - control``
is the class effect rather than inversion error. Difference layers use a diverging colormap centred on 0.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QComboBox, QFormLayout, QPushButton, QVBoxLayout

from ..core.errors import VirtualStainError
from ._base import TaskWidget, describe_progress
from ._controls import GUIDANCE_TIP, RunChoices, spin_box
from ._layers import (
    DIVERGING,
    InputSelection,
    iter_add_layers,
    json_safe,
    robust_limits,
    stain_colormap,
    symmetric_limits,
)
from ._notify import notify_warning
from ._runner import Job


def class_of_layer(layer, classes: list[str]) -> str | None:
    """The class a layer says it is: its metadata (a translated layer is its target class, a control its source class,
    a synthesized one its class), else exactly one class name appearing as a word of its name ('A12_nfkb', 'A01 well')."""
    import re

    meta = getattr(layer, "metadata", {}) or {}
    role_key = {"translated": "target_class", "control": "source_class"}.get(meta.get("role"))
    for key in (role_key, "class"):
        if key and meta.get(key) in classes:
            return meta[key]
    words = set(re.split(r"[^0-9A-Za-z]+", getattr(layer, "name", "")))
    hits = [c for c in classes if c in words]
    return hits[0] if len(hits) == 1 else None


def translation_layer_tuples(result, sel: InputSelection, source: str, target: str) -> list[tuple]:
    """Per channel: translated and control on the original's contrast (comparable), difference centred on 0.

    An RGB input (RGB checkpoint) gives RGB translated/control layers, like the original, and a difference per colour.
    """
    prov = json_safe({**result.provenance, **sel.plane_note, "input": sel.layer_name})
    lead = sel.lead_shape
    geo = sel.geometry.kwargs()
    out = []
    original = sel.arrays[0]
    original = np.moveaxis(original, -1, 0) if sel.rgb else original if sel.channel_axis is not None else original[None]
    pairs = (("translated", result.translated, f"{source}→{target} (translated)"),
             ("control", result.control, f"{source}→{source} (control)"))
    if sel.rgb:
        for role, data, suffix in pairs:
            rgb = np.moveaxis(data, 0, -1)
            out.append((rgb.reshape(*lead, *rgb.shape), {
                "name": f"RGB {suffix}", "rgb": True, "contrast_limits": sel.contrast_limits,
                "visible": role == "translated", "metadata": {**prov, "channel": "RGB", "role": role}, **geo,
            }, "image"))
    for c, name in enumerate(result.channel_names):
        if not sel.rgb:
            limits = robust_limits(original[c])
            cmap = sel.colormap if len(result.channel_names) == 1 and sel.colormap else stain_colormap(name, c)
            for role, data, suffix in pairs:
                # the first channel is opaque so the composite replaces (not adds to) the original underneath
                out.append((data[c].reshape(*lead, *data[c].shape), {
                    "name": f"{name} {suffix}", "colormap": cmap, "contrast_limits": limits,
                    "blending": "opaque" if c == 0 else "additive",
                    "visible": role == "translated", "metadata": {**prov, "channel": name, "role": role}, **geo,
                }, "image"))
        diff = result.difference[c]
        out.append((diff.reshape(*lead, *diff.shape), {
            # the legend is in the name: PiYG is green above 0 (more in the translation), pink below
            "name": f"{name} difference ({target} − {source}; green = more in {target})", "colormap": DIVERGING,
            "contrast_limits": symmetric_limits(diff), "blending": "translucent", "visible": False,
            "metadata": {**prov, "channel": name, "role": "difference"}, **geo,
        }, "image"))
    return out


class TranslateWidget(TaskWidget):
    """Translate the picked layer from its class to another with a class-conditional checkpoint."""

    run_text = "Translate"
    tasks = ("classcond",)
    allow_all_planes = False
    show_sampler = False

    def build_options(self, form: QFormLayout) -> None:
        self.source = QComboBox()
        self.source.setToolTip("The condition the image was taken in")
        self.target = QComboBox()
        self.target.setToolTip("The condition to translate it to")
        form.addRow("Source class", self.source)
        form.addRow("Target class", self.target)
        self.guidance = spin_box(0.0, 20.0, 1.0, GUIDANCE_TIP, step=0.5)
        form.addRow("Guidance", self.guidance)
        self.strength = spin_box(0.05, 1.0, 1.0, "How far to invert (fraction of the schedule): lower keeps more of "
                                 "the layout", step=0.05)
        form.addRow("Strength", self.strength)

    def build_extra(self, layout: QVBoxLayout) -> None:
        self.side_by_side = QPushButton("Side by side: original | translated | control | difference")
        self.side_by_side.setCheckable(True)
        self.side_by_side.setEnabled(False)
        self.side_by_side.toggled.connect(self.show_side_by_side)
        layout.addWidget(self.side_by_side)
        self._last: list[str] = []
        self._visibility: dict[str, bool] = {}

    def on_bundle_changed(self, bundle) -> None:
        classes = list(getattr(bundle.config, "classes", [])) if bundle is not None else []
        if bundle is not None:  # the checkpoint's validated translation settings (else plain sampling, full inversion)
            self.guidance.setValue(float(bundle.config.sampling.get("guidance", 1.0)))
            self.strength.setValue(float(bundle.config.sampling.get("strength", 1.0)))
        for combo in (self.source, self.target):
            combo.clear()
            combo.addItems(classes)
        if len(classes) > 1:
            self.target.setCurrentIndex(1)
        if not getattr(self, "_following", False):  # the source follows the picked layer
            self._following = True
            self.controls.layer.currentTextChanged.connect(lambda _: self.follow_layer())
        self.follow_layer()

    def follow_layer(self, layer=None) -> str | None:
        """Source = the class the layer says it is (metadata, or a class name in its layer name); target = another."""
        layer = layer if layer is not None else self.controls.input_layer()
        classes = [self.source.itemText(i) for i in range(self.source.count())]
        found = class_of_layer(layer, classes) if layer is not None else None
        if found is not None:
            self.source.setCurrentText(found)
            if self.target.currentText() == found:
                self.target.setCurrentText(next(c for c in classes if c != found))
        return found

    def make_job(self, bundle, s: RunChoices, layer) -> Job:
        source, target = self.source.currentText(), self.target.currentText()
        if not source or not target:
            raise VirtualStainError("Choose a source and a target class (the checkpoint lists its classes)")
        if source == target:
            raise VirtualStainError(f"Source and target are both {source}: choose the class to translate to (every "
                                    "translation already adds the same-class reconstruction control)")
        picked = layer if layer is not None else self.controls.input_layer()
        said = class_of_layer(picked, list(bundle.config.classes)) if picked is not None else None
        if said is not None and said != source:
            raise VirtualStainError(f"'{picked.name}' says it is {said} (its name or metadata) but the source class is "
                                    f"{source}: set the source to the condition the image was taken in")
        sel = self.select_input(bundle, s, layer)
        guidance, strength = float(self.guidance.value()), float(self.strength.value())

        def work(progress, should_cancel):
            from ..core.tasks.classcond import translate

            result = translate(
                bundle, sel.arrays[0], source, target, steps=s.steps or 50, guidance=guidance, strength=strength,
                channel_axis=sel.channel_axis, input_name=sel.layer_name,
                settings=s.with_feedback(lambda p: progress(p.fraction, describe_progress(p)), should_cancel),
            )
            return translation_layer_tuples(result, sel, source, target)

        def done(tuples):
            added = []
            yield from iter_add_layers(self.viewer, tuples, into=added)
            names = [layer.name for layer in added]
            translated = next(n for n in names if n.endswith("(translated)"))
            control = next(n for n in names if n.endswith("(control)"))
            difference = next(n for n in names if " difference (" in n)
            # original | translated | control | first difference
            self._last = [sel.layer_name, translated, control, difference]
            self.side_by_side.setEnabled(True)
            self.warn_if_input_gone(sel)

        return Job(f"Translation of '{sel.layer_name}' ({source} → {target})", work, done, {"selection": sel})

    def show_side_by_side(self, on: bool = True) -> None:
        """Grid view of original | translated | control | difference (the last run's first channel; translated and
        control share their contrast limits); toggling back restores the layers' visibility."""
        viewer = self.viewer
        grid = _grid(viewer)
        if not on:
            grid.enabled = False
            for name, visible in self._visibility.items():
                if name in viewer.layers:
                    viewer.layers[name].visible = visible
            self._visibility = {}
            return
        present = [n for n in self._last if n in viewer.layers]
        if len(present) < 2:
            notify_warning("Run a translation first (the side-by-side view shows its layers)")
            self.side_by_side.blockSignals(True)
            self.side_by_side.setChecked(False)
            self.side_by_side.blockSignals(False)
            return
        self._visibility = {la.name: la.visible for la in viewer.layers}
        for layer in viewer.layers:
            layer.visible = layer.name in present
        # napari fills grid cells from the top of the layer list: put them there, original first
        for name in present:
            viewer.layers.move(viewer.layers.index(name), len(viewer.layers))
        grid.shape = (1, len(present))
        grid.stride = 1
        grid.enabled = True
        viewer.reset_view()


def _grid(viewer):
    """napari >= 0.9 keeps the grid on ``viewer.canvas``; older versions on the viewer."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid
