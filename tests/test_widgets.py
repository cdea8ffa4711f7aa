"""napari widgets on real data (a crop of the ndev scratch assay) with tiny untrained bundles, under pytest-xvfb.

What they pin down: the widgets call the same core as the CLI (identical arrays for the same seed), outputs overlay
the input (scale/translate), carry provenance, the input layer is never modified, Cancel adds nothing, one run at a
time, and every bad input ends as a notification, never a traceback or a half-made layer.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from napari_virtualstain.core.settings import RunSettings

pytestmark = pytest.mark.gui

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
    from napari_virtualstain._widgets._runner import wait_for_all

    assert wait_for_all(30.0), "a worker thread did not stop"


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


# -- virtual stain -----------------------------------------------------------------------------------------------


def test_stain_predicts_current_plane_like_the_core(stain_setup, qtbot, crop, tiny_bundle, notes):
    from napari.layers import Image, Labels

    from napari_virtualstain.core.tasks.stain import predict_stain

    viewer, layer, widget = stain_setup
    before = np.array(layer.data, copy=True)
    viewer.dims.set_point(0, 12.0)  # world time 12 -> data plane 2 (translate 10, scale 1)
    widget.controls.seed.setValue(3)
    assert widget.run()
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert layer_names(viewer) == ["Brightfield", "Hoechst (virtual)", "nuclei (virtual)"]
    assert np.array_equal(layer.data, before), "the input layer was modified"

    hoechst, nuclei = viewer.layers["Hoechst (virtual)"], viewer.layers["nuclei (virtual)"]
    assert isinstance(hoechst, Image) and isinstance(nuclei, Labels)
    expected = predict_stain(tiny_bundle, crop[2], seed=3,
                             settings=RunSettings(tile_size=32, tile_overlap=8, batch_size=4))
    for out in (hoechst, nuclei):
        assert out.data.shape == (1, 48, 64)
        np.testing.assert_allclose(out.scale, SCALE)
        np.testing.assert_allclose(out.translate, (12.0, 5.0, 20.0))  # only on the plane it was predicted for
        meta = out.metadata
        assert meta["bundle_id"] == tiny_bundle.id and meta["seed"] == 3 and meta["steps"] == 15
        assert meta["input"] == "Brightfield" and meta["plane"] == [2] and meta["num_tiles"] >= 2
    np.testing.assert_allclose(hoechst.data[0], expected.channel("Hoechst"), rtol=1e-5, atol=1e-4)
    assert np.array_equal(nuclei.data[0], expected.labels["nuclei"])
    assert hoechst.blending == "additive" and hoechst.colormap.name == "cyan"
    assert nuclei.contour == 1  # outlines over the virtual stain, not filled
    lo, hi = hoechst.contrast_limits
    assert hoechst.data.min() <= lo < hi <= hoechst.data.max()
    assert not notes.errors()


def test_a_dask_backed_layer_computes_only_the_plane_predicted(make_napari_viewer, qtbot, crop, tiny_bundle_dir,
                                                               tiny_bundle, notes):
    """A lazy layer (an OME-Zarr field as napari-ome-zarr opens it, a big time-lapse): the widget reads one plane."""
    import dask
    import dask.array as da

    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain.core.tasks.stain import predict_stain

    loaded = []

    def load(i):
        loaded.append(i)
        return crop[i]

    planes = [da.from_delayed(dask.delayed(load)(i), crop.shape[1:], crop.dtype) for i in range(len(crop))]
    viewer = make_napari_viewer()
    layer = viewer.add_image(da.stack(planes), name="Brightfield (lazy)", contrast_limits=(0, 4000))
    widget = StainWidget(viewer)
    assert widget.controls.set_checkpoint(tiny_bundle_dir) is not None
    widget.controls.set_input_layer(layer)
    viewer.dims.set_point(0, 1.0)
    loaded.clear()  # napari drew the plane on screen; from here on only the prediction reads
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert loaded == [1]
    expected = predict_stain(tiny_bundle, crop[1], seed=0,
                             settings=RunSettings(tile_size=32, tile_overlap=8, batch_size=4))
    np.testing.assert_allclose(viewer.layers["Hoechst (virtual)"].data[0], expected.channel("Hoechst"),
                               rtol=1e-5, atol=1e-4)


def test_an_rgb_brightfield_layer_is_predicted_from_its_luminance(stain_setup, qtbot, crop, tiny_bundle, notes):
    from napari_virtualstain.core.inputs import RGB_NOTE, rgb_to_luminance
    from napari_virtualstain.core.tasks.stain import predict_stain

    viewer, _, widget = stain_setup
    grey = (crop[2] / crop[2].max() * 255).astype(np.uint8)
    photo = viewer.add_image(np.stack([grey, grey, (grey * 0.8).astype(np.uint8)], axis=-1), name="colour camera",
                             rgb=True)
    before = np.array(photo.data, copy=True)
    assert widget.run(photo)
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    hoechst = viewer.layers["Hoechst (virtual)"]
    assert hoechst.metadata["input_conversion"] == RGB_NOTE and hoechst.data.shape[-2:] == (48, 64)
    expected = predict_stain(tiny_bundle, rgb_to_luminance(before), seed=0,
                             settings=RunSettings(tile_size=32, tile_overlap=8))
    np.testing.assert_allclose(hoechst.data.reshape(48, 64), expected.channel("Hoechst"), rtol=1e-5, atol=1e-4)
    assert np.array_equal(photo.data, before)


def test_a_labels_image_layer_gets_a_warning(stain_setup, qtbot, shared_data, notes):
    import tifffile

    viewer, _, widget = stain_setup
    nuclei = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")[2, 9, :48, :64]
    masks = viewer.add_image(nuclei, name="nuclei masks as image")
    assert widget.run(masks)
    assert any("looks like a labels image" in m for m in notes.warnings()), notes.all()
    wait_done(qtbot, widget)


def test_stain_all_planes_probabilities_and_save(stain_setup, qtbot, crop, tiny_bundle, notes, tmp_path):
    from napari_virtualstain.core.tasks.stain import predict_stain

    viewer, _, widget = stain_setup
    widget.controls.all_planes.setChecked(True)
    widget.probabilities.setChecked(True)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert layer_names(viewer)[1:] == [
        "Hoechst (virtual)", "nuclei boundary (virtual)", "nuclei foreground (virtual)", "nuclei (virtual)"
    ]
    for name in layer_names(viewer)[1:]:
        out = viewer.layers[name]
        assert out.data.shape == crop.shape
        np.testing.assert_allclose(out.translate, (10.0, 5.0, 20.0))
        assert out.metadata["planes"] == "all" and out.metadata["lead_shape"] == [3]
    boundary = viewer.layers["nuclei boundary (virtual)"].data
    assert 0.0 <= boundary.min() and boundary.max() <= 1.0
    expected = predict_stain(tiny_bundle, crop[1], seed=0, settings=RunSettings(tile_size=32, tile_overlap=8))
    np.testing.assert_allclose(viewer.layers["Hoechst (virtual)"].data[1], expected.channel("Hoechst"),
                               rtol=1e-5, atol=1e-4)

    # saved like the CLI writes it: TCYX channels with names + provenance, one labels TIFF per labels set
    import tifffile

    from napari_virtualstain.core.io import read_channel_names, read_provenance

    written = widget.save_results(tmp_path)
    assert [p.name for p in written] == ["Brightfield_virtualstain.tif", "Brightfield_nuclei_labels.tif"]
    channels = tifffile.imread(written[0])
    assert channels.shape == (3, 3, 48, 64)
    assert read_channel_names(written[0]) == ["Hoechst", "nuclei boundary", "nuclei foreground"]
    np.testing.assert_allclose(channels[:, 0], viewer.layers["Hoechst (virtual)"].data)
    assert read_provenance(written[0])["bundle_id"] == tiny_bundle.id
    assert np.array_equal(tifffile.imread(written[1]), viewer.layers["nuclei (virtual)"].data)


def test_cancel_stops_between_steps_and_adds_nothing(make_napari_viewer, qtbot, scratch, tiny_bundle_dir, notes):
    from napari_virtualstain._widgets import StainWidget

    viewer = make_napari_viewer()
    big = viewer.add_image(scratch[9, :128, :256], name="big")  # 15 steps x 45 tiles: several seconds
    widget = StainWidget(viewer)
    widget.controls.set_checkpoint(tiny_bundle_dir)
    widget.controls.set_input_layer(big)
    assert widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=20000)
    qtbot.mouseClick(widget.cancel_button, _left())
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "cancelled"
    assert layer_names(viewer) == ["big"]
    assert widget.run_button.isEnabled() and widget.progress_bar.value() == 0
    # it stopped at a step boundary, well before the end
    assert widget.runner.finished_at - widget.runner.cancel_requested_at < 3.0
    assert not notes.errors()


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def test_one_run_at_a_time(stain_setup, qtbot, notes):
    """A second run, from the same widget or another one, is refused with a message while the first runs."""
    from napari_virtualstain._widgets import StainWidget, UncertaintyWidget

    viewer, layer, widget = stain_setup
    third = UncertaintyWidget(viewer)
    third.controls.set_checkpoint(widget.controls.bundle.path)
    other = StainWidget(viewer)
    other.controls.set_checkpoint(widget.controls.bundle.path)
    other.controls.set_input_layer(layer)
    assert widget.run()
    assert gc.get_freeze_count() > 0  # full collections cannot stall napari during the run ...
    assert not widget.run()  # the button is disabled, and a direct call is refused too
    assert not other.run()
    assert not third.run(layer)
    assert sum("still running" in m for m in notes.warnings()) == 3
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done"
    assert other.run()  # free again
    wait_done(qtbot, other)
    assert gc.get_freeze_count() == 0  # ... and after it the collector has everything back
    assert layer_names(viewer).count("Hoechst (virtual)") == 1 and "Hoechst (virtual) [1]" in layer_names(viewer)


def test_bad_layers_give_a_notification_and_no_layer(stain_setup, qtbot, crop, notes):
    viewer, layer, widget = stain_setup
    labels = viewer.add_labels(np.zeros((48, 64), np.int32), name="masks")
    rgb = viewer.add_image(np.zeros((48, 64, 3), np.uint8), name="photo", rgb=True)
    points = viewer.add_points(np.zeros((2, 2)), name="pts")
    n = len(viewer.layers)
    for bad, words in ((labels, "Labels layer"), (points, "Points layer")):
        assert not widget.run(bad)
        assert any(words in m for m in notes.errors()), (words, notes.all())
    assert len(viewer.layers) == n and not widget.runner.running
    assert widget.run(rgb)  # an RGB layer is taken (its luminance); an all-black one is refused as constant
    wait_done(qtbot, widget)
    assert any("constant" in m for m in notes.errors()) and len(viewer.layers) == n
    # the labels layer is not offered; an RGB layer is (a one-input checkpoint takes its luminance)
    offered = [widget.controls.layer.itemText(i) for i in range(widget.controls.layer.count())]
    assert offered == ["photo", "Brightfield"]

    # the picker follows the layer list: additions, renames, removals; a new layer does not steal the choice
    combo = widget.controls.layer
    viewer.layers.remove("photo")
    viewer.add_image(np.zeros((32, 32), np.float32), name="second")
    assert [combo.itemText(i) for i in range(combo.count())] == ["second", "Brightfield"]
    assert combo.currentText() == "Brightfield"
    layer.name = "renamed"
    assert combo.currentText() == "renamed"
    viewer.layers.remove("second")
    assert [combo.itemText(i) for i in range(combo.count())] == ["renamed"]


def test_bad_images_give_a_notification_and_no_layer(stain_setup, qtbot, crop, notes):
    """NaN, too small, constant: the core refuses them in the worker; the user sees its message, nothing is added."""
    viewer, _, widget = stain_setup
    nan = crop[0].astype(np.float32)
    nan[5, 7] = np.nan
    cases = [(nan, "nan"), (crop[0, :6, :6], "8x8"), (np.full((48, 64), 7, np.uint16), "constant")]
    for data, words in cases:
        bad = viewer.add_image(data, name=f"bad {words}")
        n = len(viewer.layers)
        assert widget.run(bad)
        wait_done(qtbot, widget)
        assert widget.runner.last_outcome == "user_error"
        errors = notes.errors()
        assert errors and words in errors[-1].lower(), notes.all()
        assert len(viewer.layers) == n
        assert widget.status.text().startswith("Error:")


def test_wrong_channel_count(make_napari_viewer, qtbot, crop, tmp_path, notes):
    import torch
    from conftest import make_tiny_config

    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain.core.bundle import save_bundle
    from napari_virtualstain.core.model import build_unet

    config = make_tiny_config(n_inputs=2)
    torch.manual_seed(0)
    save_bundle(tmp_path / "two", config, build_unet(config.unet))
    viewer = make_napari_viewer()
    flat = viewer.add_image(crop[0], name="flat")
    two = viewer.add_image(crop[:2], name="two planes")
    widget = StainWidget(viewer)
    widget.controls.set_checkpoint(tmp_path / "two")
    offered = [widget.controls.layer.itemText(i) for i in range(widget.controls.layer.count())]
    assert offered == ["two planes"]
    assert not widget.run(flat)
    assert "expects 2 input channels" in notes.errors()[-1]
    assert widget.run(two)
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done"
    assert viewer.layers["Hoechst (virtual)"].data.shape == (48, 64)  # the channel axis is consumed


def test_outputs_keep_a_rotated_layers_transform(crop):
    """Rotation, shear and affine of the input carry over to the outputs' kept axes (layer model only, no run)."""
    from napari.layers import Image

    from napari_virtualstain._widgets._layers import select_input

    affine = np.eye(4)
    affine[1, 3] = 7.0
    layer = Image(crop, scale=SCALE, rotate=30, shear=[0.0, 0.0, 0.2], affine=affine)
    sel = select_input(layer, 1, ["brightfield"], world_point=layer.data_to_world((2, 0, 0)))
    assert sel.planes == [(2,)]
    out = Image(np.zeros((1, 48, 64), np.float32), **sel.geometry.kwargs())
    for y, x in ((0, 0), (47, 63), (10, 50)):
        np.testing.assert_allclose(out.data_to_world((0, y, x)), layer.data_to_world((2, y, x)), atol=1e-9)


