"""Train widget: the layers a biologist already has open (a brightfield and its real stain / nuclei labels) -> a
checkpoint folder, trained in the background with live curves, listed at once in the other widgets.

The same core as ``virtualstain train``: ``train.arrays.spec_from_arrays`` turns the layers into a TrainingSpec, and
``train.recipe.train_recommended`` (or the one-pass ``train.loop.train``) trains it. No layer is modified; the
validation region is drawn as a new Shapes layer so it is visible.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.bundle import bundled_checkpoints
from ..core.errors import Cancelled, VirtualStainError
from ._base import PROGRESS_MAX, BackgroundRun, scroll_frame
from ._controls import follow_layers, remember_checkpoint, spin_box, task_of
from ._notify import notify_error, notify_info
from ._plot import CurvePlot
from ._runner import Job

STRIP = "right-hand 15 % strip"
SCRATCH = "scratch (new network)"
BROWSE = "Choose folder…"
METHODS = {"recommended (mean network + refinement)": "recommended", "one pass (fastest)": "regression"}


def layer_targets(viewer, input_name: str) -> list[tuple[str, str]]:
    """(layer name, 'stain' | 'labels') for every layer that could be a target of ``input_name``."""
    import napari

    out = []
    for layer in viewer.layers:
        if layer.name == input_name:
            continue
        if isinstance(layer, napari.layers.Labels):
            out.append((layer.name, "labels"))
        elif isinstance(layer, napari.layers.Image) and not layer.rgb:
            out.append((layer.name, "stain"))
    return out


def box_in_layer(shapes_layer, image_layer) -> tuple[int, int, int, int]:
    """The first shape's bounding box (y0, y1, x0, x1) in the image layer's pixels (world coordinates between)."""
    if not len(shapes_layer.data):
        raise VirtualStainError(f"'{shapes_layer.name}' holds no shape: draw a rectangle over the validation region")
    pts = np.asarray(shapes_layer.data[0])[:, -2:]
    world = pts * np.asarray(shapes_layer.scale)[-2:] + np.asarray(shapes_layer.translate)[-2:]
    pix = (world - np.asarray(image_layer.translate)[-2:]) / np.asarray(image_layer.scale)[-2:]
    (y0, x0), (y1, x1) = pix.min(axis=0), pix.max(axis=0)
    return int(np.floor(y0)), int(np.ceil(y1)), int(np.floor(x0)), int(np.ceil(x1))


class TrainWidget(BackgroundRun, QWidget):
    """Pick the input and target layers, a validation region, a start and a budget; Train runs in the background."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        inner = QWidget()
        form = QFormLayout()
        self.input = QComboBox()
        self.input.setToolTip("The label-free image the model will read (brightfield, phase...): one field or a stack")
        form.addRow("Input layer", self.input)
        self.targets = QListWidget()
        self.targets.setToolTip("Tick what the model should learn: Image layers = stains, Labels layers = nuclei/cells")
        self.targets.setMaximumHeight(90)
        form.addRow("Targets", self.targets)
        self.validation = QComboBox()
        self.validation.setToolTip("Pixels held out to validate on: the right-hand strip, or the first rectangle of a "
                                   "Shapes layer you draw")
        form.addRow("Validation", self.validation)
        self.start_from = QComboBox()
        self.start_from.setToolTip("Scratch, or fine-tune a checkpoint (its architecture and, if they match, outputs)")
        form.addRow("Start from", self.start_from)
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        form.addRow("Method", self.method)
        self.steps = spin_box(10, 1_000_000, 2000, "Optimiser steps (the recommended method adds half as many for "
                              "the refinement)", step=100)
        form.addRow("Steps", self.steps)
        self.networks = spin_box(1, 8, 1, "Train the network this many times under different seeds and predict with "
                                 "their mean (a deep ensemble): more accurate, N times the training time and the "
                                 "network passes (docs/training.md)")
        form.addRow("Networks", self.networks)
        out_row = QHBoxLayout()
        self.output = QLineEdit(str(Path.home() / "virtualstain-models" / "my-model"))
        self.output.setToolTip("The checkpoint folder to write (config.json + safetensors); resume reads it")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_output)
        out_row.addWidget(self.output)
        out_row.addWidget(browse)
        form.addRow("Save to", out_row)
        self.resume = QCheckBox("resume the run saved in that folder")
        form.addRow(self.resume)
        self.run_button, self.cancel_button = QPushButton("Train"), QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop after the current step; the last validated checkpoint is kept")
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, PROGRESS_MAX)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setStyleSheet("font-size: 11px;")
        self.loss_plot, self.val_plot = CurvePlot("training loss"), CurvePlot("validation")
        layout = QVBoxLayout(inner)
        layout.addLayout(form)
        layout.addLayout(buttons)
        for w in (self.progress_bar, self.status, self.loss_plot, self.val_plot):
            layout.addWidget(w)
        layout.addStretch(1)
        scroll_frame(self, inner)

        self.wire_runner()
        self.input.currentTextChanged.connect(lambda _: self._fill_targets())
        self.start_from.activated.connect(self._on_start_from)
        self._curves: dict[str, list] = {}
        self._lock = threading.Lock()
        self._timer = QTimer(self)
        self._timer.setInterval(300)
        self._timer.timeout.connect(self._refresh_plots)
        self.last_output: Path | None = None
        self._fill_start_from()
        follow_layers(self, napari_viewer, "refresh_layers")
        self.refresh_layers()

    # -- layers --------------------------------------------------------------------------------------------------
    def refresh_layers(self, *_) -> None:
        import napari

        current = self.input.currentText()
        self.input.blockSignals(True)
        self.input.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, napari.layers.Image) and not layer.rgb:
                self.input.addItem(layer.name)
        if current and self.input.findText(current) >= 0:
            self.input.setCurrentText(current)
        self.input.blockSignals(False)
        self._fill_targets()
        val = self.validation.currentText()
        self.validation.clear()
        self.validation.addItem(STRIP)
        self.validation.addItems([la.name for la in self.viewer.layers if isinstance(la, napari.layers.Shapes)
                                  and not la.name.startswith("validation strip")])
        if val and self.validation.findText(val) >= 0:
            self.validation.setCurrentText(val)

    def _fill_targets(self) -> None:
        ticked = {self.targets.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.targets.count())
                  if self.targets.item(i).checkState() == Qt.CheckState.Checked}
        self.targets.clear()
        for name, kind in layer_targets(self.viewer, self.input.currentText()):
            item = QListWidgetItem(f"{name}  ({kind})")
            item.setData(Qt.ItemDataRole.UserRole, name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if name in ticked else Qt.CheckState.Unchecked)
            self.targets.addItem(item)

    def set_targets(self, names: list[str]) -> None:
        for i in range(self.targets.count()):
            item = self.targets.item(i)
            on = item.data(Qt.ItemDataRole.UserRole) in names
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def _fill_start_from(self) -> None:
        self.start_from.clear()
        self.start_from.addItem(SCRATCH, None)
        for name, folder in bundled_checkpoints().items():
            if task_of(folder) == "stain":
                self.start_from.addItem(name, str(folder))
        self.start_from.addItem(BROWSE, BROWSE)

    def _on_start_from(self, index: int) -> None:
        if self.start_from.itemData(index) != BROWSE:
            return
        folder = QFileDialog.getExistingDirectory(self, "Checkpoint to fine-tune")
        if not folder:
            self.start_from.setCurrentIndex(0)
            return
        self.start_from.insertItem(self.start_from.count() - 1, Path(folder).name, folder)
        self.start_from.setCurrentIndex(self.start_from.count() - 2)

    def _browse_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder to save the checkpoint in")
        if folder:
            self.output.setText(str(Path(folder) / "my-model"))

    # -- the run -------------------------------------------------------------------------------------------------
    def _spec(self):
        """The TrainingSpec of the picked layers (copies: training never reads a layer again)."""
        from ..train.arrays import spec_from_arrays

        if not self.input.currentText():
            raise VirtualStainError("No input layer: open the label-free image (e.g. brightfield) as an Image layer")
        layer = self.viewer.layers[self.input.currentText()]
        names = [self.targets.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.targets.count())
                 if self.targets.item(i).checkState() == Qt.CheckState.Checked]
        kinds = dict(layer_targets(self.viewer, layer.name))
        stains = {n: np.array(self.viewer.layers[n].data) for n in names if kinds.get(n) == "stain"}
        labels = {n: np.array(self.viewer.layers[n].data) for n in names if kinds.get(n) == "labels"}
        box = None
        if self.validation.currentText() != STRIP:
            box = box_in_layer(self.viewer.layers[self.validation.currentText()], layer)
        scale = float(np.asarray(layer.scale)[-1])
        return spec_from_arrays(Path(self.output.text()).name or "my-model", np.array(layer.data), [layer.name],
                                stains, labels, val_box=box, pixel_size_um=scale if scale != 1.0 else None,
                                source=f"napari layers: input {layer.name!r}; targets {', '.join(names)}"), layer

    def _show_strip(self, layer, spec) -> None:
        """Draw the held-out strip on the canvas (a new Shapes layer over the input; nothing else changes)."""
        h, w = spec.images[0].inputs.shape[-2:]
        cut = int(round(w * (1 - spec.val_fraction)))
        name = f"validation strip ({layer.name})"
        if name in self.viewer.layers:
            return
        self.viewer.add_shapes([np.array([[0, cut], [0, w], [h, w], [h, cut]], float)], shape_type="rectangle",
                               edge_color="yellow", face_color="transparent", edge_width=2, name=name,
                               scale=np.asarray(layer.scale)[-2:], translate=np.asarray(layer.translate)[-2:])

    def run(self) -> bool:
        return self.start_job(self._job)

    def _job(self) -> Job:
        from ..core.bundle import load_bundle
        from ..train.loop import TrainOptions
        from ..train.process import train_in_process
        from ..train.recipe import refinement_steps

        spec, layer = self._spec()
        out = Path(self.output.text()).expanduser()
        resume = self.resume.isChecked()
        if (out / "config.json").exists() and not resume:
            raise VirtualStainError(f"{out} already holds a checkpoint; tick 'resume' to continue it, or choose "
                                    "another folder under 'Save to'")
        if self.validation.currentText() == STRIP:
            self._show_strip(layer, spec)
        method = METHODS[self.method.currentText()]
        steps = int(self.steps.value())
        init = self.start_from.currentData()
        networks = int(self.networks.value())
        opts = TrainOptions(objective="regression", steps=steps, val_every=max(1, steps // 20), init=init,
                            networks=networks, command=f"napari Train widget: {spec.source}")
        first = networks * steps  # the networks' steps, counted on across them (train/ensemble.py)
        total = first + (refinement_steps(steps) if method == "recommended" else 0)
        with self._lock:
            self._curves = {}
        self.loss_plot.clear()
        self.val_plot.clear()
        self._timer.start()
        curves, lock = self._curves, self._lock

        def work(progress, should_cancel):
            def on_step(stage, step, loss):
                if should_cancel():
                    raise Cancelled()
                done = step + (first if stage == 2 else 0)  # the bar adds the time left (BackgroundRun)
                if stage == 2:
                    label = f"refinement step {step}"
                elif networks > 1:
                    label = f"network {(step - 1) // steps + 1}/{networks} step {(step - 1) % steps + 1}"
                else:
                    label = f"network step {step}"
                progress(done / total, label)
                with lock:
                    curves.setdefault(f"loss {stage}", []).append((done, loss))

            def on_validate(stage, record):
                with lock:
                    for ch, m in (record.get("val") or {}).items():
                        if ch in spec.stain_names or ch.endswith("foreground"):
                            curves.setdefault(f"r {ch}", []).append((record["step"] + (first if stage == 2 else 0),
                                                                     m["pearson"]))

            # in a child process: target prep, saving and choosing defaults hold the interpreter lock in C calls,
            # which froze the viewer for 150-600 ms per run when training ran in this thread (train/process.py)
            progress(0.0, "starting the training process")  # its imports take a few seconds before step 1
            path = train_in_process(spec, out, opts, method=method, resume=resume, on_step=on_step,
                                    on_validate=on_validate, should_cancel=should_cancel)
            return load_bundle(path)

        def done(bundle):
            self.last_output = Path(bundle.path)
            remember_checkpoint(bundle.path)
            notify_info(f"Trained '{bundle.config.name}' [{bundle.id[:12]}] into {bundle.path}; it is listed under "
                        "Checkpoint in the other widgets")

        self.last_output = out
        return Job(f"Training '{out.name}'", work, done, {"output": out})

    def _refresh_plots(self) -> None:
        with self._lock:
            curves = {k: list(v) for k, v in self._curves.items()}
        self.loss_plot.set_series({k: v for k, v in curves.items() if k.startswith("loss")})
        self.val_plot.set_series({k: v for k, v in curves.items() if k.startswith("r ")})

    def _on_finished(self, outcome: str, payload) -> None:
        self._timer.stop()
        self._refresh_plots()
        self._set_running(False)
        self.progress_bar.setFormat("%p%")
        out = self.last_output
        if outcome == "done":
            self.progress_bar.setValue(PROGRESS_MAX)
            self.status.setText(f"Done: {out}")
        elif outcome == "cancelled":
            kept = out is not None and (out / "config.json").is_file()
            if kept:
                remember_checkpoint(out)
            text = (f"Cancelled; the last validated checkpoint is kept in {out} (tick 'resume' to continue)" if kept
                    else "Cancelled before the first validated checkpoint; no checkpoint was written")
            self.status.setText(text)
            notify_info(text)
        else:
            self.status.setText(f"Error: {payload}")
            notify_error(str(payload) if outcome == "user_error" else
                         f"Unexpected error ({type(payload).__name__}: {payload}); the traceback is in the terminal")
