"""bioimage.io export: the one-pass network as a spec-0.5 package that bioimageio.core validates and runs, giving
what napari-virtualstain predicts."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.metrics import pearson
from napari_virtualstain.core.settings import RunSettings

pytest.importorskip("bioimageio.core")


@pytest.fixture(scope="module")
def held_out(shared_data):
    return tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")[1, 9]


@pytest.mark.parametrize("name", ["demo-stain-regression", "demo-stain"])
def test_export_validates_and_runs_like_the_package(held_out, tmp_path, capsys, name):
    from bioimageio.core import load_description, predict

    from napari_virtualstain.core.tasks.stain import predict_stain

    test_image = tmp_path / "t9.tif"
    tifffile.imwrite(test_image, held_out[:, :300])
    out = tmp_path / f"{name}.zip"
    assert main(["export-bioimageio", name, "-o", str(out), "--test-image", str(test_image)]) == 0
    assert "bioimageio.core test: passed" in capsys.readouterr().out
    descr = load_description(out)
    assert [str(t.id) for t in descr.outputs] == ["stain", "probabilities"]
    assert descr.config.napari_virtualstain["bundle_id"] == load_bundle(name).id
    # another real crop, run by bioimageio.core: the prediction napari-virtualstain makes (one tile, float32)
    crop = held_out[:128, 300:428].astype(np.float32)
    sample = predict(model=descr, inputs={"brightfield": crop[None, None]})
    theirs = np.asarray(sample.members["stain"].data)[0, 0]
    bundle = load_bundle(name)
    if bundle.config.anchored:
        from napari_virtualstain.core.export import _mean_only

        bundle = _mean_only(bundle)
    ours = predict_stain(bundle, crop, make_labels=False, tta=1,
                         settings=RunSettings(half=False, tile_size=128, tile_overlap=0))
    assert pearson(theirs, ours.channel("Hoechst")) > 0.999
    np.testing.assert_allclose(theirs, ours.channel("Hoechst"), rtol=1e-3, atol=2.0)


def test_a_diffusion_only_checkpoint_is_refused_with_the_reason(tiny_bundle_dir, tmp_path, capsys):
    assert main(["export-bioimageio", str(tiny_bundle_dir), "-o", str(tmp_path / "x.zip"),
                 "--test-image", str(tmp_path / "none.tif")]) == 2
    err = capsys.readouterr().err
    assert "diffusion sampler cannot be expressed" in err and "regression or a mean-anchored" in err
