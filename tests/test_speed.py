"""The fast default paths (bf16 autocast, channels-last, threads matched to the free cores) against the float32
reference, and the GPU benchmark at toy scale on the CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.metrics import pearson
from napari_virtualstain.core.model import Denoiser, fast_bf16
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.threads import choose_threads, free_cores, usable_cores
from napari_virtualstain.core.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def held_out_crop(shared_data):
    """A held-out brightfield crop (t=9, never trained on) with its real Hoechst."""
    stack = tifffile.imread(shared_data / "ndev_scratch_assay" / "scratch-assay-labeled-10T-2Ch.tiff")
    return stack[1, 9, :160, 200:456], stack[0, 9, :160, 200:456]


def test_default_precision_matches_float32_on_a_real_crop(held_out_crop):
    """What a user gets by default (bf16 where the CPU is fast) is the float32 prediction to within what a user could see."""
    bf, truth = held_out_crop
    bundle = load_bundle("demo-stain")
    ref = predict_stain(bundle, bf, make_labels=False, settings=RunSettings(half=False))
    fast = predict_stain(bundle, bf, make_labels=False)
    assert ref.provenance["precision"] == "float32"
    assert fast.provenance["precision"] == ("bfloat16" if fast_bf16(torch.device("cpu")) else "float32")
    hoechst_ref, hoechst_fast = ref.channel("Hoechst"), fast.channel("Hoechst")
    span = float(hoechst_ref.max() - hoechst_ref.min())
    assert np.abs(hoechst_fast - hoechst_ref).mean() < 0.01 * span
    assert pearson(hoechst_fast, hoechst_ref) > 0.995
    assert abs(pearson(hoechst_fast, truth) - pearson(hoechst_ref, truth)) < 0.01


def test_channels_last_is_the_same_network():
    torch.manual_seed(0)
    bundle = load_bundle("demo-stain-regression")
    x = torch.randn(2, 1, 64, 64)
    nchw = Denoiser(bundle.unet, half=False, channels_last=False)(x, 0)
    nhwc = Denoiser(bundle.unet, half=False, channels_last=True)(x, 0)
    assert nhwc.is_contiguous() and nhwc.shape == nchw.shape
    torch.testing.assert_close(nhwc, nchw, rtol=1e-4, atol=1e-4)


def test_threads_follow_the_request_then_the_environment_then_the_free_cores(monkeypatch):
    assert choose_threads(3) == (3, "requested")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads() == (1, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    n, why = choose_threads()
    assert why == "free cores" and 1 <= n <= usable_cores()
    with pytest.raises(VirtualStainError, match="--threads 0"):
        choose_threads(0)


def test_a_busy_core_is_not_counted_as_free(monkeypatch):
    """Two /proc/stat samples: a core that was busy the whole time does not count."""
    from napari_virtualstain.core import threads

    samples = iter([{"cpu0": (100, 200), "cpu1": (100, 200)}, {"cpu0": (200, 300), "cpu1": (100, 300)}])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert free_cores() == 1


def test_a_cpu_run_records_its_threads(held_out_crop):
    res = predict_stain(load_bundle("demo-stain-regression"), held_out_crop[0][:64, :64], make_labels=False,
                        settings=RunSettings(threads=1))
    assert res.provenance["threads"] == 1 and res.provenance["threads_from"] == "requested"
    assert torch.get_num_threads() == 1


def test_gpu_bench_smoke_runs_on_the_cpu(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = mod
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "-o", str(tmp_path), "--data-root", str(shared_data)]) == 0
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["smoke"] and "held-out ndev" in report["input"]
    assert report["end_to_end"]["seconds_no_labels"] > 0
    assert report["tiles"]["mean"]["gflops_per_tile"] > 0 and report["tiles"]["refinement"]["by_batch"]
    assert [r["k"] for r in report["seeds"]["rows"]] == [1, 2]
    assert report["transfer"]["share_of_end_to_end"] is not None
    assert mod.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and mod.peak_tflops("NVIDIA H200") == 989.0


def test_big_fields_are_planned_in_blocks_without_running_a_network():
    from napari_virtualstain.core.tasks.stain import MAX_BLOCK, block_plan

    config = load_bundle("demo-stain").config
    assert block_plan(config, 2048, 2048) is None and block_plan(config, 4096, 4096, block_size=0) is None
    plan = block_plan(config, 4096, 4096)
    assert (plan.tile_size, len(plan)) == (912, 25)  # 8 x 8 tiles of 128/16 fill a 912² block exactly
    assert block_plan(config, 6000, 6000).tile_size == 912 and len(block_plan(config, 6000, 6000)) == 49
    big = block_plan(config, 8192, 8192)
    assert big.tile_size <= MAX_BLOCK and big.tile_size % 16 == 0 and big.padded_shape == (8192, 8192)
    assert block_plan(config, 4096, 4096, block_size=1408).tile_size == 1136  # the largest exact side <= 1408
    assert block_plan(config, 4096, 4096, block_size=1408, tiles=(256, 32)).tile_size == 1152  # 256 + 4 x 224
    with pytest.raises(VirtualStainError, match="block size 100 is too small"):
        block_plan(config, 4096, 4096, block_size=100)


def test_the_labels_of_a_big_field_come_block_by_block_with_progress_and_cancel(tiny_bundle_dir):
    """After the network, a blocked field's labels report 'labels · block j/n' and answer Cancel between blocks."""
    from napari_virtualstain.core.errors import Cancelled
    from napari_virtualstain.core.sampling import Progress

    bundle = load_bundle(tiny_bundle_dir)
    bf = np.random.default_rng(0).normal(500, 50, (520, 400)).astype(np.float32)
    events: list[Progress] = []
    res = predict_stain(bundle, bf, steps=1, settings=RunSettings(block_size=136, progress=events.append))
    labels = [e for e in events if e.phase == "labels"]
    assert events[-1] is labels[-1] and events.index(labels[0]) > 0  # after the network
    n = labels[0].num_blocks
    assert n > 1 and [e.block for e in labels] == list(range(n)) and labels[-1].done
    assert labels[-1].describe() == f"labels · block {n}/{n}" and res.labels["nuclei"].shape == bf.shape
    seen = []

    def cancel_in_labels() -> bool:
        return bool(seen) and seen[-1].phase == "labels"

    with pytest.raises(Cancelled):
        predict_stain(bundle, bf, steps=1, settings=RunSettings(block_size=136, progress=seen.append,
                                                                should_cancel=cancel_in_labels))
    assert [e.block for e in seen if e.phase == "labels"] == [0]  # stopped after the first labels block


