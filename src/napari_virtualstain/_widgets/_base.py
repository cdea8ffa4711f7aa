"""The skeleton every widget shares: controls, task options, Run / Cancel, progress; subclasses only build a Job.

A subclass sets ``run_text``/``tasks``, adds its own rows in ``build_options`` and returns a :class:`Job` from
``make_job``; everything about threads, one-run-at-a-time, cancel, errors and progress lives here and in
``_runner.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qtpy.QtWidgets import (
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import VirtualStainError
from ..core.inputs import labels_warning
from ..core.settings import time_left
from ._controls import ModelControls, RunChoices, image_channels
from ._layers import InputSelection, select_input
from ._notify import notify_error, notify_info, notify_warning
from ._runner import Job, ProgressFn, Runner

PROGRESS_MAX = 1000


def describe_progress(p, plane: int = 0, n_planes: int = 1) -> str:
    """'plane 2/5 · block 3/16 · step 3/15 · tile 4/6' for a core ``Progress``."""
    if p.done and p.step >= p.num_steps and p.phase != "labels":  # the sampler's closing report
        text = f"step {p.num_steps}/{p.num_steps} · done"
    else:
        text = p.describe()
    return f"plane {plane + 1}/{n_planes} · {text}" if n_planes > 1 else text


def scroll_frame(owner: QWidget, inner: QWidget) -> None:
    """Put a dock widget's content in a frameless scroll area: on a laptop's 768 px the dock scrolls instead of
    pushing buttons and panels off-screen (every dock widget uses this)."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setWidget(inner)
    outer = QVBoxLayout(owner)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)


def per_plane(sel: InputSelection, predict: Callable, progress: ProgressFn, should_cancel) -> list:
    """Call ``predict(array, progress_cb)`` for every selected plane, mapping core progress onto one bar."""
    n = len(sel.arrays)
    results = []
    for i, array in enumerate(sel.arrays):

        def cb(p, i=i):
            progress((i + p.fraction) / n, describe_progress(p, i, n))

        results.append(predict(array, cb))
    return results


class BackgroundRun:
    """What every dock widget that runs work in the background shares: the runner wired to its Run / Cancel buttons
    and progress bar (``run_button``, ``cancel_button``, ``progress_bar``, ``status``, ``run()``, ``_on_finished``)."""

    def wire_runner(self) -> None:
        self._phase_t0, self._last_fraction = time.perf_counter(), 0.0  # the time-left estimate's phase (start_job)
        self.runner = Runner(self)
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)

    def start_job(self, make_job: Callable[[], Job], before: Callable[[], str | None] | None = None) -> bool:
        """One run at a time: ``before()`` may refuse with a message, ``make_job()`` may raise VirtualStainError; both
        become notifications. Returns whether the run started."""
        if self.runner.running:
            notify_warning(f"{self.runner.title} is still running; wait for it or press Cancel")
            return False
        problem = before() if before is not None else None
        if problem:
            notify_error(problem)
            return False
        try:
            job = make_job()
        except VirtualStainError as exc:
            notify_error(str(exc))
            return False
        refusal = self.runner.start(job)
        if refusal is not None:
            notify_warning(refusal)
            return False
        self._t0 = self._phase_t0 = time.perf_counter()
        self._last_fraction = 0.0
        self._set_running(True)
        self.status.setText(f"{job.title}…")
        return True

    def cancel(self) -> None:
        if self.runner.running:
            self.runner.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling after the current step…")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress_bar.setValue(0)

    def _on_progress(self, fraction: float, text: str) -> None:
        now = time.perf_counter()
        if fraction < self._last_fraction:  # a new phase (a big field's labels) restarts the bar
            self._phase_t0 = now
        self._last_fraction = fraction
        eta = time_left(now - self._phase_t0, fraction)
        self.progress_bar.setValue(round(min(max(fraction, 0.0), 1.0) * PROGRESS_MAX))
        self.progress_bar.setFormat(f"%p%  {text}" + (f" · {eta}" if eta else ""))


