"""Virtual stain widget with 'confidence per nucleus': the labels layer carries the CLI's table as features, is
coloured by confidence, hides doubtful nuclei on request (labels untouched) and steps through them."""

from __future__ import annotations

import numpy as np
import pytest

from gui_support import wait_done

pytestmark = pytest.mark.gui


def test_confidence_per_nucleus_features_colour_hide_and_step(make_napari_viewer, qtbot, scratch, notes):
    from napari.utils.colormaps import DirectLabelColormap

    from napari_virtualstain._widgets import StainWidget
    from napari_virtualstain._widgets.review import camera_of
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.confidence import nucleus_table, predict_ensemble

    viewer = make_napari_viewer()
    field = np.ascontiguousarray(scratch[9, 40:168, 100:292])
    layer = viewer.add_image(field, name="Brightfield", scale=(0.619, 0.619))
    widget = StainWidget(viewer)
    assert widget.controls.set_checkpoint("demo-stain-regression") is not None
    widget.controls.set_input_layer(layer)
    widget.confidence.setChecked(True)
    assert widget.interval.isEnabled()  # the shipped demo is calibrated (calibration.json in its folder)
    widget.interval.setChecked(True)
    assert widget.run()
    wait_done(qtbot, widget, timeout=60000)
    assert widget.runner.last_outcome == "done", notes.all()
    low, high = viewer.layers["Hoechst low 90% (virtual)"], viewer.layers["Hoechst high 90% (virtual)"]
    assert not low.visible and (np.asarray(high.data) >= np.asarray(low.data)).all()
    nuclei = viewer.layers["nuclei (virtual)"]
    table = nuclei.features
    bundle = load_bundle("demo-stain-regression")
    ens = predict_ensemble(bundle, field, 4, labels_from=bundle.config.sampling.get("labels_from"))
    rows = nucleus_table(ens, "nuclei", "Hoechst")
    assert len(rows) >= 3 and list(table["index"]) == [r["label"] for r in rows]  # the CLI's table, same numbers
    np.testing.assert_allclose(table["confidence"], [r["confidence"] for r in rows], atol=1e-3)
    # both boxes ticked: each nucleus also carries the calibrated interval of its mean Hoechst
    assert (table["Hoechst_low_90"] < table["mean_Hoechst"]).all()
    assert (table["mean_Hoechst"] < table["Hoechst_high_90"]).all()
    assert isinstance(nuclei.colormap, DirectLabelColormap) and not widget.confidence_row.isHidden()
    labels_before = np.array(nuclei.data)
    widget.hide_below.setValue(100)  # everything below confidence 1 goes transparent
    doubtful = [r["label"] for r in rows if r["confidence"] < 1.0]
    assert all(nuclei.colormap.color_dict[i][3] == 0 for i in doubtful)
    assert np.array_equal(nuclei.data, labels_before)  # hiding recolours; the labels stay
    first = widget.step_doubtful()
    assert first["confidence"] == min(r["confidence"] for r in rows)
    cy, cx = first["centroid_y"] * 0.619, first["centroid_x"] * 0.619
    np.testing.assert_allclose(camera_of(viewer).center[-2:], (cy, cx), atol=1e-3)
    assert widget.step_doubtful()["confidence"] >= first["confidence"]
    assert not notes.errors()


def test_every_dock_widget_fits_a_laptop_screen(make_napari_viewer):
    """1366 x 768: every dock widget (and two docked together) can shrink under the screen's height; the rest
    scrolls instead of pushing the buttons or the review panel off-screen."""
    from napari_virtualstain import _widgets

    viewer = make_napari_viewer()
    heights = {}
    for cls in (_widgets.StainWidget, _widgets.UncertaintyWidget, _widgets.TranslateWidget,
                _widgets.SynthesizeWidget, _widgets.TrainWidget):
        w = cls(viewer)
        heights[cls.__name__] = w.minimumSizeHint().height()
    assert all(h <= 300 for h in heights.values()), heights
    assert heights["StainWidget"] + heights["UncertaintyWidget"] <= 768 - 150  # menus, title bar, layer list


def test_compare_with_the_real_stain_in_one_click(make_napari_viewer, qtbot, scratch, tiny_bundle_dir, notes):
    from napari_virtualstain._widgets import StainWidget

    viewer = make_napari_viewer()
    bf = viewer.add_image(np.ascontiguousarray(scratch[9, :48, :64]), name="Brightfield")
    widget = StainWidget(viewer)
    widget.controls.set_checkpoint(tiny_bundle_dir)
    widget.controls.set_input_layer(bf)
    assert not widget.compare_button.isEnabled()
    assert widget.run()
    wait_done(qtbot, widget)
    assert widget.compare_button.isEnabled()
    assert not widget.compare()  # no real stain open yet: a notification that says what to open
    assert any("No real Hoechst layer" in m for m in notes.errors())
    real = viewer.add_image(np.ones((48, 64), np.float32), name="Hoechst (real)", colormap="gray")
    assert widget.compare()
    virtual = viewer.layers["Hoechst (virtual)"]
    assert real.colormap.name == "magenta" and virtual.colormap.name == "cyan"
    assert real.blending == virtual.blending == "additive" and not bf.visible
    assert viewer.layers["nuclei (virtual)"].contour == 1


def test_a_second_uncertainty_run_replaces_its_layers_instead_of_stacking_duplicates(make_napari_viewer, qtbot,
                                                                                    scratch, tiny_bundle_dir, notes):
    from napari_virtualstain._widgets import UncertaintyWidget

    viewer = make_napari_viewer()
    bf = viewer.add_image(np.ascontiguousarray(scratch[9, :48, :64]), name="Brightfield")
    widget = UncertaintyWidget(viewer)
    widget.controls.set_checkpoint(tiny_bundle_dir)
    widget.controls.set_input_layer(bf)
    names = []
    for seed in (1, 2):
        widget.controls.seed.setValue(seed)
        assert widget.run()
        wait_done(qtbot, widget)
        assert widget.runner.last_outcome == "done", notes.all()
        names.append([la.name for la in viewer.layers])
    assert names[0] == names[1] and not any("[1]" in n for n in names[1])  # replaced, not stacked
    assert viewer.layers["Hoechst (virtual)"].metadata["seed"] == 2  # ... with the second run's provenance
