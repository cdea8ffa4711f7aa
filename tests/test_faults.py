"""Every fault a user can run into, in one list: each ends in one clear message (CLI ``error:`` line, napari
notification) and leaves the input untouched. Cases tested elsewhere are listed with their test (a test below checks
that each still exists); the rest are tested here. docs/faults.md says what each case gets."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_virtualstain.cli import main
from napari_virtualstain.core.settings import RunSettings

TESTS = Path(__file__).resolve().parent
FAULTS = {
    "RGB image": "test_inputs.py::test_rgb_for_grey_model_takes_the_luminance",
    "RGB layer in napari": "test_widgets.py::test_an_rgb_brightfield_layer_is_predicted_from_its_luminance",
    "stack without a plane": "test_cli.py::test_plane_errors_name_the_axes_and_their_advice_works",
    "NaN / Inf pixels": "test_inputs.py::test_non_finite_refused",
    "constant image": "test_inputs.py::test_constant_image_refused",
    "8/16/32-bit int and float input": "test_inputs.py::test_dtypes_give_same_prediction",
    "smaller than a tile": "test_inputs.py::test_image_smaller_than_a_tile",
    "smaller than 8 px": "test_inputs.py::test_too_small_refused",
    "wrong channel count": "test_inputs.py::test_channel_count_through_predict_stain",
    "truncated safetensors": "test_bundle.py::test_truncated_weights",
    "config missing keys": "test_bundle.py::test_config_missing_key",
    "pickle offered": "test_bundle.py::test_pickle_file_is_refused",
    "input layer deleted mid-run": "test_widgets.py::test_input_layer_deleted_mid_run",
    "viewer closed mid-run": "test_widgets.py::test_viewer_closed_mid_run",
    "cancel mid-step": "test_tiling.py::test_predict_stain_progress_and_cancel",
    "two runs at once": "test_widgets.py::test_one_run_at_a_time",
    "device out of memory": "test_faults.py::test_out_of_memory_retries_with_fewer_tiles_then_says_what_to_do",
    "disk full": "test_faults.py::test_full_disk_or_read_only_folder_is_one_error_and_no_file",
    "read-only output folder": "test_faults.py::test_full_disk_or_read_only_folder_is_one_error_and_no_file",
    "non-ASCII paths": "test_faults.py::test_non_ascii_paths",
    "output path that is a file or cannot be made": "test_faults.py::test_a_bad_output_path_is_refused_before_the_model_loads",
    "8192 x 8192 input": "test_faults.py::test_an_8192_field_is_planned_in_bounded_blocks",
    "labels image as input": "test_cli.py::test_a_labels_plane_given_to_predict_gets_a_warning",
    "pixel size of another objective": "test_cli.py::test_pixel_size_mismatch_warns_and_rescale_fixes_it",
    "a file failing on a Dask worker": "test_runner.py::test_a_failing_file_is_listed_and_the_others_are_written",
    "unreachable Dask scheduler": "test_runner.py::test_an_unreachable_scheduler_is_one_clear_error",
}


def test_every_listed_fault_has_its_test():
    for case, ref in FAULTS.items():
        module, name = ref.split("::")
        tree = ast.parse((TESTS / module).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"{case}: {ref} is gone"
    listed = (TESTS.parent / "docs" / "faults.md").read_text()
    assert all(case in listed for case in FAULTS), "docs/faults.md lists every case"


def test_out_of_memory_retries_with_fewer_tiles_then_says_what_to_do(tiny_bundle_dir):
    """A simulated CUDA out-of-memory: the tiles of a call are split until they fit; one tile that still does not
    fit ends in a message naming a smaller tile size."""
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.errors import VirtualStainError
    from napari_virtualstain.core.model import Denoiser
    from napari_virtualstain.core.tasks.stain import predict_stain

    image = (np.random.default_rng(0).random((60, 60)) * 1000).astype(np.uint16)
    bundle = load_bundle(tiny_bundle_dir)
    reference = predict_stain(bundle, image, make_labels=False, settings=RunSettings(batch_size=8))
    real_forward = Denoiser.forward

    def limited(limit):
        def forward(self, x, *a, **k):
            if x.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_forward(self, x, *a, **k)
        return forward

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Denoiser, "forward", limited(2))
        res = predict_stain(bundle, image, make_labels=False, settings=RunSettings(batch_size=8))
        assert res.provenance["oom_retries"] >= 1
        np.testing.assert_allclose(res.image, reference.image, rtol=1e-4, atol=1e-3)  # same tiles, same result
        # a device where not even one 32x32 tile fits, but a 16x16 one does: the message names 16, and 16 works
        def tile_limited(self, x, *a, **k):
            if x.shape[-1] > 16:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_forward(self, x, *a, **k)

        mp.setattr(Denoiser, "forward", tile_limited)
        with pytest.raises(VirtualStainError, match=r"even for one tile of 32x32 pixels; use a smaller tile size "
                                                    r"\(--tile-size 16\) or --device cpu"):
            predict_stain(bundle, image, make_labels=False, settings=RunSettings(batch_size=8))
        followed = predict_stain(bundle, image, make_labels=False,
                                 settings=RunSettings(batch_size=8, tile_size=16, tile_overlap=4))
        assert followed.image.shape[-2:] == image.shape


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"),
                                         (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied")])
def test_full_disk_or_read_only_folder_is_one_error_and_no_file(tiny_bundle_dir, tmp_path, capsys, monkeypatch,
                                                                 code, words):
    """The writer fails half-way (as a full disk does): one error line, and no file under either name."""
    path = tmp_path / "field.tif"
    tifffile.imwrite(path, (np.random.default_rng(0).random((40, 56)) * 1000).astype(np.uint16))
    real = tifffile.imwrite

    def failing(file, *a, **k):
        Path(file).write_bytes(b"II*\x00 half a file")
        raise OSError(code, "simulated")

    monkeypatch.setattr(tifffile, "imwrite", failing)
    out = tmp_path / "out"
    assert main(["predict", "-c", str(tiny_bundle_dir), str(path), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and words in err and "-o" in err and "Traceback" not in err
    assert list(out.iterdir()) == []  # neither the file nor its temporary part
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert main(["predict", "-c", str(tiny_bundle_dir), str(path), "-o", str(tmp_path / "elsewhere"), "-q"]) == 0


@pytest.mark.parametrize("command", ["predict", "demo"])
def test_a_bad_output_path_is_refused_before_the_model_loads(tiny_bundle_dir, tmp_path, capsys, monkeypatch, command):
    """-o naming a file, a path under a file, or a folder that cannot be written: one error line, exit 2, and the
    checkpoint is never opened (nothing computed)."""
    import napari_virtualstain.core.bundle as bundle_module

    field = tmp_path / "field.tif"
    tifffile.imwrite(field, (np.random.default_rng(0).random((40, 56)) * 1000).astype(np.uint16))
    opened = []
    real_load = bundle_module.load_bundle
    monkeypatch.setattr(bundle_module, "load_bundle", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    args = ["-c", str(tiny_bundle_dir)] + ([str(field)] if command == "predict" else [])
    for bad, words in ((field, "is a file"), (field / "sub", "a part of the path")):
        assert main([command, *args, "-o", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "-o" in err and "Traceback" not in err
    assert opened == []
    assert field.read_bytes()[:2] in (b"II", b"MM")  # the input is untouched


def test_non_ascii_paths(tiny_bundle_dir, tmp_path):
    folder = tmp_path / "Zellen_µm_細胞"
    folder.mkdir()
    tifffile.imwrite(folder / "Färbung.tif", (np.random.default_rng(0).random((40, 56)) * 1000).astype(np.uint16))
    out = tmp_path / "Ergebnis_ü"
    assert main(["predict", "-c", str(tiny_bundle_dir), str(folder), "-o", str(out), "-q"]) == 0
    assert (out / "Färbung_virtualstain.tif").is_file()


def test_an_8192_field_is_planned_in_bounded_blocks():
    """Checked on the plan, without running the network: memory is one block's canvas plus the output."""
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.tasks.stain import MAX_BLOCK, block_plan

    config = load_bundle("demo-stain").config
    plan = block_plan(config, 8192, 8192)
    assert plan is not None and plan.tile_size <= MAX_BLOCK and len(plan) >= (8192 // MAX_BLOCK) ** 2
    covered = np.zeros((8192, 8192), bool)
    for tl in plan.tiles:
        covered[tl.y : tl.y + plan.tile_size, tl.x : tl.x + plan.tile_size] = True
    assert covered.all()
