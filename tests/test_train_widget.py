"""Train widget on real crops of the scratch assay: layers in, a checkpoint out that the other widgets list and that
predicts; Cancel keeps the last validated checkpoint or none; no layer is modified; bad picks are notifications."""

from __future__ import annotations

import numpy as np
import pytest

from gui_support import SCALE, wait_done

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _forget_trained_checkpoints():
    """Bundles trained here are offered to every widget of the session; other tests expect only the demos."""
    from napari_virtualstain._widgets import _controls

    before = list(_controls._USER_CHECKPOINTS)
    yield
    _controls._USER_CHECKPOINTS[:] = before


@pytest.fixture(scope="module")
def assay(shared_data):
    import tifffile

    data = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")
    ys, xs = slice(40, 136), slice(100, 260)  # 96 x 160 of time points 0-1
    return [np.ascontiguousarray(data[c, 0:2, ys, xs]) for c in range(3)]  # Hoechst, brightfield, nuclei


@pytest.fixture
def train_setup(make_napari_viewer, assay, tmp_path):
    from napari_virtualstain._widgets import TrainWidget

    hoechst, bf, nuclei = assay
    viewer = make_napari_viewer()
    viewer.add_image(bf, name="Brightfield", scale=SCALE)
    viewer.add_image(hoechst, name="Hoechst", scale=SCALE)
    viewer.add_labels(nuclei, name="nuclei", scale=SCALE)
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.input.setCurrentText("Brightfield")
    widget.set_targets(["Hoechst", "nuclei"])
    widget.method.setCurrentText("one pass (fastest)")
    widget.steps.setValue(10)
    widget.output.setText(str(tmp_path / "lab-model"))
    copies = [np.array(la.data) for la in viewer.layers]
    return viewer, widget, copies


def test_train_widget_writes_a_checkpoint_the_stain_widget_lists_and_predicts(train_setup, qtbot, notes):
    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.tasks.stain import predict_stain

    viewer, widget, copies = train_setup
    stain = StainWidget(viewer)  # opened before training: its list must update at once
    assert widget.run()
    assert "validation strip (Brightfield)" in [la.name for la in viewer.layers]  # drawn, so it is visible
    wait_done(qtbot, widget, timeout=120000)
    assert widget.runner.last_outcome == "done", notes.all()
    out = widget.last_output
    bundle = load_bundle(out)
    assert bundle.config.output_names[:2] == ["Hoechst", "nuclei boundary"]
    assert bundle.config.training["val_regions"] and "napari" in bundle.config.training["data"]
    items = [stain.controls.checkpoint.itemData(i) for i in range(stain.controls.checkpoint.count())]
    assert str(out.resolve()) in items
    assert stain.controls.set_checkpoint(out) is not None
    res = predict_stain(bundle, np.asarray(viewer.layers["Brightfield"].data[1]))
    assert res.image.shape[-2:] == (96, 160) and "nuclei" in res.labels
    widget._refresh_plots()
    assert widget.loss_plot.series and widget.val_plot.series  # the live curves were fed
    for layer, before in zip(list(viewer.layers)[:3], copies):  # no input or target layer was touched
        assert np.array_equal(np.asarray(layer.data), before)
    assert not notes.errors()
    # the same folder again without 'resume' is refused (nothing overwritten)
    assert not widget.run()
    assert any("already holds a checkpoint" in m for m in notes.errors())


def test_train_widget_cancel_and_bad_picks(train_setup, qtbot, notes, tmp_path):
    viewer, widget, _ = train_setup
    widget.set_targets([])
    assert not widget.run()
    assert any("pick at least one target" in m for m in notes.errors())
    widget.set_targets(["Hoechst"])
    shapes = viewer.add_shapes([np.array([[0, 0], [0, 3], [3, 3], [3, 0]], float)], shape_type="rectangle",
                               name="tiny box", scale=SCALE[1:])
    widget.refresh_layers()
    widget.validation.setCurrentText("tiny box")
    assert not widget.run()
    assert any("validation rectangle" in m for m in notes.errors())
    shapes.data = [np.array([[0, 100], [0, 160], [96, 160], [96, 100]], float) * 0.619]  # world -> pixels 100-160
    widget.steps.setValue(100000)
    widget.output.setText(str(tmp_path / "cancelled"))
    assert widget.run()
    # the first step's report (the bar itself rounds 1 of 150,000 steps to 0)
    qtbot.waitUntil(lambda: "step" in widget.progress_bar.format() or not widget.runner.running, timeout=60000)
    widget.cancel()
    wait_done(qtbot, widget, timeout=60000)
    assert widget.runner.last_outcome == "cancelled"
    assert not (tmp_path / "cancelled" / "config.json").exists()  # before the first validation: no checkpoint
    assert "no checkpoint was written" in widget.status.text()


def test_train_widget_trains_a_deep_ensemble_with_one_progress(train_setup, qtbot, notes):
    from napari_virtualstain.core.bundle import load_bundle

    viewer, widget, copies = train_setup
    widget.networks.setValue(2)
    assert widget.run()
    wait_done(qtbot, widget, timeout=180000)
    assert widget.runner.last_outcome == "done", notes.all()
    bundle = load_bundle(widget.last_output)
    assert bundle.config.networks == ["network_2.safetensors"]  # predicts with the mean of two seeds' networks
    assert [n["commands"] for n in bundle.config.training["networks"]]
    widget._refresh_plots()
    steps = [x for x, _ in widget._curves["loss 1"]]
    assert steps == sorted(steps) and max(steps) == 20  # the second network's steps follow the first's on one axis
    assert not notes.errors()
