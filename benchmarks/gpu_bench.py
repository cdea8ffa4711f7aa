"""GPU speed in one call (<= 5 minutes on one H100/H200): what a GPU user gets from the default demo bundle.

    python benchmarks/gpu_bench.py -o DIR                 # on a GPU machine
    python benchmarks/gpu_bench.py --smoke -o DIR         # toy scale on the CPU (a test runs this in CI)

On a bare GPU machine without diffusers and without a package index, carry the wheels that
``python scripts/gpu_train.py --prepare`` writes to ``.whl/`` (and ``gpu_data/`` for the real input), then:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=src:/tmp/site python3 benchmarks/gpu_bench.py -o $OUT --data-root gpu_data

Measured, each section timed with CUDA synchronisation, warm (the first call's set-up reported apart):
1. end to end: a 2048² real field (held-out ndev frames, mirrored) through ``predict_stain`` in bf16, with and
   without the labels (the labels run on the CPU);
2. tiles/s of each network of the bundle at several batch sizes, and the UNet's achieved FLOP/s (FLOPs counted by
   ``torch.utils.flop_counter``) against the card's dense bf16 peak;
3. k seeds as one batch (k = 1..8) vs k runs one by one;
4. ``torch.compile`` (default and CUDA graphs: mode "reduce-overhead") vs eager, compile time apart;
5. host <-> device transfer share of the end-to-end time.
Every section stops when the time budget is spent and says so in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import NDEV, mosaic  # noqa: E402 - the same real mosaic as the CPU benchmark

from napari_virtualstain.core.bundle import load_bundle  # noqa: E402
from napari_virtualstain.core.model import Denoiser, autocast_dtype  # noqa: E402
from napari_virtualstain.core.tasks.stain import predict_stain  # noqa: E402
from napari_virtualstain.core.settings import RunSettings

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "RTX 6000 Ada": 364.0, "A10": 125.0}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


class Clock:
    """Wall time of a block with the device drained before and after it."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn, repeats: int = 1) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / repeats


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def end_to_end(bundle, image, device, clock: Clock, repeats: int) -> dict:
    run = lambda labels: predict_stain(bundle, image, make_labels=labels,
                                       settings=RunSettings(device=str(device), batch_size=16))  # noqa: E731
    first = clock(lambda: run(False))
    no_labels = min(clock(lambda: run(False)) for _ in range(repeats))
    with_labels = clock(lambda: run(True))
    res = run(False)
    return {"image": list(image.shape), "first_call_s": round(first, 4), "seconds_no_labels": round(no_labels, 4),
            "seconds_with_labels": round(with_labels, 4), "network_passes": res.provenance["network_passes"],
            "num_tiles": res.provenance["num_tiles"], "precision": res.provenance["precision"], "batch_size": 16}


def network_flops(net, x, t) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x, t)
    return int(counter.get_total_flops())


def tile_throughput(bundle, device, clock: Clock, batch_sizes, tile: int, repeats: int, budget: Budget) -> dict:
    out = {}
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    nets = {"refinement": bundle.unet} | ({"mean": bundle.mean_unet} if bundle.config.anchored else {})
    for name, unet in nets.items():
        den = Denoiser(unet.to(device)).eval()
        cin = unet.in_channels
        flops_per_tile = network_flops(unet, torch.zeros(1, cin, tile, tile, device=device),
                                       torch.zeros(1, device=device))
        rows = []
        for bs in batch_sizes:
            if budget.left() < 5:
                rows.append({"batch_size": bs, "skipped": "time budget spent"})
                continue
            x = torch.randn(bs, cin, tile, tile, device=device)
            with torch.inference_mode():
                den(x, 0)
                s = clock(lambda: den(x, 0), repeats)
            tps = bs / s
            row = {"batch_size": bs, "tiles_per_s": round(tps, 2), "tflops": round(flops_per_tile * tps / 1e12, 3)}
            if peak:
                row["fraction_of_bf16_peak"] = round(flops_per_tile * tps / 1e12 / peak, 4)
            rows.append(row)
        out[name] = {"tile": tile, "in_channels": cin, "gflops_per_tile": round(flops_per_tile / 1e9, 3),
                     "precision": den.precision(), "by_batch": rows}
    out["bf16_peak_tflops"] = peak
    return out


def seed_batching(bundle, image, device, clock: Clock, ks, budget: Budget) -> list[dict]:
    one = clock(lambda: predict_stain(bundle, image, make_labels=False, samples=1,
                                      settings=RunSettings(device=str(device), batch_size=16)))
    rows = []
    for k in ks:
        if budget.left() < 10:
            rows.append({"k": k, "skipped": "time budget spent"})
            continue
        batched = clock(lambda: predict_stain(bundle, image, make_labels=False, samples=k,
                                              settings=RunSettings(device=str(device), batch_size=16 * k)))
        rows.append({"k": k, "one_batch_s": round(batched, 4), "one_by_one_s": round(k * one, 4),
                     "batched_over_one_seed": round(batched / one, 3)})
    return rows