def test_input_layer_deleted_mid_run(stain_setup, qtbot, notes):
    viewer, layer, widget = stain_setup
    assert widget.run()
    viewer.layers.remove(layer)
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done"
    assert layer_names(viewer) == ["Hoechst (virtual)", "nuclei (virtual)"]
    hoechst = viewer.layers["Hoechst (virtual)"]
    np.testing.assert_allclose(hoechst.translate[1:], (5.0, 20.0))
    assert any("removed during the run" in m for m in notes.warnings())


def test_viewer_closed_mid_run(make_napari_viewer, qtbot, scratch, tiny_bundle_dir):
    """Closing napari mid-run cancels the run (the widget is gone) without a crash or a late layer."""
    import time

    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain._widgets._runner import active_run

    viewer = make_napari_viewer()
    viewer.add_image(scratch[9], name="full frame")  # ~15 s uncancelled
    widget = StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.controls.set_checkpoint(tiny_bundle_dir)
    assert widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=20000)
    t0 = time.perf_counter()
    viewer.close()
    qtbot.waitUntil(lambda: active_run() is None, timeout=10000)
    assert time.perf_counter() - t0 < 5.0


def test_checkpoint_picker(make_napari_viewer, tmp_path, notes, tiny_bundle_dir, tiny_ddpm_bundle_dir):
    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain.core.bundle import bundled_checkpoints

    viewer = make_napari_viewer()
    widget = StainWidget(viewer)
    controls = widget.controls
    items = [controls.checkpoint.itemText(i) for i in range(controls.checkpoint.count())]
    assert "demo-stain" in items and items[-1] == "Choose folder…"
    assert set(items[:-1]) <= set(bundled_checkpoints())
    assert controls.bundle.config.name == "demo-stain" and "Hoechst" in controls.summary.text()
    # residual shift: 1 to its trained chain, defaulting to the count the checkpoint was validated with
    cfg = controls.bundle.config
    assert controls.steps.isEnabled() and controls.steps.maximum() == cfg.scheduler["num_train_timesteps"]
    assert controls.steps.value() == cfg.sampling.get("steps", cfg.scheduler["num_train_timesteps"])
    assert widget.samples.value() == cfg.sampling.get("samples", 1) and widget.samples.isEnabled()
    assert widget.labels_from.currentText() == cfg.sampling.get("labels_from", "boundaries")
    # uncertainty: step maps need the whole chain, whatever the fast predict default is
    from napari_virtualstain._widgets.uncertainty import UncertaintyWidget

    assert UncertaintyWidget(viewer).controls.steps.value() == cfg.scheduler["num_train_timesteps"]
    (tmp_path / "empty").mkdir()
    assert controls.set_checkpoint(tmp_path / "empty") is None
    assert "config.json" in notes.errors()[-1]
    assert controls.bundle.config.name == "demo-stain"  # a bad choice leaves the previous checkpoint
    (tmp_path / "model.pt").write_bytes(b"\x80\x04junk")
    assert controls.set_checkpoint(tmp_path / "model.pt") is None
    assert "pickle" in notes.errors()[-1].lower()
    controls.set_checkpoint(tiny_bundle_dir)
    assert controls.bundle.config.name == "tiny" and controls.tile_size.value() == 32
    # a DDPM checkpoint: sampler and steps become choices, defaults per sampler, passed on to the core
    controls.set_checkpoint(tiny_ddpm_bundle_dir)
    assert controls.sampler.isEnabled() and controls.steps.isEnabled()
    assert [controls.sampler.itemText(i) for i in range(controls.sampler.count())] == ["ddim", "ddpm"]
    assert (controls.settings().sampler, controls.settings().steps) == ("ddim", 50)
    controls.sampler.setCurrentText("ddpm")
    assert (controls.settings().sampler, controls.settings().steps) == ("ddpm", 100)  # every training step
    controls.set_checkpoint(tiny_bundle_dir)
    controls.steps.setValue(4)
    assert controls.settings().steps == 4  # residual shift: a subset of its chain
    # devices: auto first, unavailable ones shown but disabled
    model = controls.device.model()
    labels = [controls.device.itemText(i) for i in range(controls.device.count())]
    assert labels[0].startswith("auto (") and any(t.startswith("cpu") for t in labels)
    import torch

    if not torch.cuda.is_available():
        i = next(i for i, t in enumerate(labels) if t.startswith("cuda"))
        assert not model.item(i).isEnabled()


