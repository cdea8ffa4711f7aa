"""What the napari widget tests share: real data crops, a tiny bundle, notifications, and no worker left behind.

A pytest plugin (``pytest_plugins`` in conftest.py): its fixtures reach every test module without imports;
``SCALE``, ``wait_done`` and ``layer_names`` are plain names to import. ``_no_thread_left`` checks every test that
started a widget run.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

SCALE = (1.0, 0.619, 0.619)


@pytest.fixture(scope="module")
def scratch(shared_data) -> np.ndarray:
    """Brightfield (oblique transmitted light) of the scratch assay, (T=10, 210, 576) uint16."""
    import tifffile

    return tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")[1]


@pytest.fixture(scope="module")
def crop(scratch) -> np.ndarray:
    """(3, 48, 64): time points 7-9 of a 48x64 crop."""
    return np.ascontiguousarray(scratch[7:10, 100:148, 200:264])


@pytest.fixture(scope="module")
def tiny_bundle(tiny_bundle_dir):
    from napari_virtualstain._widgets._controls import get_bundle

    return get_bundle(tiny_bundle_dir)


@pytest.fixture
def notes():
    """Notifications raised during the test: a list of (severity, message)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    class Notes:
        def all(self):
            return [(str(n.severity), str(n.message)) for n in notification_manager.records[start:]]

        def errors(self):
            return [m for s, m in self.all() if s.lower() == "error"]

        def warnings(self):
            return [m for s, m in self.all() if s.lower() == "warning"]

    return Notes()


@pytest.fixture(autouse=True)
def _no_thread_left():
    """Every test ends with no worker still running (a stray run would make the next test refuse to start)."""
    yield
    runner = sys.modules.get("napari_virtualstain._widgets._runner")  # not imported: no widget ran, nothing to wait for
    if runner is not None:
        assert runner.wait_for_all(30.0), "a worker thread did not stop"


def wait_done(qtbot, widget, timeout=30000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)


@pytest.fixture
def stain_setup(make_napari_viewer, crop, tiny_bundle_dir):
    from napari_virtualstain._widgets import StainWidget

    viewer = make_napari_viewer()
    layer = viewer.add_image(crop, name="Brightfield", scale=SCALE, translate=(10.0, 5.0, 20.0))
    widget = StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.controls.set_checkpoint(tiny_bundle_dir) is not None
    widget.controls.set_input_layer(layer)
    return viewer, layer, widget


def layer_names(viewer):
    return [layer.name for layer in viewer.layers]
