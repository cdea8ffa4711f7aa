"""Run one core call off the GUI thread: progress in, result/error/cancel out, always delivered on the GUI thread.

Every widget goes through :class:`Runner`; it owns no napari objects. The work function gets two callbacks,
``progress(fraction, text)`` and ``should_cancel()``, and runs in a plain ``QThread`` (default) or in napari's
``thread_worker`` pool (``backend="napari"``, kept for ``benchmarks/bench_event_loop.py``, which measured both).

Guarantees the widgets rely on:

- one run at a time in the whole process (a second start is refused with a reason, not queued);
- a cancelled run delivers nothing: even a result that was already on its way is dropped once Cancel was pressed;
- the worker never touches Qt widgets or napari layers; a widget closed mid-run (or napari closed) is not called
  back (Qt drops queued calls to deleted receivers) and its run is cancelled at the next progress report;
- no ``QThread`` is destroyed while running (running threads are kept in a module-level set until they finish).
"""

from __future__ import annotations

import gc
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qtpy.QtCore import QObject, Qt, QThread, QTimer, Signal
from qtpy.QtWidgets import QApplication

from ..core.errors import Cancelled, VirtualStainError

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: which thread kind new runners use. bench_event_loop.py measured both as equally responsive (docs/benchmarks.md);
#: a dedicated QThread needs neither napari's shared pool nor its error relay (which would show a traceback).
DEFAULT_BACKEND = "qthread"


@dataclass
class Job:
    """A unit of work: ``fn(progress, should_cancel)`` runs in the worker; ``on_result`` gets its return value on
    the GUI thread. ``title`` names the run in messages ("Virtual stain of 'Brightfield'")."""

    title: str
    fn: Callable[[ProgressFn, CancelFn], Any]
    on_result: Callable[[Any], Any]  # may be a generator: one step (e.g. one layer) per event-loop turn
    meta: dict = field(default_factory=dict)


class _Signals(QObject):
    """Created on the GUI thread, emitted from the worker: Qt queues every emit to the GUI thread."""

    progress = Signal(float, str)
    outcome = Signal(str, object)  # ("done" | "cancelled" | "user_error" | "bug", payload)


@dataclass
class _Run:
    """One run as the process sees it: alive until its worker function returns, whoever started it."""

    title: str
    cancel: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


_RUNS: list[_Run] = []


_BETWEEN_LAYERS_MS = 1  # the event loop's turn between two added layers (see Runner._drain)


def _execute(fn, signals: _Signals, run: _Run) -> None:
    """Body of every worker: run ``fn`` and turn whatever happens into exactly one ``outcome`` signal."""
    cancel_event = run.cancel
    last = [0.0]

    def progress(fraction: float, text: str) -> None:
        # at most ~50 updates/s reach the GUI; the final 100 % always does
        now = time.perf_counter()
        if fraction >= 1.0 or now - last[0] >= 0.02:
            last[0] = now
            signals.progress.emit(float(fraction), text)

    try:
        result = fn(progress, cancel_event.is_set)
    except Cancelled:
        signals.outcome.emit("cancelled", None)
    except VirtualStainError as exc:
        signals.outcome.emit("user_error", exc)
    except BaseException as exc:
        log.exception("napari-virtualstain worker failed")
        signals.outcome.emit("bug", exc)
    else:
        signals.outcome.emit("cancelled" if cancel_event.is_set() else "done", result)
    finally:
        run.ended.set()


class _WorkerThread(QThread):
    def __init__(self, fn, signals: _Signals, run: _Run):
        super().__init__()
        self._fn, self._signals, self._run = fn, signals, run

    def run(self) -> None:
        _execute(self._fn, self._signals, self._run)


# Threads are kept alive here (not by the widget) so closing a widget or viewer mid-run never destroys a running
# QThread (Qt aborts the process when that happens).
_LIVE: set[QThread] = set()


_HOLDING: weakref.WeakSet = weakref.WeakSet()  # runners whose run holds the collector (one at a time, in practice)


