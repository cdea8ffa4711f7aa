"""``virtualstain train`` under torchrun: two CPU processes (gloo, DDP) give the weights one process gives at the
same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file

from napari_virtualstain.cli import main
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.model import build_unet

ARGS = ["--stain-names", "Hoechst", "--steps", "4", "--batch-size", "4", "--crop-size", "32", "--val-every", "4",
        "--channels", "8,16", "--tile-size", "32", "--tile-overlap", "8", "--precision", "float32", "--seed", "3"]


@pytest.fixture()
def data_folder(tmp_path):
    root = tmp_path / "data"
    for sub in ("input", "target"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):  # blobs: dark in the "brightfield", bright in the "stain"
        yy, xx = np.mgrid[:64, :80]
        blobs = sum(((yy - cy) ** 2 + (xx - cx) ** 2 < 25).astype(np.float32)
                    for cy, cx in rng.integers(8, 56, size=(6, 2)))
        tifffile.imwrite(root / "input" / f"f{i}.tif", (2000 + 30 * rng.standard_normal((64, 80)) - 500 * blobs)
                         .astype(np.uint16))
        tifffile.imwrite(root / "target" / f"f{i}.tif", (100 + 1000 * blobs).astype(np.uint16))
    return root


@pytest.mark.parametrize("objective", ["residual_shift", "regression"])
def test_two_processes_match_one_at_the_same_global_batch(data_folder, tmp_path, objective):
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(data_folder), "-o", str(single), "--objective", objective, *ARGS]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "napari_virtualstain.cli", "train", str(data_folder), "-o", str(double), "--objective", objective,
         *ARGS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("task=stain") == 1, "only rank 0 reports"
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert a.keys() == b.keys()
    # the initial weights (train seeds torch, then builds the UNet): how far training moved them, and how far apart
    # the two runs ended. Adam's first steps are ~lr * sign(gradient), so a gradient that is ~0 in one run's float
    # summation order and not in the other's may differ by up to 2 lr: compare whole updates, not single weights.
    torch.manual_seed(3)
    init = build_unet(load_bundle(single).config.unet).state_dict()
    moved = torch.sqrt(sum(((a[k] - init[k]) ** 2).sum() for k in a))
    apart = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    assert moved > 0 and apart < 0.02 * moved, (float(apart), float(moved))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 4 * 2e-4 * 4  # <= 2 lr per step, 4 steps
    logs = [json.loads((d / "training_log.json").read_text()) for d in (single, double)]
    assert logs[0][-1]["loss"] == pytest.approx(logs[1][-1]["loss"], rel=1e-4)  # the global batch's mean loss


def test_a_batch_that_does_not_split_evenly_is_refused():
    from napari_virtualstain.core.errors import VirtualStainError
    from napari_virtualstain.train.distributed import Ranks

    with pytest.raises(VirtualStainError, match="multiple of the number of processes"):
        Ranks(0, 3).part(8)
    assert Ranks(1, 2).part(8) == slice(4, 8)
