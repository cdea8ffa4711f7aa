"""The controls every widget shares (one class, configured per widget, never copied).

Checkpoint (bundled demos by name + any folder), what it is (task, objective, channels, classes, training data),
input layer (only Image layers that fit the checkpoint, with a note on the ones hidden and why), device (what is
available here), steps (editable only where the scheduler allows), seed, tiles, batch size.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QStandardItemModel
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.bundle import Bundle, bundled_checkpoints, load_bundle, resolve_bundle_path
from ..core.errors import VirtualStainError
from ..core.settings import RunSettings
from ._layers import why_not_fit
from ._notify import notify_error

MAX_SEED = 2**31 - 1
DEFAULT_CHECKPOINT = "demo-stain"  # fits the sample data (File > Open Sample)
_BROWSE = "__browse__"

_cache: dict[tuple[str, float], Bundle] = {}
# bundles written in this session (the Train widget): every ModelControls lists them beside the bundled demos
_USER_CHECKPOINTS: list[str] = []
_LISTENERS: "weakref.WeakSet[ModelControls]" = weakref.WeakSet()


def remember_checkpoint(folder: str | Path) -> None:
    """Offer a freshly written bundle in every widget's checkpoint list at once (and in widgets opened later)."""
    folder = str(Path(folder).resolve())
    if folder not in _USER_CHECKPOINTS:
        _USER_CHECKPOINTS.append(folder)
    for controls in list(_LISTENERS):
        controls.offer_checkpoint(folder)


def get_bundle(name_or_path: str | Path) -> Bundle:
    """Load a checkpoint once per (folder, weights mtime): the stain and uncertainty widgets share the weights."""
    path = resolve_bundle_path(name_or_path).resolve()
    weights = path / "model.safetensors"
    key = (str(path), weights.stat().st_mtime if weights.is_file() else 0.0)
    if key not in _cache:
        _cache[key] = load_bundle(path)
    return _cache[key]


def task_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class Sampling:
    """What a checkpoint lets the user choose: samplers (first = default), steps per sampler, whether editable."""

    samplers: tuple[str, ...]
    steps: dict
    max_steps: int
    editable: bool
    min_steps: int = 1  # 0: a mean-anchored residual-shift checkpoint's mean network alone


def sampling_options(bundle: Bundle, fast_default: bool = True) -> Sampling:
    """Residual shift: 1 to its trained chain, or 0 (the mean network alone) for a mean-anchored one (default: the
    checkpoint's validated count; the whole chain, from 1 step, with ``fast_default=False``, as step maps need);
    regression: one pass; DDPM: DDIM (50 steps) or DDPM (every step)."""
    objective = bundle.config.objective
    if objective == "regression":
        return Sampling(("one pass",), {"one pass": 1}, 1, False)
    if objective == "residual_shift":
        n = int((bundle.config.scheduler or {}).get("num_train_timesteps", 15))
        default = int(bundle.config.sampling.get("steps", n)) if fast_default else n
        return Sampling(("residual_shift",), {"residual_shift": default}, n, True,
                        0 if fast_default and bundle.config.takes_zero_steps else 1)
    from ..core.schedulers import DEFAULT_DDIM_STEPS, DIFFUSION_SAMPLERS

    total = int((bundle.config.scheduler or {}).get("num_train_timesteps", 1000))
    steps = {name: (total if name == "ddpm" else min(DEFAULT_DDIM_STEPS, total)) for name in DIFFUSION_SAMPLERS}
    return Sampling(tuple(DIFFUSION_SAMPLERS), steps, total, True)


def image_channels(config) -> list[str]:
    """The channels an input layer must have: the inputs of a stain model, the image channels of a classcond one
    (variable and invariant, in the images' order)."""
    if config.task == "classcond":
        return list(config.image_names)
    return list(config.input_names) if config.input_channels else list(config.output_names)


