"""Virtual stain widget: brightfield layer -> one layer per stain channel + instance labels, overlaid on the input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QFileDialog, QFormLayout, QPushButton, QVBoxLayout, QWidget

from ..core.confidence import object_interval_note
from ..core.errors import VirtualStainError
from ..core.inputs import pixel_size_warning
from ._base import TaskWidget, per_plane
from ._controls import RunChoices, spin_box
from ._layers import InputSelection, LayerTuple, iter_add_layers, stack_planes, stain_layer_tuples
from ._notify import notify_error, notify_info, notify_warning
from ._runner import Job


@dataclass
class StackedStain:
    """StainResults of every selected plane, stacked on the input's leading axes."""

    image: np.ndarray  # (*lead, C, Y, X)
    channel_names: list[str]
    channel_kinds: list[str]
    labels: dict[str, np.ndarray]  # (*lead, Y, X)
    provenance: dict
    objects: dict[str, list[dict]] | None = None  # per labels set: one row per object (confidence on)


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


def predict_selection(bundle, sel: InputSelection, s: RunChoices, progress, should_cancel,
                      samples: int | None = None, labels_from: str | None = None,
                      rescale: bool = False, tta: int | None = None, members: int = 0,
                      interval: float | None = None, objects: bool = True) -> StackedStain:
    """The worker side of a virtual-stain run: the same ``predict_stain`` the CLI calls, once per plane; with
    ``members`` > 1 the CLI's ``--objects`` ensemble (one plane) and a confidence per object."""
    from ..core.tasks.stain import predict_stain

    if members > 1:
        return _predict_with_confidence(bundle, sel, s, progress, should_cancel, labels_from, tta, members,
                                        interval, objects)

    def predict(array, cb):
        return predict_stain(
            bundle, array, channel_axis=sel.channel_axis, seed=s.seed, sampler=s.sampler, steps=s.steps,
            settings=s.with_feedback(cb, should_cancel), input_name=sel.layer_name, samples=samples,
            labels_from=labels_from, pixel_size_um=sel.geometry.pixel_size_um(), rescale=rescale, tta=tta,
        )

    return stack_stain_results(per_plane(sel, predict, progress, should_cancel), sel)


def _predict_with_confidence(bundle, sel, s, progress, should_cancel, labels_from, tta, members,
                             interval=None, objects=True) -> StackedStain:
    from ..core.confidence import add_interval_channels, object_tables, predict_ensemble

    if len(sel.arrays) != 1:
        raise VirtualStainError("Confidence per nucleus is computed for one plane: untick 'every plane', or "
                                "untick 'confidence per nucleus'")

    def one(array, cb):
        ens = predict_ensemble(bundle, array, members, seed=s.seed, labels_from=labels_from, tta=tta,
                               channel_axis=sel.channel_axis, sampler=s.sampler, steps=s.steps,
                               settings=s.with_feedback(cb, should_cancel), input_name=sel.layer_name,
                               pixel_size_um=sel.geometry.pixel_size_um())
        tables = object_tables(bundle, ens, interval) if objects else None
        if interval:  # the CLI's --interval: calibrated low/high channels in the stain's units
            add_interval_channels(bundle, ens, interval)
        return ens.prediction, tables

    (res, tables), = per_plane(sel, one, progress, should_cancel)
    stacked = stack_stain_results([res], sel)
    stacked.objects = tables
    return stacked


