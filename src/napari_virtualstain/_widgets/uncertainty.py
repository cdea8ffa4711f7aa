"""Uncertainty widget: DDPMavg and std maps as heatmaps, and flagged regions to review, on the current plane.

The model runs once (``core.uncertainty.predict_uncertainty``, the same call as ``virtualstain predict
--uncertainty``); the flags are a cheap function of the cached std map (``flag_regions``), so the threshold slider
and the minimum area update the ``flags`` layer instantly without running the model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import VirtualStainError
from ._base import TaskWidget, describe_progress
from ._controls import RunSettings
from ._layers import (
    HEATMAP,
    InputSelection,
    add_layers,
    iter_add_layers,
    json_safe,
    robust_limits,
    stain_colormap,
    stain_layer_tuples,
)
from ._notify import notify_error, notify_info
from ._runner import Job

SLIDER_MAX = 1000
MEDIAN_SIZE = 3
FLAGS_LAYER = "flags"
MAP_LABELS = {"avg": "avg", "std_steps": "std_steps", "std_seeds": "std_seeds"}


@dataclass
class CachedMaps:
    """What the flag controls work from after a run: the maps, where they sit, and their provenance."""

    maps: dict[str, np.ndarray]  # name -> (C, Y, X)
    channel_names: list[str]
    channel_kinds: list[str]
    selection: InputSelection
    provenance: dict


class UncertaintyWidget(TaskWidget):
    """Uncertainty maps of a virtual stain, and a ``flags`` Labels layer of the regions to double-check."""

    run_text = "Compute maps"
    allow_all_planes = False
    fast_steps = False  # step maps need the chain's steps, not a 1-step fast default

    # -- UI ----------------------------------------------------------------------------------------------------
    def build_options(self, form: QFormLayout) -> None:
        self.mode = QComboBox()
        self.mode.addItems(["steps", "seeds", "both"])
        self.mode.setToolTip("steps: spread of the estimate along one chain; seeds: spread across noise seeds "
                             "(k runs as one batch); both")
        form.addRow("Maps from", self.mode)
        self.n_seeds = QSpinBox()
        self.n_seeds.setRange(2, 32)
        self.n_seeds.setValue(4)
        self.n_seeds.setToolTip("Seeds seed, seed+1, …; each is a full chain (run as one batch)")
        form.addRow("Seeds", self.n_seeds)
        self.window_low, self.window_high = QDoubleSpinBox(), QDoubleSpinBox()
        for box, value in ((self.window_low, 0.3), (self.window_high, 0.8)):
            box.setRange(0.0, 1.0)
            box.setSingleStep(0.05)
            box.setDecimals(2)
            box.setValue(value)
        row = QHBoxLayout()
        row.addWidget(self.window_low)
        row.addWidget(QLabel("to"))
        row.addWidget(self.window_high)
        holder = QWidget()
        holder.setLayout(row)
        row.setContentsMargins(0, 0, 0, 0)
        holder.setToolTip("Steps whose t/T falls in this window are averaged (DM4ISL: 0.3 to 0.8)")
        form.addRow("Step window", holder)
        self.add_prediction = QCheckBox("also add the prediction and its labels")
        self.add_prediction.setChecked(True)
        form.addRow(self.add_prediction)
        self.all_channels = QCheckBox("maps of boundary/foreground channels too")
        form.addRow(self.all_channels)
        self.mode.currentTextChanged.connect(lambda m: self.n_seeds.setEnabled(m != "steps"))
        self.n_seeds.setEnabled(False)

    def build_extra(self, layout: QVBoxLayout) -> None:
        self.flags_box = QGroupBox("Flags (regions to review)")
        form = QFormLayout(self.flags_box)
        self.flag_channel = QComboBox()
        self.flag_map = QComboBox()
        form.addRow("Channel", self.flag_channel)
        form.addRow("Map", self.flag_map)
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(0, SLIDER_MAX)
        self.threshold_label = QLabel("–")
        self.threshold_label.setMinimumWidth(70)
        self.otsu_button = QPushButton("Otsu")
        self.otsu_button.setToolTip("Set the threshold automatically (Otsu's method on the map)")
        row = QHBoxLayout()
        row.addWidget(self.threshold, 1)
        row.addWidget(self.threshold_label)
        row.addWidget(self.otsu_button)
        holder = QWidget()
        holder.setLayout(row)
        row.setContentsMargins(0, 0, 0, 0)
        form.addRow("Threshold", holder)
        self.min_area = QSpinBox()
        self.min_area.setRange(0, 1_000_000)
        self.min_area.setValue(16)
        self.min_area.setToolTip("Drop flagged regions smaller than this (pixels)")
        form.addRow("Min area", self.min_area)
        self.flag_summary = QLabel("")
        self.flag_summary.setWordWrap(True)
        form.addRow(self.flag_summary)
        self.export_button = QPushButton("Export flags… (CSV + labels TIFF)")
        form.addRow(self.export_button)
        layout.addWidget(self.flags_box)
        self.flags_box.setEnabled(False)
        self.flags_box.setToolTip("Run 'Compute maps' first. Moving the threshold recomputes the flags layer "
                                  "(replacing hand edits); export writes the layer as it is now.")

        self._cache: CachedMaps | None = None
        self._flags = None  # last FlagResult
        self.threshold_value: float | None = None
        self._range = (0.0, 1.0)
        self.threshold.valueChanged.connect(lambda _: self.update_flags())
        self.min_area.valueChanged.connect(lambda _: self.update_flags())
        self.flag_channel.currentTextChanged.connect(lambda _: self._reset_threshold())
        self.flag_map.currentTextChanged.connect(lambda _: self._reset_threshold())
        self.otsu_button.clicked.connect(lambda: self._reset_threshold())
        self.export_button.clicked.connect(self._export_clicked)

    # -- run ---------------------------------------------------------------------------------------------------
    def make_job(self, bundle, s: RunSettings, layer) -> Job:
        from ..core.uncertainty import check_request

        sel = self.select_input(bundle, s, layer)
        mode = self.mode.currentText()
        seeds = tuple(range(s.seed, s.seed + (1 if mode == "steps" else self.n_seeds.value())))
        window = (self.window_low.value(), self.window_high.value())
        check_request(bundle, mode, seeds, window, s.sampler, s.steps)  # refuse before the worker starts
        add_prediction = self.add_prediction.isChecked()
        all_channels = self.all_channels.isChecked()

        def work(progress, should_cancel):
            from ..core.uncertainty import predict_uncertainty

            result = predict_uncertainty(
                bundle, sel.arrays[0], mode=mode, seeds=seeds, window=window, channel_axis=sel.channel_axis,
                tile_size=s.tile_size, tile_overlap=s.tile_overlap, batch_size=s.batch_size, device=s.device,
                sampler=s.sampler, steps=s.steps, input_name=sel.layer_name, should_cancel=should_cancel,
                progress=lambda p: progress(p.fraction, describe_progress(p)),
            )
            provenance = {**result.provenance, **sel.plane_note, "input": sel.layer_name}
            tuples = []
            if add_prediction:
                st = result.stain
                lead = sel.lead_shape
                tuples += stain_layer_tuples(
                    st.image.reshape(*lead, *st.image.shape), st.channel_names, st.channel_kinds,
                    {k: v.reshape(*lead, *v.shape) for k, v in st.labels.items()}, provenance, sel.geometry,
                )
            tuples += map_layer_tuples(result.maps, result.stain.channel_names, result.stain.channel_kinds,
                                       provenance, sel, all_channels)
            return tuples, CachedMaps(result.maps, result.stain.channel_names, result.stain.channel_kinds, sel,
                                      provenance)

        def done(payload):
            tuples, cache = payload
            yield from iter_add_layers(self.viewer, tuples)
            self.set_cache(cache)
            self.warn_if_input_gone(sel)

        return Job(f"Uncertainty maps of '{sel.layer_name}'", work, done, {"selection": sel})

    # -- flags -------------------------------------------------------------------------------------------------
    def set_cache(self, cache: CachedMaps) -> None:
        """Keep the maps of the last run and flag its default channel/map (Otsu threshold)."""
        self._cache = cache
        stains = [n for n, k in zip(cache.channel_names, cache.channel_kinds) if k == "stain"]
        std_names = [k for k in ("std_seeds", "std_steps") if k in cache.maps]
        for combo, items in ((self.flag_channel, cache.channel_names), (self.flag_map, std_names)):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            combo.blockSignals(False)
        if stains:
            self.flag_channel.setCurrentText(stains[0])
        self.flags_box.setEnabled(True)
        self._reset_threshold()

    def current_map(self) -> np.ndarray | None:
        c = self._cache
        if c is None or self.flag_map.currentText() not in c.maps:
            return None
        return c.maps[self.flag_map.currentText()][c.channel_names.index(self.flag_channel.currentText())]

    def _slider_to_value(self, pos: int) -> float:
        lo, hi = self._range
        return lo + (hi - lo) * pos / (SLIDER_MAX + 1)  # the top position stays below the max: [lo, hi)

    def _reset_threshold(self) -> None:
        """New channel/map (or the Otsu button): slider range from the map, threshold from Otsu."""
        from ..core.uncertainty import flag_regions

        m = self.current_map()
        if m is None:
            return
        from scipy import ndimage as ndi

        smooth = ndi.median_filter(m, size=MEDIAN_SIZE)  # flag_regions thresholds the filtered map
        self._range = (float(smooth.min()), float(smooth.max()))
        try:
            otsu = flag_regions(m, None, median_size=MEDIAN_SIZE, min_area=self.min_area.value()).threshold
        except VirtualStainError:
            otsu = self._range[0]
        lo, hi = self._range
        pos = min(round((otsu - lo) / (hi - lo) * (SLIDER_MAX + 1)), SLIDER_MAX) if hi > lo else 0
        self.threshold.blockSignals(True)
        self.threshold.setValue(pos)
        self.threshold.blockSignals(False)
        self.update_flags(otsu)

    def update_flags(self, threshold: float | None = None) -> None:
        """Recompute the ``flags`` layer from the cached map (no model run)."""
        from ..core.uncertainty import REVIEW_DEFAULTS, flag_regions

        m, cache = self.current_map(), self._cache
        if m is None or cache is None:
            return
        value = self._slider_to_value(self.threshold.value()) if threshold is None else float(threshold)
        message = ""
        try:
            result = flag_regions(m, value, median_size=MEDIAN_SIZE, min_area=self.min_area.value(), **REVIEW_DEFAULTS)
        except VirtualStainError as exc:  # threshold at the very top/bottom of the map: flag nothing
            result, message = None, str(exc)
        self._flags = result
        sel = cache.selection
        labels = result.labels if result is not None else np.zeros(m.shape, np.int32)
        data = labels.reshape(*sel.lead_shape, *labels.shape)
        used = self.threshold_value = result.threshold if result is not None else value
        self.threshold_label.setText(f"{used:.4g}")
        meta = {**cache.provenance, "flags": {**(result.settings if result else {}), "channel":
                self.flag_channel.currentText(), "map": self.flag_map.currentText()}}
        layer = self.viewer.layers[FLAGS_LAYER] if FLAGS_LAYER in self.viewer.layers else None  # noqa: SIM401
        if layer is None or layer.data.shape != data.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            add_layers(self.viewer, [(data, {"name": FLAGS_LAYER, "opacity": 0.6, "metadata": json_safe(meta),
                                             **sel.geometry.kwargs()}, "labels")])
        else:
            layer.data = data
            layer.metadata = json_safe(meta)
        n = len(result.table) if result is not None else 0
        self.flag_summary.setText(
            f"{n} region{'s' if n != 1 else ''} above {used:.4g} ({self.flag_map.currentText()} of "
            f"{self.flag_channel.currentText()})" if result is not None else message
        )

    def export_flags(self, path: str | Path) -> tuple[Path, Path]:
        """Write the ``flags`` layer as it is now (hand edits included): CSV of regions + labels TIFF."""
        from ..core.io import write_labels
        from ..core.uncertainty import flag_table, write_flag_table

        if self._cache is None or FLAGS_LAYER not in self.viewer.layers:
            raise VirtualStainError("Nothing to export: compute the maps first (the 'flags' layer holds the regions)")
        layer = self.viewer.layers[FLAGS_LAYER]
        labels = np.asarray(layer.data).reshape(layer.data.shape[-2:])
        m = self.current_map()
        if m is None or m.shape != labels.shape:
            raise VirtualStainError("The 'flags' layer no longer matches the maps; move the threshold to redo it")
        path = Path(path)
        csv_path = path.with_suffix(".csv")
        tif_path = path.with_name(path.stem + "_labels.tif")
        extra = {"channel": self.flag_channel.currentText(), "map": self.flag_map.currentText(),
                 "threshold": self.threshold_value}
        write_flag_table(csv_path, flag_table(labels, m), extra=extra)
        write_labels(tif_path, labels, json_safe(layer.metadata))
        return csv_path, tif_path

    def _export_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export flags", "flags.csv", "CSV (*.csv)")
        if not path:
            return
        try:
            csv_path, tif_path = self.export_flags(path)
        except (VirtualStainError, OSError) as exc:
            notify_error(str(exc))
            return
        notify_info(f"Wrote {csv_path.name} and {tif_path.name} to {csv_path.parent}")


def map_layer_tuples(maps: dict[str, np.ndarray], channel_names, channel_kinds, provenance: dict,
                     sel: InputSelection, all_channels: bool = False) -> list[tuple]:
    """Heatmap layers '<channel> <map>': std maps in inferno from 0, avg like the stain (hidden by default)."""
    out = []
    meta_base = json_safe(provenance)
    for key, stack in maps.items():
        for c, (name, kind) in enumerate(zip(channel_names, channel_kinds)):
            if kind != "stain" and not all_channels:
                continue
            data = stack[c].reshape(*sel.lead_shape, *stack[c].shape)
            meta = {**meta_base, "channel": name, "map": key}
            if key == "avg":
                kw = {"colormap": stain_colormap(name, c) if kind == "stain" else "gray",
                      "contrast_limits": robust_limits(data), "visible": False}
            else:
                hi = robust_limits(data)[1]
                kw = {"colormap": HEATMAP, "contrast_limits": (0.0, max(hi, 1e-6))}
            out.append((data, {"name": f"{name} {MAP_LABELS[key]}", "blending": "additive", "metadata": meta,
                               **kw, **sel.geometry.kwargs()}, "image"))
    return out