def describe_bundle(bundle: Bundle) -> str:
    """Compact rich-text card: what the checkpoint does, on which channels, trained on what (full text: tooltip)."""
    from html import escape

    c = bundle.config
    stains = [o.name for o in c.output_channels if o.kind == "stain"]
    label_sets = [o.labels or o.name for o in c.output_channels if o.kind == "boundary"]
    out = ", ".join(stains) + (f"; labels: {', '.join(label_sets)}" if label_sets else "")
    if c.task == "classcond":
        out = ", ".join(c.output_names)
    lines = [f"<b>{escape(c.name)}</b> · {escape(c.task)} · {escape(c.objective)} · id {bundle.short_id}"]
    if c.input_channels:
        ins = c.input_names
        lines.append(f"in: {escape(', '.join(ins) if len(ins) <= 3 else f'{len(ins)} channels ({ins[0]} … {ins[-1]})')}")
    lines.append(f"{'channels' if c.task == 'classcond' else 'out'}: {escape(out)}")
    classes = getattr(c, "classes", None)
    if classes:
        lines.append(f"classes: {escape(', '.join(classes))}")
    data = str(c.training.get("data", "unknown"))
    lines.append(f"trained on: {escape(data if len(data) <= 90 else data[:88] + '…')}")
    return "<br>".join(lines)


@dataclass
class RunChoices:
    """What the controls chose for one run: the core's run settings (progress and Cancel added by the worker,
    :meth:`with_feedback`) and the choices of what to compute that every task shares."""

    run: RunSettings
    seed: int
    sampler: str | None  # None: the checkpoint's only one
    steps: int | None  # None: the checkpoint's own (fixed) number
    all_planes: bool

    def with_feedback(self, progress, should_cancel) -> RunSettings:
        return self.run.replace(progress=progress, should_cancel=should_cancel)


GUIDANCE_TIP = "Classifier-free guidance scale (1 = plain conditional sampling)"


def spin_box(lo: float, hi: float, value: float, tip: str, step: float = 1) -> QSpinBox | QDoubleSpinBox:
    """A spin box with its range, value, step and tooltip; a QDoubleSpinBox when any of them is a float."""
    floats = any(isinstance(v, float) for v in (lo, hi, value, step))
    s = QDoubleSpinBox() if floats else QSpinBox()
    s.setRange(lo, hi)
    s.setSingleStep(step)
    s.setValue(value)
    s.setToolTip(tip)
    return s


def follow_layers(widget, viewer, method: str) -> None:
    """Call ``widget.<method>(event)`` on every layer-list event, through a callback that holds the widget weakly and
    unhooks itself once the widget is gone (no ``destroyed`` handler: PyQt may crash running Python while the GC
    deletes a widget)."""
    from ._runner import _is_deleted

    ref = weakref.ref(widget)
    events = viewer.layers.events

    def on_event(event):
        w = ref()
        if w is None or _is_deleted(w):
            events.disconnect(on_event)
            return
        getattr(w, method)(event)

    events.connect(on_event)