def test_manifest_widgets_open_in_napari(make_napari_viewer):
    import npe2

    from napari_virtualstain import _widgets

    manifest = npe2.PluginManifest.from_file(__import__("pathlib").Path(__file__).parent.parent / "napari.yaml")
    widgets = {w.display_name: w.command for w in manifest.contributions.widgets}
    expected = {"Virtual stain": _widgets.StainWidget, "Uncertainty": _widgets.UncertaintyWidget,
                "Translate condition": _widgets.TranslateWidget, "Synthesize": _widgets.SynthesizeWidget,
                "Train": _widgets.TrainWidget}
    assert set(widgets) == set(expected)
    assert manifest.contributions.sample_data  # the scratch-assay sample stays
    # what `python -m napari_virtualstain._widgets` opens: the sample (time point 9) + the requested widgets
    from napari_virtualstain._widgets.__main__ import open_demo

    viewer = make_napari_viewer()
    opened = open_demo(viewer, list(expected))
    assert [type(w) for w in opened] == list(expected.values())
    if "Brightfield (scratch assay)" in viewer.layers:  # ndev-sampledata installed
        assert opened[0].controls.input_layer().name == "Brightfield (scratch assay)"
        assert viewer.dims.point[0] == 9


# -- uncertainty -------------------------------------------------------------------------------------------------


