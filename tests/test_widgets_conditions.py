"""Translate condition and Synthesize on real crops (NF-kB wells, H&E tiles) with tiny untrained class-conditional
bundles: layers, control, difference map, the class a layer carries, invariant channels, RGB checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
from gui_support import layer_names, wait_done
from napari_virtualstain.core.settings import RunSettings

pytestmark = pytest.mark.gui


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
    # the widget's batch size: under bf16 with several threads the rounding depends on it (that a sample's seed
    # does not is tests/test_classcond.py's, in float32)
    expected = synthesize(get_bundle(tiny_classcond_dir), "A12", 3, seed=7, steps=3, size=32,
                          settings=RunSettings(batch_size=2))
    for c, name in enumerate(layer_names(viewer)):
        out = viewer.layers[name]
        assert out.data.shape == (3, 32, 32)
        # sample i uses seed 7 + i
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