def test_a_blocked_field_matches_the_whole_field_and_reports_its_blocks(held_out_crop):
    bf = np.concatenate([held_out_crop[0], held_out_crop[0][::-1]], axis=0)  # 320 x 256
    bundle = load_bundle("demo-stain")
    whole = predict_stain(bundle, bf, make_labels=False, settings=RunSettings(block_size=0))
    events = []
    blocked = predict_stain(bundle, bf, make_labels=False, settings=RunSettings(block_size=152, progress=events.append))
    assert "blocks" not in whole.provenance
    assert blocked.provenance["blocks"]["num_blocks"] > 1 and blocked.provenance["blocks"]["block_size"] <= 152
    assert blocked.image.shape == whole.image.shape
    assert pearson(blocked.channel("Hoechst"), whole.channel("Hoechst")) > 0.9
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    n = blocked.provenance["blocks"]["num_blocks"]
    assert {e.num_blocks for e in events} == {n} and events[-1].done and not events[0].done
    # what a person reads: the block, then the step within it (not blocks x steps run together)
    assert events[-1].describe().startswith(f"block {n}/{n} · step ")


def test_blocks_are_normalised_at_the_whole_fields_levels_from_the_raw_field():
    """A big field's blocks are normalised one by one from the caller's array (no float copy of the whole field is
    kept): each is exactly the block of the whole-field normalisation, reflections at the bottom/right edges included."""
    import torch

    from napari_virtualstain.core.normalize import as_float
    from napari_virtualstain.core.tasks.stain import _block_inputs, encode_inputs, input_levels
    from napari_virtualstain.core.tiling import TilePlan

    config = load_bundle("demo-stain").config
    field = np.random.default_rng(0).integers(0, 4000, (1, 300, 250)).astype(np.uint16)
    field[:, :, 125:] //= 8  # a dim half: block-local percentiles would brighten it
    plan = TilePlan(300, 250, 144, 64, 16)
    assert plan.padded_shape == (304, 256)  # the last row and column of blocks reach past the field
    whole = plan.pad(torch.from_numpy(encode_inputs(config, as_float(field)))[None])
    block = _block_inputs(config, field, input_levels(config, as_float(field)), torch.device("cpu"))
    for tl in plan.tiles:
        assert torch.equal(block(tl.y, tl.x, 144), whole[..., tl.y : tl.y + 144, tl.x : tl.x + 144])
