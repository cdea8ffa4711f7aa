"""napari widgets on real data (a crop of the ndev scratch assay) with tiny untrained bundles, under pytest-xvfb.

What they pin down: the widgets call the same core as the CLI (identical arrays for the same seed), outputs overlay
the input (scale/translate), carry provenance, the input layer is never modified, Cancel adds nothing, one run at a
time, and every bad input ends as a notification, never a traceback or a half-made layer."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from gui_support import SCALE, layer_names, wait_done
from napari_virtualstain.core.settings import RunSettings

pytestmark = pytest.mark.gui


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
    # residual shift: 1 to its trained chain (0: a mean-anchored one's mean network alone), defaulting to the count
    # the checkpoint was validated with
    cfg = controls.bundle.config
    assert controls.steps.isEnabled() and controls.steps.maximum() == cfg.scheduler["num_train_timesteps"]
    assert controls.steps.minimum() == (0 if cfg.anchored else 1)
    assert controls.steps.value() == cfg.sampling.get("steps", cfg.scheduler["num_train_timesteps"])
    assert widget.samples.value() == cfg.sampling.get("samples", 1) and widget.samples.isEnabled()
    assert widget.labels_from.currentText() == cfg.sampling.get("labels_from", "boundaries")
    # uncertainty: step maps need the whole chain, whatever the fast predict default is
    from napari_virtualstain._widgets.uncertainty import UncertaintyWidget

    unc = UncertaintyWidget(viewer).controls
    assert unc.steps.value() == cfg.scheduler["num_train_timesteps"] and unc.steps.minimum() == 1
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