def test_uncertainty_maps_flags_threshold_and_export(make_napari_viewer, qtbot, crop, tiny_bundle, tmp_path, notes,
                                                     monkeypatch):
    import csv

    import tifffile

    from napari_virtualstain._widgets import UncertaintyWidget
    from napari_virtualstain.core import uncertainty as unc
    from napari_virtualstain.core.io import read_provenance

    viewer = make_napari_viewer()
    layer = viewer.add_image(crop, name="Brightfield", scale=SCALE)
    before = np.array(layer.data, copy=True)
    viewer.dims.set_point(0, 1.0)
    widget = UncertaintyWidget(viewer)
    widget.controls.set_checkpoint(tiny_bundle.path)
    widget.mode.setCurrentText("both")
    widget.n_seeds.setValue(2)
    widget.controls.seed.setValue(5)
    assert not widget.flags_box.isEnabled()
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert layer_names(viewer) == ["Brightfield", "Hoechst (virtual)", "nuclei (virtual)", "Hoechst avg",
                                   "Hoechst std_steps", "Hoechst std_seeds", "flags"]
    assert np.array_equal(layer.data, before)

    expected = unc.predict_uncertainty(tiny_bundle, crop[1], mode="both", seeds=(5, 6), window=(0.3, 0.8),
                                       settings=RunSettings(tile_size=32, tile_overlap=8))
    for key in ("avg", "std_steps", "std_seeds"):
        out = viewer.layers[f"Hoechst {key}"]
        assert out.data.shape == (1, 48, 64)
        np.testing.assert_allclose(out.data[0], expected.map_channel(key, "Hoechst"), rtol=1e-4, atol=1e-3)
        assert out.metadata["seeds"] == [5, 6] and out.metadata["map"] == key and out.metadata["plane"] == [1]
        np.testing.assert_allclose(out.translate, (1.0, 0.0, 0.0))
    assert viewer.layers["Hoechst std_seeds"].colormap.name == "inferno"
    assert viewer.layers["Hoechst std_seeds"].contrast_limits[0] == 0.0

    # default flags: the seed-std map of the stain channel, Otsu threshold, exactly what the core computes
    std = expected.map_channel("std_seeds", "Hoechst")
    flags = viewer.layers["flags"]
    assert widget.flag_channel.currentText() == "Hoechst" and widget.flag_map.currentText() == "std_seeds"
    otsu = unc.flag_regions(std, None, median_size=3, min_area=16, **unc.REVIEW_DEFAULTS)
    assert np.array_equal(flags.data[0], otsu.labels) and flags.data[0].max() >= 1
    assert flags.data[0].max() <= unc.REVIEW_DEFAULTS["max_regions"]  # a reviewable list
    from napari_virtualstain.core.uncertainty import flag_table

    assert flag_table(otsu.labels, std) == otsu.table  # the export's table (edited labels) = the core's columns

    # the slider re-flags the cached map instantly: the model must not run again
    monkeypatch.setattr(unc, "predict_uncertainty", lambda *a, **k: pytest.fail("the model ran again"))
    areas = []
    for pos in (100, 500, 900):
        widget.threshold.setValue(pos)
        value = widget.threshold_value
        assert np.array_equal(viewer.layers["flags"].data[0],
                              unc.flag_regions(std, value, median_size=3, min_area=16, **unc.REVIEW_DEFAULTS).labels)
        areas.append(int((viewer.layers["flags"].data > 0).sum()))
    assert areas[0] >= areas[1] >= areas[2] and areas[0] > areas[2]

    # export writes the layer as it is, hand edits included
    widget.min_area.setValue(4)
    for pos in range(50, 1000, 50):  # a threshold that splits the map into several regions
        widget.threshold.setValue(pos)
        data = viewer.layers["flags"].data.copy()
        ids = [i for i in np.unique(data) if i]
        if len(ids) >= 2:
            break
    assert len(ids) >= 2
    data[data == ids[0]] = 0
    viewer.layers["flags"].data = data
    csv_path, tif_path = widget.export_flags(tmp_path / "review.csv")
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert len(rows) == len(ids) - 1 and {r["channel"] for r in rows} == {"Hoechst"}
    assert {int(r["id"]) for r in rows} == set(ids[1:])
    assert np.array_equal(tifffile.imread(tif_path), data[0])
    assert read_provenance(tif_path)["bundle_id"] == tiny_bundle.id
    assert not notes.errors()