def _hold_collector(runner, hold: bool) -> None:
    """Keep Python's full garbage collections from freezing napari during a run.

    A napari session with torch loaded tracks ~700 k objects; a full (generation 2) collection walks them all with
    the GIL held, and allocating a layer's vispy visuals can trigger one: measured 742 ms on a busy 2-core machine,
    on top of the ~210 ms a layer costs napari itself. ``gc.freeze`` (CPython's documented way to exempt long-lived
    objects) moves what exists at the start of a run out of the collector's reach — after a cheap young-generation
    collection — and the run's end gives everything back (``gc.unfreeze``), so nothing that dies later is kept (also
    when the widget was closed mid-run and never heard the end: :func:`_reap`)."""
    if hold:
        _HOLDING.add(runner)
        gc.collect(1)
        gc.freeze()
        return
    _HOLDING.discard(runner)
    if not _HOLDING:
        gc.unfreeze()


def _reap() -> None:
    for t in [t for t in _LIVE if t.isFinished()]:
        _LIVE.discard(t)
    _RUNS[:] = [r for r in _RUNS if not r.ended.is_set()]
    for runner in [r for r in _HOLDING if _is_deleted(r)]:  # its widget closed mid-run: the end never reached it
        _hold_collector(runner, False)


def wait_for_all(timeout_s: float = 30.0) -> bool:
    """Cancel every run and wait for the workers to end (app shutdown, tests). True if all ended in time."""
    deadline = time.perf_counter() + timeout_s
    for run in _RUNS:
        run.cancel.set()
    for run in _RUNS:
        run.ended.wait(max(0.0, deadline - time.perf_counter()))
    for t in list(_LIVE):
        t.wait(max(0, int((deadline - time.perf_counter()) * 1000)))
    _reap()
    return not _RUNS and not _LIVE


def active_run() -> str | None:
    """Title of the run whose worker is still going anywhere in this process (closed widgets included), if any."""
    for run in _RUNS:
        if not run.ended.is_set():
            return run.title
    return None


def _is_deleted(obj) -> bool:
    """True once Qt has deleted the C++ side of ``obj`` (its parent widget or the viewer window was closed)."""
    try:
        from qtpy import sip

        return sip.isdeleted(obj)
    except ImportError:  # PySide
        import shiboken6

        return not shiboken6.isValid(obj)


def _watchdog(runner: Runner, run: _Run):
    """A progress listener (on the GUI thread) that cancels the run once its widget is gone.

    Deliberately not a ``destroyed`` handler: PyQt can crash when a Python slot runs while the garbage collector
    deletes the emitting widget. It holds the runner weakly, so it keeps nothing alive.
    """
    ref = weakref.ref(runner)

    def check(*_):
        r = ref()
        if r is None or _is_deleted(r):
            run.cancel.set()

    return check


_quit_hooked = False


def _hook_quit() -> None:
    global _quit_hooked
    app = QApplication.instance()
    if app is not None and not _quit_hooked:
        app.aboutToQuit.connect(lambda: wait_for_all(10.0))
        _quit_hooked = True


