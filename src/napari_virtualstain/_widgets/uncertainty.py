"""Uncertainty widget: DDPMavg and std maps as heatmaps, and flagged regions to review, on the current plane.

The model runs once (``core.uncertainty.predict_uncertainty``, the same call as ``virtualstain predict
--uncertainty``); the flags are a cheap function of the cached std map (``flag_regions``), so the threshold slider
and the minimum area update the ``flags`` layer instantly without running the model again. The review panel
(``review.py``) steps through the regions; decisions and hand edits of the ``flags`` layer survive threshold changes
(``core.review`` states the merge rule) and are exported with the regions. After a run the view is readable: the
stain with the flags as outlines; the std maps and labels are added hidden, one click away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import VirtualStainError
from ..core.io import output_name
from ..core.review import merge
from ._base import TaskWidget, describe_progress
from ._controls import RunChoices, spin_box
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
from .review import ReviewPanel

SLIDER_MAX = 1000
MEDIAN_SIZE = 3
FLAGS_LAYER = "flags"
MAP_LABELS = {"avg": "avg", "std_steps": "std_steps", "std_seeds": "std_seeds"}


def _flag_colours():
    """Every flag in one orange, thick outline — never the random colours of a segmentation's labels."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: "orange", 0: "transparent"})


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
        self.n_seeds = spin_box(2, 32, 4, "Seeds seed, seed+1, …; each is a full chain (run as one batch)")
        form.addRow("Seeds", self.n_seeds)
        self.window_low = spin_box(0.0, 1.0, 0.3, "The window's first t/T", step=0.05)
        self.window_high = spin_box(0.0, 1.0, 0.8, "The window's last t/T", step=0.05)
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
        self.min_area = spin_box(0, 1_000_000, 16, "Drop flagged regions smaller than this (pixels)")
        form.addRow("Min area", self.min_area)
        self.flag_summary = QLabel("")
        self.flag_summary.setWordWrap(True)
        form.addRow(self.flag_summary)
        self.export_button = QPushButton("Export review… (CSV + labels TIFF)")
        self.open_button = QPushButton("Open review…")
        row = QHBoxLayout()
        row.addWidget(self.export_button)
        row.addWidget(self.open_button)
        holder = QWidget()
        holder.setLayout(row)
        row.setContentsMargins(0, 0, 0, 0)
        form.addRow(holder)
        layout.addWidget(self.flags_box)
        self.flags_box.setEnabled(False)
        self.flags_box.setToolTip("Run 'Compute maps' first. Moving the threshold recomputes the automatic regions; "
                                  "decisions and regions edited by hand are kept (core/review.py). Export writes the "
                                  "regions as they are now, with the decisions; Open restores such an export.")
        self.review = None  # core.review.Review of the flags layer
        self._auto = None  # the labels last written to the layer (hand edits are what differs from them)
        self.review_panel = ReviewPanel(self.viewer, lambda: self.review, self.decide, self._flags_layer)
        layout.addWidget(self.review_panel)

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
        self.open_button.clicked.connect(self._open_clicked)

    # -- run ---------------------------------------------------------------------------------------------------
    def make_job(self, bundle, s: RunChoices, layer) -> Job:
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
                sampler=s.sampler, steps=s.steps, input_name=sel.layer_name,
                settings=s.with_feedback(lambda p: progress(p.fraction, describe_progress(p)), should_cancel),
            )
            provenance = {**result.provenance, **sel.plane_note, "input": sel.layer_name}
            tuples = []
            if add_prediction:
                st = result.stain
                lead = sel.lead_shape
                stain = stain_layer_tuples(
                    st.image.reshape(*lead, *st.image.shape), st.channel_names, st.channel_kinds,
                    {k: v.reshape(*lead, *v.shape) for k, v in st.labels.items()}, provenance, sel.geometry,
                )
                # a readable view: the stain with the flags on it; its labels are one click away
                tuples += [(d, {**kw, "visible": False} if kind == "labels" else kw, kind) for d, kw, kind in stain]
            tuples += map_layer_tuples(result.maps, result.stain.channel_names, result.stain.channel_kinds,
                                       provenance, sel, all_channels)
            return tuples, CachedMaps(result.maps, result.stain.channel_names, result.stain.channel_kinds, sel,
                                      provenance)

        def done(payload):
            tuples, cache = payload
            # the prediction and maps of a rerun on the same input replace the last ones (no stacked duplicates)
            yield from iter_add_layers(self.viewer, tuples, replace=True)
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
        """New channel/map (or the Otsu button): slider range from the map, threshold from Otsu. A review belongs to
        one map: another channel or map starts a new one."""
        from ..core.uncertainty import flag_regions

        m = self.current_map()
        if m is None:
            return
        if (self.flag_channel.currentText(), self.flag_map.currentText()) != getattr(self, "_reviewed", None):
            self.review = self._auto = None
        self._reviewed = (self.flag_channel.currentText(), self.flag_map.currentText())
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
        automatic = result.labels if result is not None else np.zeros(m.shape, np.int32)
        self.review = merge(automatic, self._synced_review(m), m)  # decisions and hand edits carry over
        labels = self._auto = self.review.labels
        data = labels.reshape(*sel.lead_shape, *labels.shape)
        used = self.threshold_value = result.threshold if result is not None else value
        self.threshold_label.setText(f"{used:.4g}")
        meta = {**cache.provenance, "flags": {**(result.settings if result else {}), "channel":
                self.flag_channel.currentText(), "map": self.flag_map.currentText()}}
        layer = self.viewer.layers[FLAGS_LAYER] if FLAGS_LAYER in self.viewer.layers else None  # noqa: SIM401
        if layer is None or layer.data.shape != data.shape:
            if layer is not None:
                self.viewer.layers.remove(layer)
            add_layers(self.viewer, [(data, {"name": FLAGS_LAYER, "opacity": 0.9, "contour": 2,  # outlines
                                             "metadata": json_safe(meta), **sel.geometry.kwargs()}, "labels")])
            self.viewer.layers[FLAGS_LAYER].colormap = _flag_colours()
        else:
            layer.data = data
            layer.metadata = json_safe(meta)
        n = len(result.table) if result is not None else 0
        kept = len(self.review.regions) - n
        self.flag_summary.setText(
            (f"{n} region{'s' if n != 1 else ''} above {used:.4g} ({self.flag_map.currentText()} of "
             f"{self.flag_channel.currentText()})" if result is not None else message)
            + (f"; {kept} more kept from hand edits" if kept > 0 else "")
        )
        self.review_panel.refresh()

    # -- review ------------------------------------------------------------------------------------------------
    def _flags_layer(self):
        return self.viewer.layers[FLAGS_LAYER] if FLAGS_LAYER in self.viewer.layers else None

    def _synced_review(self, m: np.ndarray):
        """The review with the person's edits of the flags layer taken in (None before the first flags)."""
        from ..core.review import sync

        layer = self._flags_layer()
        if self.review is None or self._auto is None or layer is None:
            return self.review
        current = np.asarray(layer.data).reshape(layer.data.shape[-2:])
        if current.shape != self._auto.shape:
            return self.review
        if not np.array_equal(current, self._auto):
            self.review = sync(self.review, current, self._auto, m)
            self._auto = self.review.labels
        return self.review

    def decide(self, region_id: int, decision: str) -> None:
        m = self.current_map()
        if m is not None:
            self._synced_review(m)
        self.review.decide(region_id, decision)

    def export_flags(self, path: str | Path) -> tuple[Path, Path]:
        """Write the review as it is now (hand edits of the flags layer and decisions included): a CSV row per region
        and the labels TIFF with the provenance; ``open_review`` restores it."""
        from ..core.review import write_review

        m = self.current_map()
        if self._cache is None or self._flags_layer() is None or m is None:
            raise VirtualStainError("Nothing to export: compute the maps first (the 'flags' layer holds the regions)")
        layer = self._flags_layer()
        if tuple(layer.data.shape[-2:]) != m.shape:
            raise VirtualStainError("The 'flags' layer no longer matches the maps; move the threshold to redo it")
        review = self._synced_review(m)
        extra = {"channel": self.flag_channel.currentText(), "map": self.flag_map.currentText(),
                 "threshold": self.threshold_value}
        return write_review(path, review, json_safe(layer.metadata), extra)

    def open_review(self, path: str | Path) -> None:
        """Restore an exported review onto the maps of the current run (same image: same shape)."""
        from ..core.io import read_provenance
        from ..core.review import read_review, review_paths

        if self._cache is None:
            raise VirtualStainError("Compute the maps of the image first, then open its review")
        _, tif = review_paths(path)
        info = read_provenance(tif).get("review", {}) if tif.is_file() else {}
        for combo, key in ((self.flag_channel, "channel"), (self.flag_map, "map")):
            if info.get(key) and combo.findText(info[key]) >= 0:
                combo.setCurrentText(info[key])
        m = self.current_map()
        review, _ = read_review(path, m)
        self.review, self._auto = review, review.labels
        layer, sel = self._flags_layer(), self._cache.selection
        layer.data = review.labels.reshape(*sel.lead_shape, *review.labels.shape)
        self.flag_summary.setText(f"{len(review.regions)} regions from {path.name}")
        self.review_panel.refresh()

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

    def _open_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open review", "", f"Review (*.csv {output_name('review_labels', '*')})")
        if not path:
            return
        try:
            self.open_review(path)
        except (VirtualStainError, OSError) as exc:
            notify_error(str(exc))


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
                kw = {"colormap": HEATMAP, "contrast_limits": (0.0, max(hi, 1e-6)), "visible": False}
            out.append((data, {"name": f"{name} {MAP_LABELS[key]}", "blending": "additive", "metadata": meta,
                               **kw, **sel.geometry.kwargs()}, "image"))
    return out