# -- class-conditional: translate / synthesize --------------------------------------------------------------------


def _save_tiny_classcond(path, channels, classes, invariant=()):
    """A tiny (untrained) class-conditional DDPM bundle (``invariant``: channels it conditions on, not generates)."""
    import torch

    from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec, save_bundle
    from napari_virtualstain.core.model import build_unet, default_unet_config
    from napari_virtualstain.core.normalize import FixedNorm
    from napari_virtualstain.core.schedulers import default_ddpm_config

    variable = [c for c in channels if c not in invariant]
    unet = default_unet_config(len(channels), len(variable), 32, (8, 16))
    unet["num_class_embeds"] = len(classes) + 1
    config = BundleConfig(
        name=path.name, task="classcond", objective="ddpm",
        input_channels=[ChannelSpec(c, "input", FixedNorm(0.0, 255.0)) for c in invariant],
        output_channels=[ChannelSpec(c, "stain", FixedNorm(0.0, 255.0)) for c in variable],
        unet=unet, scheduler=default_ddpm_config(100), tile_size=32, tile_overlap=8, classes=list(classes),
        training={"data": "synthetic (tests)"}, image_channels=list(channels) if invariant else [],
    )
    torch.manual_seed(0)
    save_bundle(path, config, build_unet(config.unet))
    return path


@pytest.fixture(scope="module")
def tiny_classcond_dir(tmp_path_factory):
    """Two channels (NF-kB, DNA), two wells (A01, A12)."""
    return _save_tiny_classcond(tmp_path_factory.mktemp("bundles") / "tiny-classcond", ["NF-kB", "DNA"], ["A01", "A12"])


@pytest.fixture(scope="module")
def nfkb_crop(shared_data) -> np.ndarray:
    """(2, 48, 64) uint8: NF-kB and DNA of the TNF-alpha stimulated well (BBBC014 A01), held-out rows."""
    import tifffile

    d = shared_data / "nfkb_translocation"
    return np.stack([tifffile.imread(d / f"A01_{c}.tif")[800:848, 600:664] for c in ("nfkb", "dna")])


