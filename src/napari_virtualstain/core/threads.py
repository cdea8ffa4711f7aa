"""CPU threads matched to the cores that are free right now.

Torch's default (one intra-op thread per core) is fastest on an idle machine and slow on a busy one: with two
threads on two cores and another process spinning on one of them, every parallel region waits for the thread that
lost its core — a 1024² prediction took 11.3 s on two threads against 5.7 s on one (and 3.9 s on two when idle;
``benchmarks/bench_speed.py``, docs/benchmarks.md "Speed"). So before a CPU run we count the cores that are idle (two
samples of /proc/stat, 0.1 s apart; the 1-minute load average where /proc is missing) and use that many threads.
An explicit choice always wins: the ``threads`` argument (CLI ``--threads``), else ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` in the environment. (A passive OpenMP wait policy was measured too: it rescues two threads on a
busy machine, 6.1 s, but costs 40 % on an idle one, so it is left to the user.)
"""

from __future__ import annotations

import os
import time

ENV_THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _cpu_times() -> dict[str, tuple[int, int]] | None:
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and not ln.startswith("cpu ")]
    except OSError:
        return None
    out = {}
    for fields in lines:
        values = [int(v) for v in fields[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        out[fields[0]] = (idle, sum(values))
    return out


def free_cores(interval: float = 0.1) -> int:
    """How many of this process's cores are idle now (rounded; at least 1)."""
    cores = usable_cores()
    first = _cpu_times()
    if first is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover
            return cores
        return max(1, min(cores, round(cores - busy)))
    time.sleep(interval)
    second = _cpu_times() or {}
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):  # pragma: no cover
        allowed = set(second)
    idle = 0.0
    for name, (idle2, total2) in second.items():
        if name not in allowed or name not in first:
            continue
        idle1, total1 = first[name]
        if total2 > total1:
            idle += (idle2 - idle1) / (total2 - total1)
    return max(1, min(cores, int(idle + 0.5)))


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """The intra-op thread count for a CPU run and why: requested > environment > free cores."""
    if requested is not None:
        if requested < 1:
            from .errors import VirtualStainError

            raise VirtualStainError(f"--threads {requested}: use 1 or more (or leave it out to use the free cores)")
        return int(requested), "requested"
    for name in ENV_THREADS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    return free_cores(), "free cores"


def use_threads(requested: int | None = None) -> dict:
    """Set torch's intra-op threads for a CPU run; returns what to record in the provenance."""
    import torch

    n, why = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return {"threads": n, "threads_from": why}