class Runner(QObject):
    """Starts :class:`Job`s one at a time and reports back through Qt signals (all on the GUI thread).

    Signals: ``started(title)``, ``progress(fraction, text)``, ``finished(outcome, payload)`` with outcome one of
    ``done`` (payload = the job's result, already passed to ``on_result``), ``cancelled``, ``user_error``
    (a :class:`VirtualStainError`) or ``bug`` (any other exception).
    """

    started = Signal(str)
    progress = Signal(float, str)
    finished = Signal(str, object)

    def __init__(self, parent: QObject | None = None, backend: str | None = None):
        super().__init__(parent)
        self.backend = backend or DEFAULT_BACKEND
        self.title: str | None = None
        self._job: Job | None = None
        self._run: _Run | None = None
        self._adding = False
        self._cancel: threading.Event | None = None
        self._signals: _Signals | None = None
        self.last_outcome: str | None = None
        self.started_at: float | None = None
        self.cancel_requested_at: float | None = None
        self.result_at: float | None = None  # the worker's outcome reached the GUI thread
        self.finished_at: float | None = None  # ... and its layers were added
        _hook_quit()

    @property
    def running(self) -> bool:
        return self._job is not None

    def start(self, job: Job) -> str | None:
        """Start ``job``; return None, or the reason it was refused (another run is in progress)."""
        _reap()
        other = active_run()
        if other is not None:
            return f"{other} is still running; wait for it to finish or press Cancel before starting another run"
        self._job, self.title = job, job.title
        run = _Run(job.title)
        _RUNS.append(run)
        self._run, self._cancel = run, run.cancel
        self.last_outcome = None
        self.started_at, self.cancel_requested_at, self.finished_at = time.perf_counter(), None, None
        _hold_collector(self, True)
        signals = self._signals = _Signals()
        signals.progress.connect(self._on_progress, Qt.ConnectionType.QueuedConnection)
        signals.outcome.connect(self._on_outcome, Qt.ConnectionType.QueuedConnection)
        signals.progress.connect(_watchdog(self, run), Qt.ConnectionType.QueuedConnection)
        if self.backend == "napari":
            self._start_napari(job, signals, run)
        else:
            thread = _WorkerThread(job.fn, signals, run)
            _LIVE.add(thread)
            thread.finished.connect(_reap, Qt.ConnectionType.QueuedConnection)
            thread.start()
        self.started.emit(job.title)
        return None

    def _start_napari(self, job: Job, signals: _Signals, run: _Run) -> None:
        from napari.qt.threading import create_worker

        # the function catches everything itself, so napari's own error relay (a traceback notification) never fires
        worker = create_worker(_execute, job.fn, signals, run, _start_thread=False)
        self._napari_worker = worker
        worker.start()

    def cancel(self) -> None:
        """Ask the run to stop at its next step boundary; its result, if any still arrives, is dropped.
        Ignored once the result is being added (it is complete: nothing half-made can come of it)."""
        if self._cancel is not None and not self._cancel.is_set() and not self._adding:
            self._cancel.set()
            self.cancel_requested_at = time.perf_counter()

    def _on_progress(self, fraction: float, text: str) -> None:
        if self._job is not None and not (self._cancel and self._cancel.is_set()):
            self.progress.emit(fraction, text)

    def _on_outcome(self, outcome: str, payload: object) -> None:
        job = self._job
        if job is None:
            return
        if outcome == "done" and self._cancel is not None and self._cancel.is_set():
            outcome, payload = "cancelled", None
        self._signals = None
        self._napari_worker = None
        self._run.ended.wait(5.0)  # set right after the outcome was emitted: the next start must not see it alive
        self.result_at = time.perf_counter()
        self._adding = True  # Cancel no longer applies: the result is complete
        _reap()
        if outcome != "done":
            self._finish(outcome, payload)
            return
        try:
            steps = job.on_result(payload)
        except Exception as exc:  # noqa: BLE001
            self._finish(*self._failure(exc))
            return
        if inspect.isgenerator(steps):
            self._drain(steps, payload)
        else:
            self._finish("done", payload)

    def _drain(self, steps, payload) -> None:
        """Run a generator ``on_result`` one step per event-loop turn (one layer each), so adding several big
        layers does not freeze napari in one block; the run counts as finished after its last step."""
        try:
            next(steps)
        except StopIteration:
            self._finish("done", payload)
            return
        except Exception as exc:  # noqa: BLE001
            self._finish(*self._failure(exc))
            return
        # a 1 ms timer, not 0: Qt runs a 0 ms single shot as a posted event, ahead of the repaint's timers and
        # input, so two layers were added back to back in one stall (214 ms, benchmarks/bench_event_loop.py)
        QTimer.singleShot(_BETWEEN_LAYERS_MS, lambda: None if _is_deleted(self) else self._drain(steps, payload))

    @staticmethod
    def _failure(exc: Exception) -> tuple[str, Exception]:
        if isinstance(exc, VirtualStainError):
            return "user_error", exc
        log.exception("napari-virtualstain: adding the results failed", exc_info=exc)
        return "bug", exc

    def _finish(self, outcome: str, payload) -> None:
        self._job = None
        self._adding = False
        _hold_collector(self, False)
        self.last_outcome = outcome
        self.finished_at = time.perf_counter()
        self.finished.emit(outcome, payload)
