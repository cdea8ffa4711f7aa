"""OME-Zarr (NGFF) HCS plates in and out: the output mirrors the plate, each field equals a single-image predict of
that field, napari's OME-Zarr reader opens both, a rerun skips finished fields and redoes an unfinished one, and the
same plate runs as Dask tasks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main
from napari_virtualstain.core.ngff import NgffField, is_ngff, list_fields, read_field

pytest.importorskip("ome_zarr")

WELLS = ["A/1", "A/2", "B/1"]


def make_plate(path, full, wells=WELLS, fields=("0", "1")):
    """A tiny HCS plate from held-out scratch-assay crops: channels brightfield + Hoechst, 0.619 um pixels."""
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    root = zarr.open_group(str(path), mode="w")
    write_plate_metadata(root, ["A", "B"], ["1", "2"], list(wells), field_count=len(fields), name="tiny")
    k = 0
    for w in wells:
        group = root.require_group(w)
        write_well_metadata(group, list(fields))
        for f in fields:
            t, x0 = 8 + k % 2, 48 * (k % 6)
            k += 1
            img = np.stack([full[1, t, :64, x0 : x0 + 96], full[0, t, :64, x0 : x0 + 96]])
            channels = [{"label": n, "color": "FFFFFF", "active": True,
                         "window": {"min": 0, "max": 65535, "start": 0, "end": 65535}} for n in ("brightfield", "Hoechst")]
            write_image(img, group.require_group(f), axes="cyx", scale_factors=[], scale={"c": 1.0, "y": 0.5, "x": 0.5},
                        axes_units={"y": "micrometer", "x": "micrometer"}, omero={"channels": channels})
    return path


@pytest.fixture()
def plate(shared_data, tmp_path):
    full = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")
    return make_plate(tmp_path / "plate.zarr", full)


def test_fields_are_read_lazily_with_names_and_pixel_size(plate):
    assert is_ngff(plate) and not is_ngff(plate.parent)
    fields = list_fields(plate)
    assert [f.path for f in fields] == [f"{w}/{i}" for w in WELLS for i in ("0", "1")]
    fd = read_field(fields[0])
    assert type(fd.data).__module__.startswith("dask") and fd.data.shape == (2, 64, 96)
    assert fd.axes == "CYX" and fd.channel_names == ["brightfield", "Hoechst"] and fd.pixel_size_um == 0.5


def test_plate_in_plate_out_same_pixels_as_a_single_image_and_napari_opens_it(plate, tiny_bundle_dir, tmp_path,
                                                                              capsys):
    import zarr

    out = tmp_path / "out.zarr"
    assert main(["predict", "-c", str(tiny_bundle_dir), str(plate), "-o", str(out), "-q"]) == 0
    assert [f.path for f in list_fields(out)] == [f.path for f in list_fields(plate)]  # the plate mirrored
    field = NgffField(plate, "A/2/1")
    tifffile.imwrite(tmp_path / "field.tif", np.asarray(read_field(field).data[0]))  # its brightfield, by name
    assert main(["predict", "-c", str(tiny_bundle_dir), str(tmp_path / "field.tif"), "-o", str(tmp_path / "one"),
                 "--pixel-size", "0.5", "-q"]) == 0
    got = read_field(NgffField(out, "A/2/1"))
    assert got.channel_names == ["Hoechst", "nuclei boundary", "nuclei foreground"] and got.pixel_size_um == 0.5
    np.testing.assert_array_equal(np.asarray(got.data), tifffile.imread(tmp_path / "one" / "field_virtualstain.tif"))
    labels = np.asarray(read_field(NgffField(out, "A/2/1/labels/nuclei")).data)  # an NGFF labels image
    np.testing.assert_array_equal(labels, tifffile.imread(tmp_path / "one" / "field_nuclei_labels.tif"))
    prov = zarr.open_group(str(out / "A/2/1"), mode="r").attrs["virtualstain"]
    assert prov["input_field"] == "A/2/1" and prov["bundle_name"] == "tiny" and "settings_key" in prov

    napari_ome_zarr = pytest.importorskip("napari_ome_zarr")
    for store in (plate, out):
        layers = napari_ome_zarr.napari_get_reader(str(store))(str(store))
        assert layers and layers[0][2] == "image"


def test_rerun_skips_finished_fields_and_redoes_an_unfinished_one(plate, tiny_bundle_dir, tmp_path, capsys):
    import zarr

    out = tmp_path / "out.zarr"
    base = ["predict", "-c", str(tiny_bundle_dir), str(plate), "-o", str(out)]
    assert main([*base, "-q"]) == 0
    capsys.readouterr()
    assert main([*base, "-q"]) == 0
    assert "skipped 6 file(s)/field(s)" in capsys.readouterr().err
    group = zarr.open_group(str(out / "B/1/0"), mode="r+")
    del group.attrs["virtualstain"]  # as if the task was killed before its provenance (written last)
    assert main(base) == 0
    err, stdout = capsys.readouterr()
    assert "skipped 5" in stdout or "skipped 5" in err
    assert re.findall(r"wrote (\S+)", stdout + err) == [str(out / "B/1/0")]


def test_plate_fields_as_dask_tasks(plate, tiny_bundle_dir, tmp_path, capsys):
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    assert main(["predict", "-c", str(tiny_bundle_dir), str(plate), "-o", str(ref), "-q"]) == 0
    assert main(["predict", "-c", str(tiny_bundle_dir), str(plate), "-o", str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "6 of 6 file(s) written" in err and re.search(r"worker peak memory: \d+ MB \(largest of 2", err)
    for f in list_fields(ref):
        np.testing.assert_array_equal(np.asarray(read_field(NgffField(out, f.path)).data), np.asarray(read_field(f).data))


def test_bad_combinations_are_refused_with_what_to_do(plate, tiny_bundle_dir, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "x.tif", np.ones((32, 32), np.uint16))
    assert main(["predict", "-c", str(tiny_bundle_dir), str(plate), str(tmp_path / "x.tif"), "-o",
                 str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["predict", "-c", str(tiny_bundle_dir), str(plate), "-o", str(tmp_path / "o.zarr"),
                 "--uncertainty", "seeds", "--seeds", "2"]) == 2
    assert "export the fields to TIFF" in capsys.readouterr().err
    assert main(["phenotype", "--group", f"a={plate}", "-o", str(tmp_path / "p")]) == 2
    assert "OME-Zarr stores are read by 'virtualstain predict'" in capsys.readouterr().err
