"""Many files as tasks on Dask distributed: ``virtualstain predict FOLDER -o OUT --workers N`` (or ``--scheduler``).

Each file — or each field of an OME-Zarr plate — is one task running ``cli_files.predict_item``, the same code as an
in-process run, on a worker that loads the checkpoint once and writes its own outputs straight into the output folder
or plate (nothing is sent back but their names). Files are written under temporary names and renamed when complete,
and a field's provenance is written last, so a killed job leaves nothing marked done that is half-written; a rerun
skips what was already written with the same checkpoint and settings (``cli_files.already_written``), so it continues
where the job stopped. A failed task is retried (``--retries``), then reported with its error at the end.

Without ``--scheduler`` a ``LocalCluster`` is sized to the machine: one worker per GPU where there are GPUs, else
``--workers`` processes sharing the cores (each gets cores // workers torch threads unless ``--threads`` is given).
With ``--scheduler ADDRESS`` any running cluster is used unchanged (dask-jobqueue on SLURM, Kubernetes, ...).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time


@functools.lru_cache(maxsize=2)
def _bundle(checkpoint: str):
    """One load per worker process (tasks of a job share it)."""
    from .core.bundle import load_bundle

    return load_bundle(checkpoint)


def predict_task(item, options: dict, key: str) -> list[str]:
    """Runs on a worker: one file (a path) or OME-Zarr field, the bundle cached, outputs written by the worker."""
    from .cli_files import predict_item

    args = argparse.Namespace(**options)
    return [str(p) for p in predict_item(item, _bundle(args.checkpoint), args, key)]


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker_peak_rss_mb(client) -> list[float]:
    """Each worker process's peak resident memory (Linux/macOS units differ; Linux reports KiB)."""
    try:
        return [float(v) for v in client.run(_peak_rss_mb).values()]
    except Exception:  # noqa: BLE001 - an external cluster may refuse client.run; the job itself is done
        return []


def default_workers() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    from .core.threads import usable_cores

    return max(1, usable_cores())


def run_distributed(paths: list, args, key: str) -> list[tuple[str, str]]:
    """Predict ``paths`` (files or OME-Zarr fields) as Dask tasks; print progress per item; return [(name, error)] of
    the failed ones."""
    from dask.distributed import Client, LocalCluster, as_completed

    from .core.errors import VirtualStainError

    if not paths:
        return []

    logging.getLogger("distributed").setLevel(logging.ERROR)  # start/stop chatter is not for the user
    options = {k: v for k, v in vars(args).items() if k != "func"}
    options["quiet"] = True  # per-step lines from many workers would interleave; progress is per file here
    cluster, n = None, None
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout="20s")
        except Exception as exc:  # noqa: BLE001 - refused, timed out, or something that is not a Dask scheduler
            raise VirtualStainError(f"cannot reach the Dask scheduler at {args.scheduler} ({exc}); check the address "
                                    "(tcp://HOST:PORT) or leave --scheduler out to start a local cluster") from None
    else:
        n = max(1, args.workers or default_workers())
        if options.get("threads") is None:
            from .core.threads import usable_cores

            options["threads"] = max(1, usable_cores() // n)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.CRITICAL)  # a failed task is reported once, below
        client = Client(cluster)
    t0 = time.perf_counter()
    try:
        futures = {client.submit(predict_task, p, options, key,
                                 retries=max(0, args.retries), key=f"virtualstain-{key}-{i}-{p.name}".replace("/", "-"),
                                 pure=False): p for i, p in enumerate(paths)}
        failed = []
        for done, fut in enumerate(as_completed(futures), start=1):
            path = futures[fut]
            if fut.status == "finished":
                status = "done"
            else:
                exc = fut.exception()
                why = str(exc) if isinstance(exc, VirtualStainError) else f"{type(exc).__name__}: {exc}"
                failed.append((path.name, why))
                status = "FAILED"
            print(f"[{done}/{len(paths)}] {path.name}: {status} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                  flush=True)
        peaks = _worker_peak_rss_mb(client)
        if peaks:  # for sizing workers: the largest of them, whatever the plate's size (it should not grow with it)
            print(f"worker peak memory: {max(peaks):.0f} MB (largest of {len(peaks)} worker(s))", file=sys.stderr)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"{len(paths) - len(failed)} of {len(paths)} file(s) written to {args.output} by "
          f"{'the cluster at ' + args.scheduler if args.scheduler else f'{n} local worker(s)'}",
          file=sys.stderr)
    return failed

