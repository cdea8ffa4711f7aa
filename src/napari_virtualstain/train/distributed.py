"""Multi-process training on torch's own engine: ``torchrun`` starts the processes, DDP averages the gradients.

    torchrun --standalone --nproc-per-node 2 -m napari_virtualstain.cli train DATA -o OUT ...   # gloo on CPU
    torchrun --nproc-per-node 8 -m napari_virtualstain.cli train DATA -o OUT ...                # NCCL, a GPU each

Nothing here starts or manages processes. Every rank draws the same *global* batch (crops, timesteps and noise
from the same seeded generators) and trains on its slice of it; DDP's gradient average over equal slices is the
gradient of the global batch's mean loss, so N processes give the same weights as one process at the same global
``--batch-size`` (up to float summation order; tests/test_distributed.py). Only rank 0 validates, saves and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.errors import VirtualStainError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's slice of a global batch of ``n`` (equal slices: ``n`` must divide)."""
        if n % self.world:
            raise VirtualStainError(f"--batch-size {n} must be a multiple of the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)


SINGLE = Ranks()
_current = SINGLE


def current() -> Ranks:
    return _current


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on CUDA); a plain run is a world of one."""
    global _current
    if not launched_by_torchrun():
        _current = SINGLE
        return SINGLE, device
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _current = ranks
    return ranks, device


def wrap(unet: torch.nn.Module, ranks: Ranks, device: torch.device) -> torch.nn.Module:
    """DDP around the network being trained (the plain network in a world of one)."""
    if ranks.world == 1:
        return unet
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)


def shard(batch: tuple, ranks: Ranks) -> tuple:
    """This rank's slice of every tensor of a global batch."""
    if ranks.world == 1:
        return batch
    part = ranks.part(batch[0].shape[0])
    return tuple(t[part] for t in batch)


def draw_noise(num_timesteps: int, shape: tuple[int, ...], generator: torch.Generator):
    """Timesteps and noise for a local batch of ``shape``, drawn for the global batch and sliced, so every rank's
    draws are exactly the ones one process would make at the global batch size."""
    ranks = current()
    b = shape[0]
    t = torch.randint(0, num_timesteps, (b * ranks.world,), generator=generator)
    noise = torch.randn((b * ranks.world, *shape[1:]), generator=generator)
    part = slice(ranks.rank * b, (ranks.rank + 1) * b)
    return t[part], noise[part]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The global batch's mean loss (for the log), from each rank's mean over its slice."""
    ranks = current()
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    v = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return float(v.item()) / ranks.world


def agree(value: int, device: torch.device) -> int:
    """Rank 0's value everywhere (e.g. a step budget measured on each rank's own clock)."""
    ranks = current()
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    v = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(v, src=0)
    return int(v.item())


def barrier() -> None:
    if current().world > 1:
        import torch.distributed as dist

        dist.barrier()


TEARDOWN_TIMEOUT_S = 30.0


def teardown() -> None:
    """Leave the process group. ``destroy_process_group`` now and then never returns on one rank even after a barrier
    (pytorch/pytorch#75097; seen here about once in four 2-process CPU runs), so it runs in a daemon thread that is
    given up on after ``TEARDOWN_TIMEOUT_S``: the work is done and written by then, and the process is about to exit."""
    global _current
    if current().world > 1:
        import threading

        import torch.distributed as dist

        if dist.is_initialized():
            done = threading.Thread(target=dist.destroy_process_group, daemon=True)
            done.start()
            done.join(TEARDOWN_TIMEOUT_S)
    _current = SINGLE


def exit_now(code: int = 0) -> None:
    """End a torchrun rank without the interpreter's shutdown, which can block on the process group's threads (the
    same hang as above); standard streams are flushed first."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
