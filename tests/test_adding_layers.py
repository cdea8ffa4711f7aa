"""How results reach napari: one layer per event-loop turn, each appended before it is drawn, a labels layer's
drawing tools a turn later — so no single moment of adding layers stalls napari for long (docs/benchmarks.md,
"napari widgets"; the timings are in benchmarks/bench_event_loop.py, not here)."""

from __future__ import annotations

import numpy as np


def test_napari_gets_a_turn_between_two_added_layers(qtbot):
    """Results are added one layer per event-loop turn, and the turn is real: timers (the repaint, a user's input)
    run between two layers, so a run's stall is one layer's, not all of them back to back."""
    import time

    from qtpy.QtCore import QTimer

    from napari_virtualstain._widgets._runner import Job, Runner

    ticks, seen = [], []
    timer = QTimer()
    timer.setInterval(1)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def add_layers(_result):
        for _ in range(3):
            time.sleep(0.02)  # a layer that takes 20 ms to add: the 1 ms timer is overdue when it returns
            seen.append(len(ticks))
            yield

    runner = Runner()
    timer.start()
    assert runner.start(Job("two layers", lambda progress, cancelled: 1, add_layers)) is None
    qtbot.waitUntil(lambda: runner.last_outcome == "done", timeout=10000)
    timer.stop()
    assert len(seen) == 3
    assert seen[1] > seen[0] and seen[2] > seen[1], f"no timer ran between the layers: {seen}"


def test_a_new_layer_is_drawn_on_the_turn_after_its_append(make_napari_viewer):
    """napari's append and the first paint of the data fall in two event-loop turns; a layer meant to be hidden stays
    hidden, and every other one ends visible."""
    from napari_virtualstain._widgets._layers import iter_add_layers

    viewer = make_napari_viewer()
    img = np.zeros((16, 16), np.float32)
    added = []
    steps = iter_add_layers(viewer, [(img, {"name": "shown"}, "image"), (img, {"name": "off", "visible": False},
                                                                         "image")], into=added)
    next(steps)
    assert [la.name for la in added] == ["shown"] and not viewer.layers["shown"].visible  # appended, not drawn yet
    next(steps)
    assert viewer.layers["shown"].visible
    for _ in steps:
        pass
    assert [la.name for la in added] == ["shown", "off"] and not viewer.layers["off"].visible


def test_a_new_labels_layer_gets_its_drawing_tools_a_turn_after_its_append(make_napari_viewer):
    """The polygon and brush overlays' visuals are built on their own turn, and every added labels layer can be
    painted on afterwards, also when the adding stopped right after the append (a widget closed mid-way)."""
    from napari_virtualstain._widgets._layers import iter_add_layers

    viewer = make_napari_viewer()
    lab = np.zeros((16, 16), np.uint16)
    lab[4:8, 4:8] = 1
    steps = iter_add_layers(viewer, [(lab, {"name": "nuclei"}, "labels"), (lab, {"name": "cells"}, "labels")])
    next(steps)
    layer = viewer.layers["nuclei"]
    assert "brush_stroke" not in layer._overlays  # appended without them
    next(steps)
    assert {"polygon", "brush_stroke"} <= set(layer._overlays)
    canvas = viewer.window._qt_viewer.canvas
    tools = {layer._overlays["polygon"], layer._overlays["brush_stroke"]}
    assert tools <= set(canvas._layer_overlay_to_visual[layer])  # their visuals exist
    next(steps)  # shown
    next(steps)  # "cells" appended, then the adding stops
    steps.close()
    for la in viewer.layers:
        la.mode = "paint"
        la.paint((5, 5), 2)
        assert la.data[5, 5] == 2
    assert {"polygon", "brush_stroke"} <= set(viewer.layers["cells"]._overlays)
