"""Prediction speed on this CPU: where a 1024² field's time goes, and what each lever buys — idle and with a core busy.

    python benchmarks/bench_speed.py --out benchmarks/results/cpu_speed.json [--size 1024] [--quick]

The input is real: held-out brightfield frames of the ndev scratch assay (t=8, 9; never trained on) mirrored into a
SIZE x SIZE mosaic. Every configuration runs in its own process (thread count and OpenMP's wait policy are fixed
when the OpenMP runtime starts) and times what a ``virtualstain predict`` of one file does after start-up: load the
bundle, read the image, predict every channel, make the labels, write the files. "busy": another process spins on
one core the whole time (a browser, a second job). Ratios are taken within this one run.

Also measured here: bf16 vs float32 on the held-out frames themselves (max |difference|, Hoechst Pearson r against
the real stain), and peak resident memory of a 4096² vs a 1024² field.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from napari_virtualstain.core.settings import RunSettings

NDEV = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"
HELD_OUT = (8, 9)


def mosaic(size: int, data: Path = NDEV) -> np.ndarray:
    """A size x size brightfield field from the held-out frames, mirrored alternately so neighbours meet seamlessly."""
    import tifffile

    frames = tifffile.imread(data)[1, list(HELD_OUT)]  # C1 = oblique transmitted light
    h, w = frames.shape[1:]
    rows = []
    for r in range(-(-size // h)):
        row = []
        for c in range(-(-size // w)):
            f = frames[(r + c) % len(frames)]
            f = f[::-1] if r % 2 else f
            row.append(f[:, ::-1] if c % 2 else f)
        rows.append(np.concatenate(row, axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:size, :size])


def _timed(fn, totals: dict, key: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
    return wrapper


def run_one(cfg: dict) -> dict:
    """One configuration in this process: a predict of ``cfg['image']`` as the CLI does it, with a time profile."""
    import napari_virtualstain  # noqa: F401 - as the CLI: the package before torch
    import torch

    from napari_virtualstain.core import sampling
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.io import read_image, write_channels, write_labels
    from napari_virtualstain.core.tasks import stain as stain_task

    totals: dict[str, float] = {}
    # profile hooks: network calls (mu and refinement), scheduler steps, label making; the rest of sampling is tiling
    orig_setup = sampling.setup_run

    def setup(*a, **k):
        run = orig_setup(*a, **k)
        for d in (run.denoiser, run.mean_denoiser):
            if d is None:
                continue
            if cfg.get("channels_last") is False and d.channels_last:  # the lever off: back to NCHW
                d.channels_last = False
                d.unet.to(memory_format=torch.contiguous_format)
            d.forward = _timed(d.forward, totals, "network")
        return run

    stain_task.setup_run = setup
    if cfg.get("threads") == "torch":  # torch's own default (one thread per core), as before auto threads
        sampling.use_threads = lambda requested=None: {"threads": torch.get_num_threads(), "threads_from": "torch"}
    stain_task.labels_from_channels = _timed(stain_task.labels_from_channels, totals, "labels")
    orig_make = None

    t_start = time.perf_counter()
    bundle = load_bundle(cfg["bundle"])
    orig_make = bundle.make_scheduler

    def make_scheduler(*a, **k):
        s = orig_make(*a, **k)
        if s is not None:
            s.step = _timed(s.step, totals, "scheduler_step")
        return s

    bundle.make_scheduler = make_scheduler
    t_loaded = time.perf_counter()
    image = read_image(cfg["image"])
    t_read = time.perf_counter()
    res = stain_task.predict_stain(bundle, image, make_labels=cfg.get("labels", True), input_name="bench",
                                   steps=cfg.get("steps"), samples=cfg.get("samples"), tta=cfg.get("tta"),
                                   settings=RunSettings(
                                       tile_size=cfg.get("tile_size"), tile_overlap=cfg.get("tile_overlap"),
                                       batch_size=cfg.get("batch_size", 4), half=cfg.get("half"),
                                       threads=None if cfg.get("threads") == "torch" else cfg.get("threads"),
                                       block_size=cfg.get("block_size")))
    t_pred = time.perf_counter()
    out = Path(cfg["out_dir"])
    write_channels(out / "bench_virtualstain.tif", res.image, res.channel_names, res.provenance,
                   bundle.config.pixel_size_um)
    for name, lab in res.labels.items():
        write_labels(out / f"bench_{name}_labels.tif", lab, res.provenance)
    t_end = time.perf_counter()
    sampling_s = t_pred - t_read - totals.get("labels", 0.0)
    return {
        **{k: v for k, v in cfg.items() if k not in ("image", "out_dir")},
        "seconds": round(t_end - t_start, 3),
        "profile": {
            "load_bundle": round(t_loaded - t_start, 3),
            "read_image": round(t_read - t_loaded, 3),
            "network": round(totals.get("network", 0.0), 3),
            "scheduler_step": round(totals.get("scheduler_step", 0.0), 3),
            "tiling_blending_normalising": round(sampling_s - totals.get("network", 0.0)
                                                 - totals.get("scheduler_step", 0.0), 3),
            "labels": round(totals.get("labels", 0.0), 3),
            "write_files": round(t_end - t_pred, 3),
        },
        "network_passes": res.provenance["network_passes"],
        "num_tiles": res.provenance["num_tiles"],
        "precision": res.provenance["precision"],
        "steps": res.provenance["steps"],
        "samples": res.provenance["samples"],
        "torch_threads": torch.get_num_threads(),
        "threads_from": res.provenance.get("threads_from"),
        "output_mb": round((res.image.nbytes + sum(v.nbytes for v in res.labels.values())) / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def worker(cfg: dict) -> dict:
    """Run ``cfg`` in a fresh process (its own OpenMP runtime and environment) and return its result."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}  # each configuration sets its own
    env.update({k: str(v) for k, v in cfg.get("env", {}).items()})
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env, capture_output=True,
                          text=True, timeout=cfg.get("timeout", 1800))
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {cfg}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class BusyCore:
    """Another process spinning on one core for as long as the context lasts."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


# (label, settings); "old default" is what main did before this benchmark: float32, NCHW, torch's own thread count
LEVERS = [
    ("old default: float32, NCHW, torch threads", dict(half=False, channels_last=False, threads="torch")),
    ("float32, NCHW, 1 thread", dict(half=False, channels_last=False, threads=1)),
    ("bf16, NCHW, 1 thread", dict(half=True, channels_last=False, threads=1)),
    ("bf16, channels-last, 1 thread", dict(half=True, channels_last=True, threads=1)),
    ("bf16, channels-last, 2 threads", dict(half=True, channels_last=True, threads=2)),
    ("bf16, channels-last, 2 threads, passive OpenMP wait", dict(half=True, threads=2,
                                                                 env={"OMP_WAIT_POLICY": "PASSIVE"})),
    ("bf16, channels-last, 1 thread, tile 256/32", dict(half=True, threads=1, tile_size=256, tile_overlap=32)),
    ("new default (auto)", dict()),
    ("new default, 4 samples in one batch", dict(samples=4)),
    ("new default, full 15-step chain", dict(steps=15)),
    ("regression baseline, new default", dict(bundle="demo-stain-regression")),
    ("regression baseline, old default", dict(bundle="demo-stain-regression", half=False, channels_last=False,
                                              threads="torch")),
]
BUSY = ["old default: float32, NCHW, torch threads", "bf16, channels-last, 2 threads",
        "bf16, channels-last, 2 threads, passive OpenMP wait", "bf16, channels-last, 1 thread", "new default (auto)",
        "regression baseline, new default", "regression baseline, old default"]
QUICK = ["float32, NCHW, 1 thread", "new default (auto)", "regression baseline, new default"]


def speed_runs(image: Path, out_dir: Path, levers, busy_labels, timeout: float) -> list[dict]:
    rows = []
    for busy in (False, True):
        for label, settings in levers:
            if busy and label not in busy_labels:
                continue
            cfg = {"bundle": "demo-stain", **settings, "label": label, "busy": busy, "image": str(image),
                   "out_dir": str(out_dir), "timeout": timeout}
            try:
                if busy:
                    with BusyCore():
                        row = worker(cfg)
                else:
                    row = worker(cfg)
            except subprocess.TimeoutExpired:
                row = {**cfg, "seconds": None, "note": f"killed after {timeout} s"}
            row.update(label=label, busy=busy)
            print(f"{'busy' if busy else 'idle'} | {label}: {row['seconds']} s", flush=True)
            rows.append(row)
    return rows


def precision_check(data: Path) -> dict:
    """bf16 vs float32 (and channels-last vs NCHW) on the held-out frames: max |difference| and Hoechst r."""
    import tifffile

    from napari_virtualstain.core import model
    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.metrics import pearson
    from napari_virtualstain.core.tasks.stain import predict_stain

    stack = tifffile.imread(data)
    default_layout = model.use_channels_last
    out = {}
    for name, steps in (("demo-stain", None), ("demo-stain", 15), ("demo-stain-regression", None)):
        key = name + ("" if steps is None else f" ({steps} steps)")
        rows = {}
        for t in HELD_OUT:
            preds = {}
            for label, half, cl in (("float32", False, False), ("float32 channels-last", False, True),
                                    ("bf16 channels-last", True, True)):
                model.use_channels_last = (lambda device: cl)  # a fresh bundle: the layout is set when it is wrapped
                res = predict_stain(load_bundle(name), stack[1, t], steps=steps, make_labels=False,
                                    settings=RunSettings(half=half, threads=1))
                preds[label] = res
            model.use_channels_last = default_layout
            ref = preds["float32"].channel("Hoechst")
            truth = stack[0, t].astype(np.float32)
            span = float(ref.max() - ref.min())
            rows[f"t{t}"] = {
                label: {"hoechst_r": round(float(pearson(r.channel("Hoechst"), truth)), 4),
                        "max_abs_diff_vs_float32": float(np.abs(r.image - preds["float32"].image).max()),
                        "max_abs_diff_hoechst_relative": float(np.abs(r.channel("Hoechst") - ref).max() / span)}
                for label, r in preds.items()
            }
        out[key] = rows
    return out


def memory_runs(out_dir: Path, runs: list[tuple[int, int | None]], timeout: float) -> list[dict]:
    """Peak resident memory, one process per (size, block size): the prediction alone (the canvas), and for the
    default blocks also with the labels (without test-time augmentation: it repeats each tile's passes in place)."""
    import tifffile

    rows = []
    for size, block in runs:
        image = out_dir / f"mosaic_{size}.tif"
        if not image.exists():
            tifffile.imwrite(image, mosaic(size))
        for labels in (False, True) if block is None else (False,):
            cfg = {"bundle": "demo-stain", "image": str(image), "out_dir": str(out_dir), "timeout": timeout,
                   "threads": 1, "labels": labels, "block_size": block, "tta": 1,  # TTA repeats a tile's passes:
                   # the same working memory, 8x the time
                   "label": f"memory {size}" + (f" block {block}" if block is not None else "")
                   + (" with labels" if labels else "")}
            row = worker(cfg)
            print(f"{cfg['label']}: peak RSS {row['peak_rss_mb']} MB, output {row['output_mb']} MB, "
                  f"{row['seconds']} s", flush=True)
            rows.append(row)
    return rows


def memory_ratios(rows: list[dict]) -> dict:
    """Each big run vs the smallest default run with the same labels setting: peak, and peak less the output itself
    (the goal: <= 1.2)."""
    out = {}
    for big in rows:
        small = next(r for r in rows if r["labels"] == big["labels"] and r.get("block_size") is None)
        if big is small:
            continue
        out[f"{big['label']} vs {small['label']}"] = {
            "peak_big_over_small": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "peak_big_minus_output_over_small": round((big["peak_rss_mb"] - big["output_mb"]) / small["peak_rss_mb"], 3)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--memory-runs", default="1024,4096,4096:0",
                        help="comma-separated SIDE[:BLOCK] for the memory runs (BLOCK: --block-size; '' skips)")
    parser.add_argument("--quick", action="store_true", help="three configurations, no busy runs, no memory runs")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: speed, precision, memory")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a configuration is given up")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return 0
    import tifffile
    import torch

    skip = set(filter(None, args.skip.split(",")))
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__},
              "input": f"held-out ndev brightfield t={HELD_OUT} mirrored into {args.size}x{args.size}"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = tmp / "field.tif"
        tifffile.imwrite(image, mosaic(args.size))
        if "speed" not in skip:
            levers = [lv for lv in LEVERS if not args.quick or lv[0] in QUICK]
            rows = speed_runs(image, tmp, levers, [] if args.quick else BUSY, args.timeout)
            report["runs"] = rows
            report["ratios"] = ratios(rows)
            print(json.dumps(report["ratios"], indent=1))
        if "precision" not in skip and not args.quick:
            report["precision"] = precision_check(NDEV)
            print(json.dumps(report["precision"], indent=1))
        sizes = [(int(v.split(":")[0]), int(v.split(":")[1]) if ":" in v else None)
                 for v in args.memory_runs.split(",") if v]
        if "memory" not in skip and sizes and not args.quick:
            report["memory"] = memory_runs(tmp, sizes, args.timeout)
            if len(sizes) >= 2:
                report["memory_ratio"] = memory_ratios(report["memory"])
                print(report["memory_ratio"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def ratios(rows: list[dict]) -> dict:
    """The goals' ratios from one run's rows."""
    def sec(label, busy=False):
        for r in rows:
            if r["label"] == label and r["busy"] == busy and r.get("seconds"):
                return r["seconds"]
        return None

    out = {}
    new, reg = sec("new default (auto)"), sec("regression baseline, new default")
    if new and reg:
        out["default_over_regression_idle"] = round(new / reg, 2)
    new_b, reg_b = sec("new default (auto)", True), sec("regression baseline, new default", True)
    if new_b and reg_b:
        out["default_over_regression_busy"] = round(new_b / reg_b, 2)
    if new and new_b:
        out["default_busy_over_idle"] = round(new_b / new, 2)
    old, old_b = sec("old default: float32, NCHW, torch threads"), sec("old default: float32, NCHW, torch threads", True)
    if old and new:
        out["old_over_new_idle"] = round(old / new, 2)
    if old_b and new_b:
        out["old_over_new_busy"] = round(old_b / new_b, 2)
    f32, bf, cl = sec("float32, NCHW, 1 thread"), sec("bf16, NCHW, 1 thread"), sec("bf16, channels-last, 1 thread")
    if f32 and bf:
        out["bf16_speedup_1_thread"] = round(f32 / bf, 2)
    if bf and cl:
        out["channels_last_speedup_bf16"] = round(bf / cl, 2)
    k4 = sec("new default, 4 samples in one batch")
    if k4 and new:
        out["four_samples_over_one"] = round(k4 / new, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
