"""Train in a child process, so that a GUI stays responsive however the CPU is shared.

Why: a training thread inside napari shares the interpreter lock with the event loop. The loop itself releases it
in torch, but preparing targets (scipy/numpy), saving the bundle and choosing the sampling defaults (watershed
labels on the validation regions) hold it in C calls, and on a busy 2-core machine the OS can deschedule the thread
while it holds the lock: the viewer then froze for 150–600 ms at the start and end of runs (docs/benchmarks.md,
"Event loop while training"). A process has its own interpreter; the parent only waits on a queue.

:func:`train_in_process` runs the same calls as the CLI (``train`` or ``train_recommended``) in a ``spawn``ed child
and relays its ``on_step`` / ``on_validate`` callbacks; Cancel is an event the child checks at every step (the last
validated bundle stays, as in-process). The child's errors come back as the same exception types.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable
from pathlib import Path

from ..core.errors import Cancelled, VirtualStainError

POLL_S = 0.1  # how often the parent looks at Cancel while the child is quiet
FINAL = ("done", "cancelled", "user_error", "bug")  # the child's last message


def _child(payload: dict, messages, cancel) -> None:
    """The child's body: train, relaying every callback; exactly one final message ("done", path) / ("cancelled",)
    / ("user_error", text) / ("bug", traceback)."""
    try:
        from .loop import train
        from .recipe import train_recommended

        def on_step(stage, step, loss):
            if cancel.is_set():
                raise Cancelled()
            messages.put(("step", stage, step, float(loss)))

        def on_validate(stage, record):
            messages.put(("validate", stage, record))

        spec, out, opts, resume = payload["spec"], payload["out"], payload["opts"], payload["resume"]
        if payload["method"] == "recommended":
            bundle, _ = train_recommended(spec, out, opts, resume=resume, log=lambda text: None, on_step=on_step,
                                          on_validate=on_validate)
        else:
            hooks = {"on_step": lambda s, v: on_step(1, s, v), "on_validate": lambda r: on_validate(1, r)}
            if opts.networks > 1:
                from .ensemble import train_ensemble

                bundle, _ = train_ensemble(spec, out, opts, resume=resume, hooks=hooks)
            else:
                bundle, _ = train(spec, out, opts, resume=resume, **hooks)
        messages.put(("done", str(bundle.path)))
    except Cancelled:
        messages.put(("cancelled",))
    except VirtualStainError as exc:
        messages.put(("user_error", str(exc)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it there
        messages.put(("bug", traceback.format_exc()))


def train_in_process(spec, out: str | Path, opts, *, method: str = "recommended", resume: bool = False,
                     on_step: Callable[[int, int, float], None] | None = None,
                     on_validate: Callable[[int, dict], None] | None = None,
                     should_cancel: Callable[[], bool] = lambda: False) -> Path:
    """Train ``spec`` into ``out`` in a child process (module doc); returns the bundle folder.

    ``method``: "recommended" (``train_recommended``: mean network, refinement, defaults) or anything else for one
    ``train`` call with ``opts``. ``on_step(stage, step, loss)`` / ``on_validate(stage, record)`` run here, in the
    caller's thread; either may raise :class:`Cancelled`, as may ``should_cancel()`` returning True — the child is
    told, stops at its next step and the call raises ``Cancelled``."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked Qt, OpenMP or torch state
    messages, cancel = ctx.Queue(), ctx.Event()
    payload = {"spec": spec, "out": Path(out), "opts": opts, "resume": resume, "method": method}
    child = ctx.Process(target=_child, args=(payload, messages, cancel), name="virtualstain-train", daemon=True)
    child.start()
    kind = None
    try:
        while True:
            if not cancel.is_set() and should_cancel():
                cancel.set()
            try:
                msg = messages.get(timeout=POLL_S)
            except queue.Empty:
                if not child.is_alive():
                    raise VirtualStainError(
                        f"the training process ended without a result (exit code {child.exitcode}); if the machine "
                        "ran out of memory, train with fewer or smaller images") from None
                continue
            kind = msg[0]
            try:
                if kind == "step" and on_step is not None:
                    on_step(*msg[1:])
                elif kind == "validate" and on_validate is not None:
                    on_validate(*msg[1:])
            except Cancelled:
                cancel.set()  # keep reading: the child answers with "cancelled" at its next step
            if kind == "done":
                if cancel.is_set():
                    raise Cancelled()
                return Path(msg[1])
            if kind == "cancelled":
                raise Cancelled()
            if kind == "user_error":
                raise VirtualStainError(msg[1])
            if kind == "bug":
                raise RuntimeError(f"training failed in its process:\n{msg[1]}")
    finally:
        # after its last message the child has nothing left to write: give it a moment to exit, then end it (its
        # interpreter's teardown is no reason to keep a cancelled user waiting); otherwise ask it to stop first
        if kind not in FINAL and child.is_alive():
            cancel.set()
            child.join(timeout=30)
        child.join(timeout=0.2)
        if child.is_alive():
            child.terminate()
            child.join(timeout=5)
        messages.close()
