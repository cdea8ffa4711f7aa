"""Engine speed, measured in one run on the same machine (report ratios; absolute times depend on the machine).

1. residual shift (15 steps) vs DDPM (1000 steps, diffusers' DDPMScheduler) on the same UNet and the same image,
   both through the same sampler loop;
2. a large tiled prediction (default 2048x2048) with the demo-sized UNet: wall time and peak resident memory.

    python benchmarks/bench_sampling.py [--device cpu] [--size 2048] [--ddpm-steps 1000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

from napari_virtualstain.core.bundle import Bundle, BundleConfig, ChannelSpec
from napari_virtualstain.core.model import Denoiser, build_unet, default_unet_config, pick_device
from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
from napari_virtualstain.core.sampling import make_generators, sample
from napari_virtualstain.core.schedulers import ResidualShiftScheduler
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.tiling import TilePlan
from napari_virtualstain.core.settings import RunSettings


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_steps(device: torch.device, size: int, ddpm_steps: int, widths) -> dict:
    torch.manual_seed(0)
    unet = build_unet(default_unet_config(2, 1, size, widths)).to(device).eval()
    denoiser = Denoiser(unet)
    cond = torch.randn(1, 1, size, size, device=device)
    plan = TilePlan(size, size, size, 0, 8)
    results = {}
    for name, scheduler, start in (
        ("residual_shift", ResidualShiftScheduler(), None),
        ("ddpm", DDPMScheduler(num_train_timesteps=1000), None),
    ):
        gens = make_generators([0])
        if name == "ddpm":
            scheduler.set_timesteps(ddpm_steps)
            x = torch.randn(1, 1, size, size, generator=gens[0]).to(device)
        else:
            x = scheduler.prior_sample(cond, generator=gens)
        t0 = time.perf_counter()
        sample(denoiser, scheduler, x, plan, gens, condition=cond)
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = {"steps": len(scheduler.timesteps), "seconds": time.perf_counter() - t0}
    results["ratio_ddpm_over_residual_shift"] = results["ddpm"]["seconds"] / results["residual_shift"]["seconds"]
    results["image"] = f"{size}x{size}"
    return results


def bench_large(device: torch.device, size: int, tile: int, overlap: int, batch: int, widths) -> dict:
    outs = [ChannelSpec("stain", "stain", FixedNorm(0.0, 1.0)), ChannelSpec("nuclei boundary", "boundary", FixedNorm(0.0, 1.0), "nuclei")]
    unet_cfg = default_unet_config(1 + len(outs), len(outs), tile, widths)
    config = BundleConfig("bench", "stain", "residual_shift", [ChannelSpec("brightfield", "input", PercentileNorm())],
                          outs, unet_cfg, dict(ResidualShiftScheduler().config), tile, overlap)
    unet = build_unet(unet_cfg)
    bundle = Bundle(config, unet.state_dict(), None, "bench")
    image = (np.random.default_rng(0).random((size, size)) * 4000).astype(np.uint16)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    res = predict_stain(bundle, image, make_labels=False, settings=RunSettings(device=str(device), batch_size=batch))
    seconds = time.perf_counter() - t0
    return {
        "image": f"{size}x{size}", "tile": tile, "overlap": overlap, "batch_size": batch,
        "num_tiles": res.provenance["num_tiles"], "steps": res.provenance["steps"], "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(), "peak_rss_before_mb": rss0,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--step-size", type=int, default=128, help="image size for the 15 vs 1000 steps comparison")
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--size", type=int, default=2048, help="image size for the tiled benchmark (0 to skip)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--widths", default="16,32,64,128")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    widths = tuple(int(w) for w in args.widths.split(","))
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "python": sys.version.split()[0], "unet_widths": list(widths)}
    report["steps_comparison"] = bench_steps(device, args.step_size, args.ddpm_steps, widths)
    print(json.dumps(report["steps_comparison"], indent=1), flush=True)
    if args.size:
        report["tiled"] = bench_large(device, args.size, args.tile, args.overlap, args.batch_size, widths)
        print(json.dumps(report["tiled"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