class StainWidget(TaskWidget):
    """Predict the virtual stain of the picked brightfield layer (current plane, or every plane)."""

    run_text = "Predict"

    def build_options(self, form: QFormLayout) -> None:
        self.samples = spin_box(1, 16, 1, "Average this many samples (seeds run as one batch): more accurate, less "
                                "textured; 1 = one realistic sample")
        form.addRow("Samples averaged", self.samples)
        self.labels_from = QComboBox()
        self.labels_from.setToolTip("Nuclei from the predicted boundary channels, or by segmenting the predicted "
                                    "stain (Otsu + distance-transform watershed)")
        form.addRow("Nuclei from", self.labels_from)
        self.tta = QComboBox()
        self.tta.addItems(["1", "2", "4", "8"])
        self.tta.setToolTip("Test-time augmentation: average the network over this many flips/quarter turns of "
                            "every tile (1 = off); each one costs a full pass")
        form.addRow("Flips/turns averaged", self.tta)
        self.rescale = QCheckBox("rescale to the checkpoint's pixel size")
        self.rescale.setToolTip("Resample the plane to the pixel size the model was trained at (the layer's scale "
                                "gives the image's), predict, and resample the result back onto the layer's grid")
        form.addRow(self.rescale)
        self.confidence = QCheckBox("confidence per nucleus (4 flipped/turned predictions)")
        self.confidence.setToolTip("Colour each nucleus by how well 4 flipped/turned predictions agree on it (red 0, "
                                   "green 1; the table is the labels layer's features); costs 3 more predictions")
        form.addRow(self.confidence)
        self.interval = QCheckBox("90 % interval of the stain (calibrated checkpoints)")
        self.interval.setToolTip("Adds '<stain> low 90%' / 'high 90%' layers (hidden): the range that held the real "
                                 "stain for 90 % of the calibration pixels (virtualstain calibrate)")
        form.addRow(self.interval)
        self.probabilities = QCheckBox("also add boundary / foreground probabilities")
        self.probabilities.setToolTip("The raw per-pixel probabilities the instance labels are made from")
        form.addRow(self.probabilities)

    def on_bundle_changed(self, bundle) -> None:
        """Defaults the checkpoint was validated with; averaging only where there is something to average."""
        if bundle is None:
            return
        c = bundle.config
        self.samples.setValue(int(c.sampling.get("samples", 1)))
        self.samples.setEnabled(c.objective != "regression")
        self.labels_from.clear()
        self.labels_from.addItems(c.label_routes())
        self.labels_from.setCurrentText(c.sampling.get("labels_from", "boundaries"))
        self.labels_from.setEnabled(len(c.label_routes()) > 1)
        self.tta.setCurrentText(str(c.sampling.get("tta", 1)))
        from ..core.confidence import CALIBRATION_FILE

        calibrated = bool(bundle.path) and (bundle.path / CALIBRATION_FILE).is_file()
        self.interval.setEnabled(calibrated)
        if not calibrated:
            self.interval.setChecked(False)

    def build_extra(self, layout: QVBoxLayout) -> None:
        self.save_button = QPushButton("Save last result… (TIFFs, as the CLI writes them)")
        self.save_button.setToolTip("<input>_virtualstain.tif (all channels, names + provenance) and one labels TIFF "
                                    "per labels set, in a folder you choose")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_clicked)
        layout.addWidget(self.save_button)
        self.compare_button = QPushButton("Compare with the real stain")
        self.compare_button.setToolTip("Real stain magenta, virtual cyan, both additive: white where they agree, "
                                       "cyan = only predicted, magenta = missed; labels as outlines")
        self.compare_button.setEnabled(False)
        self.compare_button.clicked.connect(lambda: self.compare())
        layout.addWidget(self.compare_button)
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QHBoxLayout, QLabel, QSlider

        row = QHBoxLayout()
        self.hide_below = QSlider(Qt.Orientation.Horizontal)
        self.hide_below.setRange(0, 100)
        self.hide_below.setToolTip("Hide the nuclei whose confidence is below this value (0-1)")
        self.hide_below.valueChanged.connect(self._recolour)
        self.hide_label = QLabel("hide below 0.00")
        self.next_doubtful = QPushButton("Next doubtful nucleus")
        self.next_doubtful.setToolTip("Centre the view on the least confident nuclei, one after another")
        self.next_doubtful.clicked.connect(self.step_doubtful)
        row.addWidget(self.hide_label)
        row.addWidget(self.hide_below)
        row.addWidget(self.next_doubtful)
        self.confidence_row = QWidget()
        self.confidence_row.setLayout(row)
        self.confidence_row.setVisible(False)
        layout.addWidget(self.confidence_row)
        self._confident: list = []  # (labels layer, rows) of the last run with confidence
        self._doubt_index = -1
        self.last: StackedStain | None = None
        self._last_pixel_size: float | None = None

    def make_job(self, bundle, settings: RunChoices, layer) -> Job:
        sel = self.select_input(bundle, settings, layer)
        rescale = self.rescale.isChecked()
        warning = None if rescale else pixel_size_warning(bundle.config.pixel_size_um, sel.geometry.pixel_size_um(),
                                                          bundle.config.name)
        if warning:
            notify_warning(f"'{sel.layer_name}': {warning}")
        probabilities = self.probabilities.isChecked()
        samples = int(self.samples.value()) if bundle.config.objective != "regression" else None
        labels_from = self.labels_from.currentText() or None
        tta = int(self.tta.currentText())
        interval = 0.9 if self.interval.isChecked() else None
        members = 4 if self.confidence.isChecked() or interval else 0
        if interval and self.confidence.isChecked() and (note := object_interval_note(bundle)):
            notify_warning(note)

        def work(progress, should_cancel) -> tuple[StackedStain, list[LayerTuple]]:
            stacked = predict_selection(bundle, sel, settings, progress, should_cancel, samples, labels_from,
                                        rescale, tta, members, interval, self.confidence.isChecked())
            return stacked, stain_layer_tuples(
                stacked.image, stacked.channel_names, stacked.channel_kinds, stacked.labels, stacked.provenance,
                sel.geometry, probabilities=probabilities, objects=stacked.objects,
            )

        def done(payload):
            stacked, tuples = payload
            added = []
            yield from iter_add_layers(self.viewer, tuples, into=added)
            if stacked.objects:
                self._confident = [(la, stacked.objects[la.metadata["channel"]]) for la in added
                                   if la.metadata.get("kind") == "labels" and la.metadata.get("channel")
                                   in stacked.objects]
                self._doubt_index = -1
                self.confidence_row.setVisible(True)
                self._recolour()
            self.last, self._last_pixel_size = stacked, bundle.config.pixel_size_um
            self.save_button.setEnabled(True)
            self._virtual = [la for la in added if la.metadata.get("kind") == "stain"]
            self.compare_button.setEnabled(bool(self._virtual))
            self.warn_if_input_gone(sel)

        return Job(f"Virtual stain of '{sel.layer_name}'", work, done, {"selection": sel})

    def compare(self) -> bool:
        """Overlay the first virtual stain of the last run on its real counterpart (``_layers.compare_with_real``)."""
        from ._layers import compare_with_real, find_real_layer

        virtual = [la for la in getattr(self, "_virtual", []) if la in self.viewer.layers]
        if not virtual:
            notify_error("Predict first: there is no virtual stain to compare")
            return False
        stain = virtual[0].metadata.get("channel", "")
        real = find_real_layer(self.viewer, stain, exclude=virtual)
        if real is None:
            notify_error(f"No real {stain} layer: open the measured stain as an Image layer with '{stain}' in its "
                         f"name (e.g. '{stain} (real)'; File > Open Sample > Virtual Staining has one)")
            return False
        compare_with_real(self.viewer, virtual[0], real)
        notify_info(f"'{real.name}' magenta, '{virtual[0].name}' cyan: white = agree, cyan = only predicted, "
                    "magenta = missed")
        return True

    def _recolour(self, *_) -> None:
        """Apply 'hide below' to the labels layers of the last confidence run (the labels themselves stay)."""
        from ._layers import confidence_colormap

        value = self.hide_below.value() / 100
        self.hide_label.setText(f"hide below {value:.2f}")
        for layer, rows in self._confident:
            if layer in self.viewer.layers:
                layer.colormap = confidence_colormap(rows, value)

    def doubtful(self) -> list[tuple[object, dict]]:
        """(layer, row) of the first labels set's objects, least confident first."""
        if not self._confident:
            return []
        layer, rows = self._confident[0]
        return [(layer, r) for r in sorted(rows, key=lambda r: r["confidence"])]

    def step_doubtful(self) -> dict | None:
        """Centre the camera on the next least confident nucleus; returns its row."""
        todo = self.doubtful()
        if not todo:
            return None
        self._doubt_index = (self._doubt_index + 1) % len(todo)
        layer, row = todo[self._doubt_index]
        y, x = row["centroid_y"], row["centroid_x"]
        world = np.asarray(layer.data_to_world([*([0] * (layer.ndim - 2)), y, x]))
        from .review import camera_of

        camera = camera_of(self.viewer)
        camera.center = tuple(world[-2:])
        camera.zoom = max(camera.zoom, 4.0)
        self.status.setText(f"nucleus {row['label']}: confidence {row['confidence']:.2f} "
                            f"({self._doubt_index + 1} of {len(todo)}, least confident first)")
        return row

    def save_results(self, folder: str | Path) -> list[Path]:
        """Write the last run like ``virtualstain predict`` does: one multi-channel TIFF + one TIFF per labels set."""
        from ..core.io import output_name, write_channels, write_labels

        r = self.last
        if r is None:
            raise VirtualStainError("Nothing to save yet: run Predict first")
        folder = Path(folder)
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(r.provenance.get("input") or "image"))
        n_lead = r.image.ndim - 3
        planes = int(np.prod(r.image.shape[:n_lead])) if n_lead else 1
        image = r.image.reshape(planes, *r.image.shape[n_lead:]) if planes > 1 else r.image.reshape(r.image.shape[-3:])
        written = [write_channels(folder / output_name("stain", stem), image, r.channel_names, r.provenance,
                                  self._last_pixel_size)]
        for name, lab in r.labels.items():
            lab = lab.reshape(planes, *lab.shape[-2:]) if planes > 1 else lab.reshape(lab.shape[-2:])
            written.append(write_labels(folder / output_name("labels", stem, name), lab,
                                        {**r.provenance, "labels": name}))
        return written

    def _save_clicked(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the virtual stain into folder")
        if not folder:
            return
        try:
            written = self.save_results(folder)
        except (VirtualStainError, OSError) as exc:
            notify_error(str(exc))
            return
        notify_info(f"Wrote {', '.join(p.name for p in written)} to {folder}")