def test_translate_layers_control_difference_and_side_by_side(make_napari_viewer, qtbot, nfkb_crop,
                                                              tiny_classcond_dir, notes):
    from napari_virtualstain._widgets import TranslateWidget
    from napari_virtualstain._widgets._controls import get_bundle
    from napari_virtualstain._widgets.translate import _grid
    from napari_virtualstain.core.tasks.classcond import translate

    viewer = make_napari_viewer()
    layer = viewer.add_image(nfkb_crop, name="A01 well")
    flat = viewer.add_image(nfkb_crop[0], name="NF-kB only")
    before = layer.data.copy()
    widget = TranslateWidget(viewer)
    controls = widget.controls
    assert controls.set_checkpoint(tiny_classcond_dir) is not None
    assert [controls.layer.itemText(i) for i in range(controls.layer.count())] == ["A01 well"]
    assert controls.steps.isEnabled() and controls.steps.value() == 50
    assert (widget.source.currentText(), widget.target.currentText()) == ("A01", "A12")
    assert not widget.run(flat) and "2 input channels" in notes.errors()[-1]

    # cancel a long run: nothing is added
    n = len(viewer.layers)
    assert widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() > 0, timeout=20000)
    widget.cancel()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "cancelled" and len(viewer.layers) == n

    controls.steps.setValue(4)
    widget.guidance.setValue(2.0)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert np.array_equal(layer.data, before)
    bundle = get_bundle(tiny_classcond_dir)
    expected = translate(bundle, nfkb_crop, "A01", "A12", steps=4, guidance=2.0, channel_axis=0,
                         settings=RunSettings(tile_size=32, tile_overlap=8))
    for c, ch in enumerate(["NF-kB", "DNA"]):
        tr = viewer.layers[f"{ch} A01→A12 (translated)"]
        ctl = viewer.layers[f"{ch} A01→A01 (control)"]
        diff = viewer.layers[f"{ch} difference (A12 − A01; green = more in A12)"]
        assert tr.data.shape == ctl.data.shape == diff.data.shape == (48, 64)
        np.testing.assert_allclose(tr.data, expected.translated[c], rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(ctl.data, expected.control[c], rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(diff.data, tr.data - ctl.data, atol=1e-3)
        lo, hi = diff.contrast_limits
        assert lo == pytest.approx(-hi) and hi > 0
        assert diff.colormap.name == "PiYG" and not diff.visible  # shown on demand (side by side)
        assert tr.contrast_limits == ctl.contrast_limits  # comparable at a glance
        meta = tr.metadata
        assert (meta["source_class"], meta["target_class"], meta["steps"], meta["input"]) == ("A01", "A12", 4, "A01 well")
        assert meta["bundle_id"] == bundle.id and meta["guidance_scale"] == 2.0

    widget.side_by_side.setChecked(True)
    grid = _grid(viewer)
    assert grid.enabled and tuple(grid.shape) == (1, 4)
    visible = [la.name for la in viewer.layers if la.visible]
    assert visible == ["A01 well", "NF-kB A01→A12 (translated)", "NF-kB A01→A01 (control)",
                       "NF-kB difference (A12 − A01; green = more in A12)"]
    widget.side_by_side.setChecked(False)  # back to the layer visibility from before
    assert not grid.enabled and viewer.layers["DNA A01→A12 (translated)"].visible
    assert not viewer.layers["NF-kB difference (A12 − A01; green = more in A12)"].visible


def test_translate_follows_the_layers_class_and_refuses_the_wrong_direction(make_napari_viewer, nfkb_crop,
                                                                            tiny_classcond_dir, notes):
    from napari_virtualstain._widgets import TranslateWidget
    from napari_virtualstain._widgets.translate import class_of_layer

    viewer = make_napari_viewer()
    layer = viewer.add_image(nfkb_crop, name="A12_nfkb crop")
    widget = TranslateWidget(viewer)
    widget.controls.set_checkpoint(tiny_classcond_dir)
    widget.controls.set_input_layer(layer)
    assert (widget.source.currentText(), widget.target.currentText()) == ("A12", "A01")  # from the layer's name
    widget.source.setCurrentText("A01")
    widget.target.setCurrentText("A12")  # the wrong direction for an A12 image
    assert not widget.run() and "says it is A12" in notes.errors()[-1]
    widget.source.setCurrentText("A12")
    widget.target.setCurrentText("A12")
    assert not widget.run() and "both A12" in notes.errors()[-1]
    assert np.array_equal(layer.data, nfkb_crop)
    # metadata beats the name: a translated layer is its target class
    other = viewer.add_image(nfkb_crop, name="whatever", metadata={"role": "translated", "target_class": "A01",
                                                                   "source_class": "A12"})
    assert class_of_layer(other, ["A01", "A12"]) == "A01"
    assert class_of_layer(viewer.add_image(nfkb_crop, name="A01 vs A12"), ["A01", "A12"]) is None  # ambiguous


def test_synthesize_stack_per_channel(make_napari_viewer, qtbot, tiny_classcond_dir, notes):
    from napari_virtualstain._widgets import SynthesizeWidget
    from napari_virtualstain._widgets._controls import get_bundle
    from napari_virtualstain.core.tasks.classcond import synthesize

    viewer = make_napari_viewer()
    widget = SynthesizeWidget(viewer)
    widget.controls.set_checkpoint(tiny_classcond_dir)
    widget.class_name.setCurrentText("A12")
    widget.count.setValue(3)
    widget.controls.steps.setValue(3)
    widget.controls.seed.setValue(7)
    widget.controls.batch_size.setValue(2)
    assert widget.size.value() == 32
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert layer_names(viewer) == ["NF-kB synthetic (A12)", "DNA synthetic (A12)"]
    expected = synthesize(get_bundle(tiny_classcond_dir), "A12", 3, seed=7, steps=3, size=32,
                          settings=RunSettings(batch_size=4))
    for c, name in enumerate(layer_names(viewer)):
        out = viewer.layers[name]
        assert out.data.shape == (3, 32, 32)
        # sample i uses seed 7 + i whatever the batching (2 here, 4 in the reference)
        np.testing.assert_allclose(out.data, expected.images[:, c], rtol=1e-4, atol=1e-2)
        assert out.metadata["seeds"] == [7, 8, 9] and out.metadata["class"] == "A12"


def test_invariant_dna_is_kept_by_translate_and_asked_for_by_synthesize(make_napari_viewer, qtbot, nfkb_crop,
                                                                         tmp_path, notes):
    """A checkpoint that generates NF-kB given DNA: the translate widget takes the two-channel layer and hands the DNA
    back unchanged; the synthesize widget asks for a DNA layer and generates for it."""
    from napari_virtualstain._widgets import SynthesizeWidget, TranslateWidget

    bundle_dir = _save_tiny_classcond(tmp_path / "tiny-inv", ["NF-kB", "DNA"], ["A01", "A12"], invariant=["DNA"])
    viewer = make_napari_viewer()
    layer = viewer.add_image(nfkb_crop, name="A01 well")
    widget = TranslateWidget(viewer)
    widget.controls.set_checkpoint(bundle_dir)
    assert widget.controls.input_layer() is layer
    widget.controls.steps.setValue(2)
    widget.target.setCurrentText("A12")
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    dna = [lyr for lyr in viewer.layers if lyr.name.startswith("DNA") and "translated" in lyr.name]
    assert len(dna) == 1 and dna[0].metadata["invariant_channels"] == ["DNA"]
    np.testing.assert_array_equal(np.asarray(dna[0].data), nfkb_crop[1].astype(np.float32))

    syn = SynthesizeWidget(viewer)
    syn.controls.set_checkpoint(bundle_dir)
    assert syn.condition.isVisibleTo(syn) and not syn.size.isEnabled()
    assert syn.condition.count() == 0  # the two-channel layer is not a DNA image
    assert not syn.run() and "open a DNA image" in notes.errors()[-1]
    viewer.add_image(nfkb_crop[1], name="DNA only")
    assert [syn.condition.itemText(i) for i in range(syn.condition.count())] == ["DNA only"]
    syn.count.setValue(2)
    syn.controls.steps.setValue(2)
    assert syn.run()
    wait_done(qtbot, syn)
    assert syn.runner.last_outcome == "done", notes.all()
    assert syn.size.value() == 64 and not syn.size.isEnabled()  # the greyed box shows the samples' size
    out = viewer.layers["DNA condition (kept)"].data  # carried along, not generated: not called "synthetic"
    assert out.shape == (2, 48, 64)
    np.testing.assert_array_equal(out[1], nfkb_crop[1].astype(np.float32))


def test_rgb_checkpoint_takes_rgb_layers(make_napari_viewer, qtbot, shared_data, tmp_path, notes):
    """An RGB class-conditional checkpoint (H&E) takes napari's RGB layers as they are and gives RGB layers back."""
    import imageio.v3 as iio

    from napari_virtualstain._widgets import SynthesizeWidget, TranslateWidget
    from napari_virtualstain.core.errors import VirtualStainError

    bundle_dir = _save_tiny_classcond(tmp_path / "tiny-he", ["R", "G", "B"], ["NORM", "TUM"])
    tile = iio.imread(min((shared_data / "crc_he_tiles").glob("TUM-*.png")))[:40, :48, :3]
    viewer = make_napari_viewer()
    he = viewer.add_image(tile, name="H&E tile", rgb=True)
    assert he.rgb
    widget = TranslateWidget(viewer)
    widget.controls.set_checkpoint(bundle_dir)
    assert widget.controls.input_layer() is he
    widget.source.setCurrentText("TUM")
    widget.target.setCurrentText("NORM")
    widget.controls.steps.setValue(2)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    translated = viewer.layers["RGB TUM→NORM (translated)"]
    assert translated.rgb and translated.data.shape == (40, 48, 3)
    assert viewer.layers["RGB TUM→TUM (control)"].data.shape == (40, 48, 3)
    assert [viewer.layers[f"{c} difference (NORM − TUM; green = more in NORM)"].data.shape for c in "RGB"] == [(40, 48)] * 3
    assert np.array_equal(he.data, tile)

    synth = SynthesizeWidget(viewer)
    synth.controls.set_checkpoint(bundle_dir)
    synth.count.setValue(2)
    synth.controls.steps.setValue(2)
    assert synth.run()
    wait_done(qtbot, synth)
    out = viewer.layers["RGB synthetic (NORM)"]
    assert out.rgb and out.data.shape == (2, 32, 32, 3)

    # a one-input (greyscale) model takes the RGB layer's luminance; a two-input model refuses it
    from napari_virtualstain._widgets._layers import select_input, why_not_fit

    assert why_not_fit(he, 1) is None and why_not_fit(he, 2) == "RGB"
    assert select_input(he, 1, ["brightfield"]).arrays[0].shape == (40, 48)
    with pytest.raises(VirtualStainError, match="Split RGB"):
        select_input(he, 2, ["a", "b"])


def test_review_flags_decide_edit_survive_thresholds_export_and_reopen(make_napari_viewer, qtbot, crop, tiny_bundle,
                                                                       tmp_path, notes):
    from napari_virtualstain._widgets import UncertaintyWidget
    from napari_virtualstain._widgets.review import KEYS

    viewer = make_napari_viewer()
    viewer.add_image(crop, name="Brightfield", scale=SCALE)
    widget = UncertaintyWidget(viewer)
    widget.controls.set_checkpoint(tiny_bundle.path)
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    # readable by default: stain + flag outlines; maps and labels hidden, one click away
    assert viewer.layers["Hoechst (virtual)"].visible and viewer.layers["flags"].contour == 2
    assert not viewer.layers["Hoechst std_steps"].visible and not viewer.layers["nuclei (virtual)"].visible
    widget.min_area.setValue(4)
    for pos in range(50, 1000, 25):  # a threshold with several regions
        widget.threshold.setValue(pos)
        if len(widget.review.regions) >= 3:
            break
    panel, review = widget.review_panel, widget.review
    ids = panel.ids()
    assert len(ids) >= 3 and panel.isEnabled()
    assert [review.regions[i].mean_std for i in ids] == sorted((r.mean_std for r in review.regions.values()),
                                                               reverse=True)
    # Next centres the view on the region and selects it for editing
    panel.step(1)
    second = review.regions[ids[1]]
    flags = viewer.layers["flags"]
    world = flags.data_to_world([0, *second.centroid])
    from napari_virtualstain._widgets.review import REGION_SHARE, camera_of, canvas_size

    camera = camera_of(viewer)
    np.testing.assert_allclose(camera.center[-2:], world[-2:], atol=1e-6)
    extent = (np.asarray(second.bbox[2:]) - np.asarray(second.bbox[:2])) * np.asarray(SCALE[-2:])
    assert camera.zoom == pytest.approx(REGION_SHARE * np.min(canvas_size(viewer) / extent))
    assert flags.selected_label == ids[1]
    # ... and boxes it in yellow (a Shapes layer of its own); flags are one orange, never a segmentation's colours
    from napari_virtualstain._widgets.review import CURRENT_LAYER

    box = viewer.layers[CURRENT_LAYER].data[0]
    (y0, x0), (y1, x1) = box.min(axis=0), box.max(axis=0)
    assert y0 <= second.bbox[0] and x0 <= second.bbox[1] and y1 >= second.bbox[2] and x1 >= second.bbox[3]
    assert viewer.layers.selection.active is flags  # the brush still edits the flags
    colours = flags.colormap.map(np.array(ids[:3]))
    np.testing.assert_allclose(colours, np.tile(colours[:1], (3, 1)))
    assert colours[0][0] == 1.0 and colours[0][2] == 0.0  # orange
    # the keys are bound on the viewer; a decision moves on to the next region still to review
    bound = {str(k) for k in viewer.keymap}
    assert all(any(key.replace("-", "").lower() in b.replace("-", "").replace("+", "").lower() for b in bound)
               for key in KEYS), bound
    panel.decide("hallucination")
    assert widget.review.regions[ids[1]].decision == "hallucination" and panel.current_id() == ids[2]
    panel.decide("fine")
    assert widget.review.regions[ids[2]].decision == "fine"
    # a region drawn by hand, then another threshold: the drawn region and both decisions are kept
    data = flags.data.copy()
    data[0, :3, :3] = 99
    flags.data = data
    widget.threshold.setValue(widget.threshold.value() + 25)
    widget.threshold.setValue(widget.threshold.value() - 25)
    after = widget.review
    hand = [r for r in after.regions.values() if r.by_hand]
    assert len(hand) == 1 and hand[0].area == 9
    assert sorted(r.decision for r in after.regions.values() if r.decision != "unreviewed") == ["fine",
                                                                                              "hallucination"]
    # export, change everything, reopen: the review is back
    csv_path, tif_path = widget.export_flags(tmp_path / "review.csv")
    saved = {r.centroid: r.decision for r in widget.review.regions.values()}
    widget.threshold.setValue(900)
    widget.open_review(csv_path)
    assert {r.centroid: r.decision for r in widget.review.regions.values()} == saved
    assert np.array_equal(viewer.layers["flags"].data[0], widget.review.labels)
    assert "to review" in panel.counts.text() and panel.list.count() == len(saved)
    assert not notes.errors()


def test_a_layer_at_another_pixel_size_warns_and_rescale_fixes_it(make_napari_viewer, qtbot, scratch, notes):
    """A held-out plane upsampled 2x with its scale halved ("40x"): a warning naming both sizes; the option works."""
    from skimage.transform import rescale

    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain.core.metrics import pearson

    viewer = make_napari_viewer()
    up = rescale(scratch[9, :64, :96].astype(np.float32), 2.0, order=1, preserve_range=True)
    layer = viewer.add_image(up, name="40x", scale=(0.3095, 0.3095))
    widget = StainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.controls.set_checkpoint("demo-stain-regression") is not None
    assert widget.run(layer)
    assert any("0.3095 um pixels" in m and "rescale to the checkpoint's pixel size" in m for m in notes.warnings())
    wait_done(qtbot, widget)
    plain = viewer.layers["Hoechst (virtual)"].data.reshape(up.shape)
    n_warnings = len(notes.warnings())
    widget.rescale.setChecked(True)
    assert widget.run(layer)
    wait_done(qtbot, widget)
    assert widget.runner.last_outcome == "done", notes.all()
    assert len(notes.warnings()) == n_warnings  # no warning once rescaling
    fixed = viewer.layers["Hoechst (virtual) [1]"]
    assert fixed.data.reshape(up.shape).shape == up.shape and fixed.metadata["rescaled_by"] == pytest.approx(0.5)
    np.testing.assert_allclose(fixed.scale[-2:], (0.3095, 0.3095))
    assert pearson(fixed.data.reshape(up.shape), plain) < 0.99  # a different (resampled) prediction, not a copy


def test_the_progress_bar_says_how_long_is_left_and_restarts_for_the_labels(stain_setup, monkeypatch):
    """After 10 s the bar adds the time left at the pace so far; a new phase (a big field's labels) starts afresh."""
    from napari_virtualstain._widgets import _base

    _, _, widget = stain_setup
    now = [30.0]
    monkeypatch.setattr(_base.time, "perf_counter", lambda: now[0])
    widget._phase_t0, widget._last_fraction = 0.0, 0.0  # as a run's start sets them
    widget._on_progress(0.5, "step 1/2")
    assert widget.progress_bar.format() == "%p%  step 1/2 · ~30 s left"
    now[0] = 31.0
    widget._on_progress(0.1, "labels · block 1/10")  # fraction fell: the labels phase, timed from now
    assert widget.progress_bar.format() == "%p%  labels · block 1/10"
    now[0] = 45.0
    widget._on_progress(0.5, "labels · block 5/10")
    assert widget.progress_bar.format() == "%p%  labels · block 5/10 · ~14 s left"
