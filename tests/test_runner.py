"""Files as Dask tasks: same pixels as an in-process run, a rerun skips what is written, a killed job continues
where it stopped, and a failing file is listed while the others are written."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main

pytest.importorskip("distributed")


@pytest.fixture()
def folder(shared_data, tmp_path):
    full = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")
    root = tmp_path / "fields"
    root.mkdir()
    for i, (t, x) in enumerate([(8, 0), (8, 200), (9, 0), (9, 200)]):  # held-out crops
        tifffile.imwrite(root / f"field{i}.tif", full[1, t, :64, x : x + 96])
    return root


def _done(err: str) -> list[str]:
    return re.findall(r"\] (\S+): done", err)


def test_tasks_give_the_same_pixels_skip_what_is_written_and_resume(folder, tiny_bundle_dir, tmp_path, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    base = ["predict", "-c", str(tiny_bundle_dir), str(folder)]
    assert main([*base, "-o", str(ref), "-q"]) == 0
    assert main([*base, "-o", str(out), "--workers", "2"]) == 0
    assert sorted(_done(capsys.readouterr().err)) == [f"field{i}.tif" for i in range(4)]
    for i in range(4):
        np.testing.assert_array_equal(tifffile.imread(out / f"field{i}_virtualstain.tif"),
                                      tifffile.imread(ref / f"field{i}_virtualstain.tif"))
        np.testing.assert_array_equal(tifffile.imread(out / f"field{i}_nuclei_labels.tif"),
                                      tifffile.imread(ref / f"field{i}_nuclei_labels.tif"))
    # a rerun does nothing; after "a kill" (two fields' outputs gone) it does exactly those two
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*base, "-o", str(out), "--workers", "2"]) == 0
    assert "skipped 4 file(s)" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    (out / "field1_virtualstain.tif").unlink()
    (out / "field3_nuclei_labels.tif").unlink()  # an incomplete field is redone too
    assert main([*base, "-o", str(out), "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 file(s)" in err and sorted(_done(err)) == ["field1.tif", "field3.tif"]
    assert (out / "field0_virtualstain.tif").stat().st_mtime_ns == stamps["field0_virtualstain.tif"]
    # other settings are other outputs: nothing is skipped
    assert main([*base, "-o", str(out), "--seed", "1", "-q"]) == 0
    assert "skipped" not in capsys.readouterr().err


def test_a_failing_file_is_listed_and_the_others_are_written(folder, tiny_bundle_dir, tmp_path, capsys):
    (folder / "broken.tif").write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "out"
    assert main(["predict", "-c", str(tiny_bundle_dir), str(folder), "-o", str(out), "--workers", "2",
                 "--retries", "1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 5 file(s) failed" in err and "broken.tif: broken.tif has shape" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*_virtualstain.tif")) == [f"field{i}_virtualstain.tif" for i in range(4)]
    assert not list(out.glob(".*.part"))


def test_an_unreachable_scheduler_is_one_clear_error(folder, tiny_bundle_dir, tmp_path, capsys, monkeypatch):
    import dask.distributed
    import distributed

    def refuse(*a, **k):
        raise OSError("Timed out trying to connect to tcp://127.0.0.1:1 after 20 s")

    for module in (distributed, dask.distributed):
        monkeypatch.setattr(module, "Client", refuse)
    assert main(["predict", "-c", str(tiny_bundle_dir), str(folder), "-o", str(tmp_path / "o"),
                 "--scheduler", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:1") and "Traceback" not in err
