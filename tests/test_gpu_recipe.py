"""The one-call GPU recipe (scripts/gpu_train.py) at toy scale on the CPU, and the time budget it relies on."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import pytest

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.train.loop import TrainOptions, budgeted_steps, learning_rate

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "scripts" / "gpu_train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_train"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_recipe_packs_every_demo_bundle(shared_data, tmp_path):
    gpu_train = _script()
    assert gpu_train.main(["--smoke", "-o", str(tmp_path / "out"), "--data-root", str(shared_data)]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8, "a remote run returns at most 8 files"
    assert "summary.json" in files and "demo-stain.tar" in files and "demo-nfkb.tar" in files
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["jobs"]) == {j.name for j in gpu_train.JOBS}
    for name in summary["jobs"]:
        with tarfile.open(tmp_path / "out" / f"{name}.tar") as tar:
            tar.extractall(tmp_path / "unpacked", filter="data")
        bundle = load_bundle(tmp_path / "unpacked" / name)
        assert bundle.id == summary["jobs"][name]["bundle_id"]
        assert bundle.state_dict[next(iter(bundle.state_dict))].dtype.is_floating_point
    assert load_bundle(tmp_path / "unpacked" / "demo-stain").config.anchored
    ddpm = load_bundle(tmp_path / "unpacked" / "demo-stain-ddpm").config
    assert ddpm.anchored and ddpm.objective == "ddpm"  # as the shipped DDPM: anchored on mu
    assert not (tmp_path / "out" / "work").exists()


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    assert _script().main(["--smoke", "-o", str(tmp_path / "o"), "--data-root", str(tmp_path)]) == 2
    assert "--prepare" in capsys.readouterr().err


def test_time_budget_sets_the_step_count_and_the_schedule_follows():
    opts = TrainOptions(steps=100_000, max_minutes=1.0, lr=1e-3, lr_schedule="cosine")
    total = budgeted_steps(opts, probed=20, seconds=2.0, start=0)  # 10 steps/s, 54 s usable -> ~520 steps
    assert 500 <= total <= 540 and opts.steps == total
    assert learning_rate(opts, total - 1) == pytest.approx(0.0, abs=1e-4)
    warm = min(100, total // 10)
    assert learning_rate(opts, warm + (total - warm) // 2) == pytest.approx(5e-4, rel=0.02)  # after the warm-up