def compiled(bundle, device, clock: Clock, batch: int, tile: int, repeats: int, modes, budget: Budget) -> dict:
    unet = bundle.unet.to(device)
    x = torch.randn(batch, unet.in_channels, tile, tile, device=device)
    t = torch.zeros(batch, device=device)
    dtype = autocast_dtype(device, None)

    def call(net):
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x, t).sample

    call(unet)
    rows = {"eager": {"tiles_per_s": round(batch / clock(lambda: call(unet), repeats), 2)}}
    for mode in modes:
        if budget.left() < 60:
            rows[mode] = {"skipped": "time budget spent"}
            continue
        try:
            net = torch.compile(unet, mode=None if mode == "default" else mode)
            t_compile = clock(lambda: call(net))
            call(net)
            rows[mode] = {"compile_s": round(t_compile, 2),
                          "tiles_per_s": round(batch / clock(lambda: call(net), repeats), 2)}
        except Exception as exc:  # a compiler that fails here is a result, not a crash of the benchmark
            rows[mode] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        torch._dynamo.reset()
    rows["batch_size"], rows["tile"] = batch, tile
    return rows


def transfer_share(image, bundle, device, clock: Clock, e2e_seconds: float) -> dict:
    """Host <-> device copies of one prediction: the input up, the noise up (drawn on the CPU so a seed gives the same
    pixels on any device: once per stochastic step), the output down."""
    n_out = len(bundle.config.output_channels)
    scheduler = bundle.make_scheduler()
    noise_uploads = len(scheduler.timesteps) if scheduler is not None else 0  # x_T + every step but the last
    host_in = torch.from_numpy(image.astype(np.float32))[None, None]
    host_noise = torch.randn(1, n_out, *image.shape)
    dev_out = torch.zeros(1, n_out, *image.shape, device=device)
    up = clock(lambda: host_in.to(device))
    noise = clock(lambda: host_noise.to(device)) * noise_uploads
    down = clock(lambda: dev_out.cpu())
    total = up + noise + down
    return {"upload_s": round(up, 5), "noise_upload_s": round(noise, 5), "noise_uploads": noise_uploads,
            "download_s": round(down, 5), "share_of_end_to_end": round(total / e2e_seconds, 4) if e2e_seconds else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, help="folder for gpu_bench.json")
    p.add_argument("--smoke", action="store_true", help="toy scale on the CPU (seconds): checks the code, not the GPU")
    p.add_argument("--checkpoint", default="demo-stain")
    p.add_argument("--data-root", default=None, help="folder holding ndev_scratch_assay/ (default ../shared/data)")
    p.add_argument("--budget-s", type=float, default=270, help="stop starting new measurements after this long")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("note: no CUDA GPU here; measuring the CPU (use --smoke for the quick check)", file=sys.stderr)
    clock = Clock(device)
    size, tile, repeats = (64, 32, 1) if args.smoke else (2048, 128, 5)
    batch_sizes = (1, 2) if args.smoke else (4, 16, 64, 256)
    ks = (1, 2) if args.smoke else (1, 2, 3, 4, 5, 6, 7, 8)
    data = Path(args.data_root) / "ndev_scratch_assay" / NDEV.name if args.data_root else NDEV
    image = mosaic(size, data) if data.exists() else None
    source = f"held-out ndev brightfield mirrored to {size}x{size}"
    if image is None:  # the network's speed does not depend on the content; the labels' does a little
        image = (np.random.default_rng(0).random((size, size)) * 4000).astype(np.uint16)
        source = f"random {size}x{size} (no ndev data at {data})"
    bundle = load_bundle(args.checkpoint)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "smoke": args.smoke, "torch": torch.__version__, "checkpoint": args.checkpoint, "input": source,
              "cuda": torch.version.cuda}
    t0 = time.perf_counter()
    report["end_to_end"] = end_to_end(bundle, image, device, clock, repeats)
    print("end to end:", report["end_to_end"], flush=True)
    report["tiles"] = tile_throughput(bundle, device, clock, batch_sizes, tile, repeats, budget)
    print("tiles:", json.dumps(report["tiles"]), flush=True)
    seeds_image = image[: size // 2, : size // 2]
    report["seeds"] = {"image": list(seeds_image.shape),
                       "rows": seed_batching(bundle, seeds_image, device, clock, ks, budget)}
    print("seeds:", report["seeds"], flush=True)
    modes = () if device.type == "cpu" else ("default", "reduce-overhead")
    report["compile"] = compiled(bundle, device, clock, batch_sizes[-1], tile, repeats, modes, budget)
    if device.type == "cpu":
        report["compile"]["note"] = "compile modes are measured on a GPU only (on this CPU: benchmarks/bench_speed.py)"
    print("compile:", report["compile"], flush=True)
    report["transfer"] = transfer_share(image, bundle, device, clock, report["end_to_end"]["seconds_no_labels"])
    print("transfer:", report["transfer"], flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        report["cuda_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'gpu_bench.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
