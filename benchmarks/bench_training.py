"""Training speed: steps/s of one training step (forward + backward + AdamW) in float32 vs bf16 autocast.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --out benchmarks/results/training_speed.json

Same UNet, same random batches, the two precisions interleaved (``--repeats`` rounds) so machine noise hits both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from napari_virtualstain.core.model import build_unet, default_unet_config, fast_bf16


def time_steps(unet, opt, x, y, n: int, bf16: bool) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(x, torch.zeros(x.shape[0], dtype=torch.long)).sample
            loss = F.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", default="32,64,128,128")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    widths = tuple(int(v) for v in args.channels.split(","))
    cfg = default_unet_config(1, 5, args.crop, widths)
    unet = build_unet(cfg).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(args.batch, 1, args.crop, args.crop)
    y = torch.randn(args.batch, 5, args.crop, args.crop)
    time_steps(unet, opt, x, y, 1, False)
    time_steps(unet, opt, x, y, 1, True)
    rounds = {"float32": [], "bf16": []}
    for _ in range(args.repeats):
        for name in rounds:
            rounds[name].append(time_steps(unet, opt, x, y, args.steps, name == "bf16"))
    best = {k: min(v) for k, v in rounds.items()}
    result = {
        "unet": list(widths), "crop": args.crop, "batch": args.batch, "threads": torch.get_num_threads(),
        "cpu_bf16_fast": fast_bf16(torch.device("cpu")), "seconds_per_step": rounds,
        "best_seconds_per_step": best, "bf16_speedup": best["float32"] / best["bf16"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
