"""The Uncertainty widget on real data with a tiny bundle: maps, flags, thresholds, export, and the review panel's
decisions, edits and reopening."""

from __future__ import annotations

import numpy as np
import pytest
from gui_support import SCALE, layer_names, wait_done
from napari_virtualstain.core.settings import RunSettings

pytestmark = pytest.mark.gui


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