class ModelControls(QWidget):
    """Checkpoint, input layer and run options; emits ``bundle_changed(bundle or None)``.

    ``tasks`` filters the bundled demos (and refuses a folder of another task); ``needs_input=False`` hides the
    layer picker (synthesis); ``allow_all_planes`` shows the "every plane" box; ``show_sampler=False`` for tasks that
    fix their sampler (translation and synthesis use DDIM).
    """

    bundle_changed = Signal(object)

    def __init__(self, viewer, *, tasks=("stain",), needs_input: bool = True, allow_all_planes: bool = True,
                 show_tiles: bool = True, show_sampler: bool = True, fast_steps: bool = True,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.tasks = tuple(tasks)
        self.needs_input = needs_input
        self.bundle: Bundle | None = None

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)

        def new_form() -> QFormLayout:
            # wrapped labels sit between forms, not in them: QFormLayout under-sizes word-wrapped rows
            f = QFormLayout()
            f.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
            outer.addLayout(f)
            return f

        form = new_form()
        self.checkpoint = QComboBox()
        self.checkpoint.setToolTip("Bundled demo checkpoints, or 'Choose folder…' for your own (config.json + model.safetensors)")
        self.checkpoint.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        form.addRow("Checkpoint", self.checkpoint)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.summary.setStyleSheet("font-size: 11px;")
        outer.addWidget(self.summary)

        self.layer = QComboBox()
        self.layer.setToolTip("Image layers whose channels fit the checkpoint")
        self.layer_note = QLabel()
        self.layer_note.setWordWrap(True)
        self.layer_note.setStyleSheet("font-size: 11px; color: #b0b0b0;")
        self.all_planes = QCheckBox("every plane (time/z), not just the current one")
        self.all_planes.setToolTip("Off: predict the plane shown by the sliders. On: predict all planes and stack them.")
        if needs_input:
            new_form().addRow("Input layer", self.layer)
            outer.addWidget(self.layer_note)
            if allow_all_planes:
                outer.addWidget(self.all_planes)
        else:
            for w in (self.layer, self.layer_note, self.all_planes):
                w.setParent(self)
                w.hide()
        self._allow_all_planes = needs_input and allow_all_planes
        form = new_form()

        self.device = QComboBox()
        self._fill_devices()
        form.addRow("Device", self.device)
        self.sampler = QComboBox()
        self.sampler.setToolTip("DDIM: few deterministic steps; DDPM: every training step, slower")
        self.sampler.currentTextChanged.connect(self._on_sampler_changed)
        self._show_sampler, self._show_tiles, self._fast_steps = show_sampler, show_tiles, fast_steps
        if show_sampler:
            form.addRow("Sampler", self.sampler)
        else:
            self.sampler.setParent(self)
            self.sampler.hide()
        self.steps = spin_box(1, 1000, 15, "Diffusion steps")
        form.addRow("Steps", self.steps)
        self._sampling = Sampling(("residual_shift",), {"residual_shift": 15}, 15, False)
        self.seed = spin_box(0, MAX_SEED, 0, "Noise seed: the same seed gives the same result on any device or tiling")
        form.addRow("Seed", self.seed)
        self.tile_size = spin_box(8, 4096, 256, "Tile edge (pixels): larger is faster on a GPU, needs more memory")
        self.tile_overlap = spin_box(0, 2048, 32, "Overlap between tiles (pixels), blended smoothly")
        tiles = QHBoxLayout()
        tiles.addWidget(self.tile_size)
        tiles.addWidget(QLabel("overlap"))
        tiles.addWidget(self.tile_overlap)
        self._tiles_row = QWidget()
        self._tiles_row.setLayout(tiles)
        tiles.setContentsMargins(0, 0, 0, 0)
        self.batch_size = spin_box(1, 256, 4, "Tiles per network call")
        if show_tiles:
            form.addRow("Tile size", self._tiles_row)
        else:
            self._tiles_row.setParent(self)
            self._tiles_row.hide()
        form.addRow("Batch size", self.batch_size)
        self.tile_size.valueChanged.connect(lambda v: self.tile_overlap.setMaximum(max(0, v // 2)))

        self._fill_checkpoints()
        self.checkpoint.activated.connect(self._on_checkpoint_activated)
        if needs_input:
            self._hook_layer_events(viewer)
        self._select_first_checkpoint()
        self.refresh_layers()

    def _hook_layer_events(self, viewer) -> None:
        follow_layers(self, viewer, "_on_layers_event")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _fill_checkpoints(self) -> None:
        self.checkpoint.clear()
        for name, folder in bundled_checkpoints().items():
            if task_of(folder) in self.tasks:
                self.checkpoint.addItem(name, str(folder))
        self.checkpoint.addItem("Choose folder…", _BROWSE)
        for folder in _USER_CHECKPOINTS:
            self.offer_checkpoint(folder)
        _LISTENERS.add(self)

    def offer_checkpoint(self, folder: str) -> None:
        """List a bundle folder (before 'Choose folder…') if it is of this widget's task; the selection stays."""
        try:
            if task_of(Path(folder)) not in self.tasks or self.checkpoint.findData(folder) >= 0:
                return
            name = json.loads((Path(folder) / "config.json").read_text()).get("name", Path(folder).name)
        except (OSError, ValueError, RuntimeError):  # RuntimeError: the combo box's C++ object is gone
            return
        self.checkpoint.insertItem(self.checkpoint.count() - 1, f"{name} ({Path(folder).name})", folder)

    def _select_first_checkpoint(self) -> None:
        if self.checkpoint.count() > 1:
            i = max(self.checkpoint.findText(DEFAULT_CHECKPOINT), 0)
            self.checkpoint.setCurrentIndex(i)
            self.set_checkpoint(self.checkpoint.itemData(i))
        else:
            self._set_bundle(None, f"No bundled {' / '.join(self.tasks)} checkpoint: choose a checkpoint folder.")

    def _on_checkpoint_activated(self, index: int) -> None:
        data = self.checkpoint.itemData(index)
        if data == _BROWSE:
            folder = QFileDialog.getExistingDirectory(self, "Checkpoint folder (config.json + model.safetensors)")
            if not folder:
                self._restore_checkpoint_selection()
                return
            data = folder
        self.set_checkpoint(data)

    def _restore_checkpoint_selection(self) -> None:
        path = str(self.bundle.path) if self.bundle is not None and self.bundle.path else None
        i = self.checkpoint.findData(path) if path else -1
        self.checkpoint.setCurrentIndex(max(i, 0) if i >= 0 or self.checkpoint.count() > 1 else 0)

    def set_checkpoint(self, name_or_path: str | Path) -> Bundle | None:
        """Load a bundled demo by name or a checkpoint folder; a bad one is reported, never raised."""
        try:
            bundle = get_bundle(name_or_path)
            if bundle.config.task not in self.tasks:
                raise VirtualStainError(
                    f"checkpoint {bundle.config.name!r} is a {bundle.config.task!r} model; this widget needs "
                    f"{' or '.join(repr(t) for t in self.tasks)}"
                )
        except (VirtualStainError, OSError) as exc:
            notify_error(str(exc))
            self._restore_checkpoint_selection()
            return None
        path = str(bundle.path)
        i = self.checkpoint.findData(path)
        if i < 0:
            self.checkpoint.insertItem(self.checkpoint.count() - 1, f"{bundle.config.name} ({Path(path).name})", path)
            i = self.checkpoint.findData(path)
        self.checkpoint.setCurrentIndex(i)
        self._set_bundle(bundle)
        return bundle

    def _set_bundle(self, bundle: Bundle | None, message: str = "") -> None:
        self.bundle = bundle
        if bundle is None:
            self.summary.setText(message)
        else:
            c = bundle.config
            self.summary.setText(describe_bundle(bundle))
            self.summary.setToolTip(bundle.summary() + (f"\n\n{c.description}" if c.description else ""))
            sampling = self._sampling = sampling_options(bundle, self._fast_steps)
            self.sampler.blockSignals(True)
            self.sampler.clear()
            self.sampler.addItems(list(sampling.samplers))
            self.sampler.blockSignals(False)
            self.sampler.setEnabled(len(sampling.samplers) > 1)
            self.steps.setRange(sampling.min_steps, sampling.max_steps)
            self._on_sampler_changed(sampling.samplers[0])
            self.steps.setEnabled(sampling.editable)
            if not sampling.editable:
                n = sampling.max_steps
                self.steps.setToolTip(f"This {c.objective} checkpoint always takes {n} step{'s' if n > 1 else ''}")
            from ..core.model import downsample_factor

            factor = downsample_factor(c.unet)
            self.tile_size.setSingleStep(factor)
            self.tile_size.setMinimum(factor)
            self.tile_size.setValue(c.tile_size)
            self.tile_overlap.setValue(c.tile_overlap)
        self.refresh_layers()
        self.bundle_changed.emit(bundle)

    def _on_sampler_changed(self, name: str) -> None:
        if name in self._sampling.steps:
            self.steps.setValue(self._sampling.steps[name])
            if self._sampling.editable:
                lo = self._sampling.min_steps
                self.steps.setToolTip(f"Diffusion steps ({lo} to {self._sampling.max_steps}; {name} default "
                                      f"{self._sampling.steps[name]})" + ("; 0 = the mean network alone, no "
                                                                           "refinement" if lo == 0 else ""))

    # -- devices -----------------------------------------------------------------------------------------------
    def _fill_devices(self) -> None:
        import torch

        from ..core.model import pick_device

        auto = pick_device(None).type
        self.device.addItem(f"auto ({auto})", "auto")
        model: QStandardItemModel = self.device.model()
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        }
        for name in ("cuda", "mps", "cpu"):
            ok = available[name]
            label = name if ok else f"{name} (not available)"
            if name == "cuda" and ok:
                label = f"cuda ({torch.cuda.get_device_name(0)})"
            self.device.addItem(label, name)
            if not ok:
                model.item(self.device.count() - 1).setEnabled(False)

    # -- layers ------------------------------------------------------------------------------------------------
    def _on_layers_event(self, event) -> None:
        if event.type in ("inserted", "removed", "moved", "reordered", "changed", "name", "data", "rgb"):
            self.refresh_layers()

    def refresh_layers(self) -> None:
        """Re-list the Image layers that fit the checkpoint; keep the current choice when it still fits."""
        if not self.needs_input:
            return
        current = self.input_layer()  # by identity: survives a rename
        self.layer.blockSignals(True)
        self.layer.clear()
        self._offered = []
        n_in = len(image_channels(self.bundle.config)) if self.bundle is not None else 1
        hidden = []
        for layer in reversed(self.viewer.layers):  # top of the layer list first, as napari shows it
            if "bundle_id" in layer.metadata:  # our own outputs are not inputs
                continue
            reason = why_not_fit(layer, n_in)
            if reason is None:
                self.layer.addItem(layer.name)
                self._offered.append(weakref.ref(layer))
            elif type(layer).__name__ == "Image":
                hidden.append(f"'{layer.name}' ({reason})")
        layers = [ref() for ref in self._offered]
        if current is None or current not in layers:
            current = self._default_input(layers)
        if current is not None:
            self.layer.setCurrentIndex(layers.index(current))
        self.layer.blockSignals(False)
        shown = ", ".join(hidden[:2]) + (f" and {len(hidden) - 2} more" if len(hidden) > 2 else "")
        if self.layer.count() == 0:
            need = image_channels(self.bundle.config) if self.bundle is not None else ["brightfield"]
            self.layer_note.setText(
                f"No image layer fits: the checkpoint needs {len(need)} channel(s) ({', '.join(need)})"
                + (" stacked as (C, Y, X)" if len(need) > 1 else "")
                + ". Open one, or File > Open Sample > Virtual Staining."
                + (f" Not usable: {shown}." if hidden else "")
            )
        else:
            self.layer_note.setText(f"Not usable: {shown}." if hidden else "")
        self.layer_note.setToolTip("\n".join(hidden))
        self.layer_note.setVisible(bool(self.layer_note.text()))

    def _default_input(self, layers: list):
        """A layer named like the checkpoint's input (e.g. 'Brightfield …'), else the active layer, else the top."""
        if not layers:
            return None
        names = [n.lower() for n in (image_channels(self.bundle.config) if self.bundle is not None else [])]
        for layer in layers:
            if any(n and n in layer.name.lower() for n in names):
                return layer
        active = self.viewer.layers.selection.active
        return active if active in layers else layers[0]

    def input_layer(self):
        """The chosen layer, or None (nothing fits, or it was removed from the viewer)."""
        i = self.layer.currentIndex()
        offered = getattr(self, "_offered", [])
        layer = offered[i]() if 0 <= i < len(offered) else None
        return layer if layer is not None and layer in self.viewer.layers else None

    def set_input_layer(self, layer_or_name) -> None:
        name = getattr(layer_or_name, "name", layer_or_name)
        i = self.layer.findText(name)
        if i < 0:
            raise ValueError(f"layer {name!r} is not offered (does it fit the checkpoint?)")
        self.layer.setCurrentIndex(i)

    # -- settings ----------------------------------------------------------------------------------------------
    def settings(self) -> RunChoices:
        device = self.device.currentData()
        run = RunSettings(
            device=None if device == "auto" else device,
            tile_size=int(self.tile_size.value()) if self._show_tiles else None,
            tile_overlap=int(self.tile_overlap.value()) if self._show_tiles else None,
            batch_size=int(self.batch_size.value()),
        )
        return RunChoices(
            run,
            seed=int(self.seed.value()),
            sampler=self.sampler.currentText() if self._sampling.editable and self._show_sampler else None,
            steps=int(self.steps.value()) if self._sampling.editable else None,
            all_planes=self._allow_all_planes and self.all_planes.isChecked(),
        )
