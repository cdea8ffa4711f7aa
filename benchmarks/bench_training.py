"""Training speed: steps/s of one training step (forward + backward + AdamW) in float32, bf16 autocast, and bf16 in
channels-last layout.

    OMP_NUM_THREADS=1 python benchmarks/bench_training.py --out benchmarks/results/training_speed.json

Same UNet (one copy per mode, same initial weights), same random batches, the modes interleaved (``--repeats``
rounds) so machine noise hits all of them.
"""

from __future__ import annotations

import argparse
import copy
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
    x = torch.randn(args.batch, 1, args.crop, args.crop)
    y = torch.randn(args.batch, 5, args.crop, args.crop)
    modes = {}
    for name, bf16, layout in (("float32", False, torch.contiguous_format), ("bf16", True, torch.contiguous_format),
                               ("bf16 channels-last", True, torch.channels_last)):
        net = copy.deepcopy(unet).to(memory_format=layout)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        xi = x.contiguous(memory_format=layout)
        time_steps(net, opt, xi, y, 1, bf16)  # warm-up
        modes[name] = (net, opt, xi, bf16)
    rounds = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, (net, opt, xi, bf16) in modes.items():
            rounds[name].append(time_steps(net, opt, xi, y, args.steps, bf16))
    best = {k: min(v) for k, v in rounds.items()}
    result = {
        "unet": list(widths), "crop": args.crop, "batch": args.batch, "threads": torch.get_num_threads(),
        "cpu_bf16_fast": fast_bf16(torch.device("cpu")), "seconds_per_step": rounds,
        "best_seconds_per_step": best, "bf16_speedup": best["float32"] / best["bf16"],
        "channels_last_speedup_bf16": best["bf16"] / best["bf16 channels-last"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
