"""Invariant channels of a class-conditional model (issue 11): DNA conditions the network and is never generated, so a
translation keeps exactly the source's nuclei and only the variable channel moves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_virtualstain.core.bundle import BundleConfig, load_bundle
from napari_virtualstain.core.errors import BundleError, VirtualStainError
from napari_virtualstain.core.tasks.classcond import synthesize, translate
from napari_virtualstain.train.classcond_data import load_classcond_config

from conftest import train_two_class
from conftest import two_class_field as _field


def _inside_over_ring(img: np.ndarray) -> float:
    """Mean signal on the DNA spots over the mean signal in a ring around them (a nuclear/cytoplasmic ratio)."""
    from scipy import ndimage as ndi

    spots = img[1] > 100
    ring = ndi.binary_dilation(spots, iterations=4) & ~ndi.binary_dilation(spots, iterations=1)
    return float(img[0][spots].mean() / img[0][ring].mean())


@pytest.fixture(scope="module")
def invariant(tmp_path_factory):
    """A tiny model trained to generate 'signal' given the real 'DNA' channel (DNA listed second, as in the files)."""
    return train_two_class(tmp_path_factory.mktemp("inv"), "tiny-inv", invariant=["DNA"])


def test_bundle_keeps_the_image_order_and_conditions_on_the_invariant_channel(invariant):
    c = load_bundle(invariant.path).config
    assert c.output_names == ["signal"] and c.input_names == ["DNA"] and c.invariant_names == ["DNA"]
    assert c.image_names == ["signal", "DNA"]
    assert c.unet["in_channels"] == 2 and c.unet["out_channels"] == 1
    assert c.input_channels[0].normalization.to_dict()["method"] == "fixed"
    raw = c.to_dict()
    raw["image_channels"] = ["signal", "RNA"]
    with pytest.raises(BundleError, match="image_channels"):
        BundleConfig.from_dict(raw)


def test_translation_keeps_the_dna_exactly_and_moves_the_signal(invariant):
    img = _field("N", 98, (32, 40))
    res = translate(invariant, img, "N", "C", steps=30)
    assert res.channel_names == ["signal", "DNA"] and res.translated.shape == img.shape
    np.testing.assert_array_equal(res.translated[1], img[1])  # bit-identical: never inverted or generated
    np.testing.assert_array_equal(res.control[1], img[1])
    np.testing.assert_array_equal(res.difference[1], 0)
    assert res.provenance["invariant_channels"] == ["DNA"]
    # the class effect lands on the given spots: nuclear signal (N) -> ring signal (C)
    assert _inside_over_ring(res.translated) < _inside_over_ring(res.control) - 0.2


def test_synthesis_needs_the_invariant_channel_and_keeps_it(invariant):
    dna = _field("C", 5, (24, 40))[1]
    with pytest.raises(VirtualStainError, match="given DNA: give the DNA image"):
        synthesize(invariant, "C", 1, steps=2)
    res = synthesize(invariant, "C", 2, steps=8, condition=dna)
    assert res.images.shape == (2, 2, 24, 40) and res.channel_names == ["signal", "DNA"]
    np.testing.assert_array_equal(res.images[:, 1], np.broadcast_to(dna, (2, 24, 40)))
    assert res.provenance["size"] == [24, 40]


def test_config_and_cli_name_the_invariant_channels(invariant, tmp_path, capsys):
    import tifffile

    from napari_virtualstain.cli import main

    cfg = {"task": "classcond", "name": "x", "channels": ["signal", "DNA"], "invariant": ["RNA"],
           "images": [{"class": "N", "image": str(tmp_path / "n.tif")}]}
    tifffile.imwrite(tmp_path / "n.tif", _field("N", 1))
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(VirtualStainError, match="invariant channel.*RNA.*signal, DNA"):
        load_classcond_config(tmp_path / "c.json")
    (tmp_path / "c2.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "invariant"}))
    rc = main(["train", str(tmp_path / "c2.json"), "-o", str(tmp_path / "b"), "--invariant", "signal,DNA"])
    assert rc == 2 and "leave at least one channel" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "dna.tif", _field("N", 2, (16, 24))[1])
    rc = main(["synthesize", "-c", str(invariant.path), "--class", "N", "-n", "1", "--steps", "2",
               "--condition", str(tmp_path / "dna.tif"), "-o", str(tmp_path / "syn"), "-q"])
    assert rc == 0
    with tifffile.TiffFile(tmp_path / "syn" / "N_samples.tif") as tf:
        assert tf.asarray().shape[-3:] == (2, 16, 24) and tf.imagej_metadata["Labels"] == ["signal", "DNA"]


def test_translation_defaults_come_from_the_bundles_validated_sampling(invariant, tmp_path):
    import shutil

    folder = tmp_path / "with-defaults"
    shutil.copytree(invariant.path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sampling"] = {"guidance": 2.0, "strength": 0.5}
    (folder / "config.json").write_text(json.dumps(cfg))
    bundle = load_bundle(folder)
    img = _field("N", 3, (16, 16))
    res = translate(bundle, img, "N", "C", steps=4)
    assert res.provenance["guidance_scale"] == 2.0 and res.provenance["strength"] == 0.5
    res = translate(bundle, img, "N", "C", steps=4, guidance=1.0, strength=1.0)  # the user's choice wins
    assert res.provenance["guidance_scale"] == 1.0 and res.provenance["strength"] == 1.0
    cfg["sampling"] = {"strength": 2}
    with pytest.raises(BundleError, match="sampling.strength"):
        BundleConfig.from_dict(cfg)