class TaskWidget(BackgroundRun, QWidget):
    """Dock widget base: ``ModelControls`` + options + Run/Cancel + progress bar, driving one :class:`Runner`."""

    run_text = "Run"
    tasks: tuple[str, ...] = ("stain",)
    needs_input = True
    allow_all_planes = True
    show_tiles = True
    show_sampler = True
    fast_steps = True  # residual shift: start at the bundle's validated step count (False: the whole chain)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.controls = ModelControls(
            napari_viewer, tasks=self.tasks, needs_input=self.needs_input,
            allow_all_planes=self.allow_all_planes, show_tiles=self.show_tiles, show_sampler=self.show_sampler,
            fast_steps=self.fast_steps,
        )
        self.options = QFormLayout()
        self.run_button = QPushButton(self.run_text)
        self.run_button.setToolTip("Runs in the background; napari stays usable")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current diffusion step; nothing is added")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, PROGRESS_MAX)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setStyleSheet("font-size: 11px;")

        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.addWidget(self.controls)
        layout.addLayout(self.options)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        self.build_extra(layout)
        layout.addStretch(1)
        scroll_frame(self, inner)

        self.wire_runner()
        self.build_options(self.options)
        self.controls.bundle_changed.connect(self.on_bundle_changed)
        self.on_bundle_changed(self.controls.bundle)

    # -- for subclasses ----------------------------------------------------------------------------------------
    def build_options(self, form: QFormLayout) -> None:
        """Add task-specific rows."""

    def build_extra(self, layout: QVBoxLayout) -> None:
        """Add widgets below the progress bar (e.g. the uncertainty flags section)."""

    def on_bundle_changed(self, bundle) -> None:
        """Refresh task-specific options (class lists...) for a new checkpoint."""

    def make_job(self, bundle, settings: RunChoices, layer) -> Job:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------------------------
    def select_input(self, bundle, settings: RunChoices, layer=None) -> InputSelection:
        """The input plane(s) as copies; raises VirtualStainError with what to do when the layer does not fit."""
        layer = layer if layer is not None else self.controls.input_layer()
        names = image_channels(bundle.config)
        if layer is None:
            raise VirtualStainError(
                f"No input layer: open an image with {len(names)} channel(s) ({', '.join(names)}) and pick it under "
                "'Input layer' (File > Open Sample > Virtual Staining has a brightfield time-lapse for the stain "
                "checkpoints and NF-kB wells for demo-nfkb)"
            )
        sel = select_input(layer, len(names), names, self.viewer.dims.point, settings.all_planes)
        warning = labels_warning(sel.arrays[0], f"'{sel.layer_name}'")
        if warning:
            notify_warning(warning)
        return sel

    def warn_if_input_gone(self, sel: InputSelection) -> None:
        if sel.layer_name not in self.viewer.layers:
            notify_warning(
                f"'{sel.layer_name}' was removed during the run; the results were added where it was."
            )

    # -- running -----------------------------------------------------------------------------------------------
    def run(self, layer=None) -> bool:
        """Start a run on ``layer`` (default: the picked input layer). Problems become notifications; returns
        whether a run started."""
        return self.start_job(
            lambda: self.make_job(self.controls.bundle, self.controls.settings(), layer),
            lambda: None if self.controls.bundle is not None else
            "Choose a checkpoint first (a bundled demo or a checkpoint folder)")

    def _on_finished(self, outcome: str, payload) -> None:
        self._set_running(False)
        seconds = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        self.progress_bar.setFormat("%p%")
        if outcome == "done":
            self.progress_bar.setValue(PROGRESS_MAX)
            self.status.setText(f"Done in {seconds:.1f} s")
        elif outcome == "cancelled":
            self.progress_bar.setValue(0)
            self.status.setText("Cancelled; nothing was added")
            notify_info("Cancelled; nothing was added")
        elif outcome == "user_error":
            self.progress_bar.setValue(0)
            self.status.setText(f"Error: {payload}")
            notify_error(str(payload))
        else:
            self.progress_bar.setValue(0)
            self.status.setText(f"Failed: {type(payload).__name__}: {payload}")
            notify_error(
                f"Unexpected error ({type(payload).__name__}: {payload}). This is a bug in napari-virtualstain; "
                "the traceback is in the terminal. Please report it."
            )
