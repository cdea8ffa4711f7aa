"""Files as Dask tasks on this machine: throughput with 1 vs 2 workers, the per-field overhead against a plain predict
of the same field, and a job killed half-way then rerun (nothing lost, nothing redone). One run, ratios.

    python benchmarks/bench_runner.py --out benchmarks/results/runner.json [--fields 8] [--size 512]

Fields are mirrored mosaics of the held-out scratch-assay frames (bench_speed.mosaic), written to a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import mosaic  # noqa: E402

CLI = [sys.executable, "-m", "napari_virtualstain.cli"]


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0, proc.stderr


def kill_midway(cmd: list[str], far_enough) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``far_enough()`` says so (a killed job
    for the resume measurement); a job that ends on its own first is an error, not a measurement."""
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while proc.poll() is None and not far_enough():
        time.sleep(0.1)
    exited = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if exited:
        raise RuntimeError(f"the job to kill ended by itself: {proc.stderr.read()[-2000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fields", type=int, default=8)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--checkpoint", default="demo-stain")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = {"checkpoint": args.checkpoint, "fields": args.fields, "size": args.size, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "fields"
        src.mkdir()
        base = mosaic(args.size + 8 * args.fields)
        for i in range(args.fields):  # different fields: shifted windows of the mosaic
            tifffile.imwrite(src / f"field{i:02d}.tif", np.ascontiguousarray(base[8 * i : 8 * i + args.size,
                                                                                  8 * i : 8 * i + args.size]))
        common = ["predict", "-c", args.checkpoint, "-q"]
        plain, _ = run([*CLI, *common, str(src / "field00.tif"), "-o", str(tmp / "plain")])
        report["plain_one_field_s"] = round(plain, 2)  # includes start-up (imports, bundle) like any CLI call
        for n in (1, 2):
            seconds, err = run([*CLI, *common, str(src), "-o", str(tmp / f"w{n}"), "--workers", str(n)])
            report[f"workers_{n}"] = {"seconds": round(seconds, 2),
                                      "fields_per_minute": round(60 * args.fields / seconds, 2),
                                      "fields_done": len(re.findall(r": done", err))}
            print(f"{n} worker(s): {seconds:.1f} s for {args.fields} fields", flush=True)
        report["speedup_2_over_1_workers"] = round(report["workers_1"]["seconds"] / report["workers_2"]["seconds"], 2)
        # steady-state cost per field: the difference between a job of all fields and a job of 2, over the extra
        # fields (start-up cancels), for the in-process path and for one Dask worker with the same threads
        files = sorted(src.glob("*.tif"))
        extra = len(files) - 2
        for name, opts in (("plain", []), ("task", ["--workers", "1"])):
            small, _ = run([*CLI, *common, *map(str, files[:2]), "-o", str(tmp / f"{name}_2"), *opts])
            full, _ = run([*CLI, *common, *map(str, files), "-o", str(tmp / f"{name}_all"), *opts])
            report[f"per_field_{name}_s"] = round((full - small) / extra, 3)
        report["per_field_overhead_task_over_plain"] = round(report["per_field_task_s"] / report["per_field_plain_s"]
                                                             - 1, 3)

        # kill a 2-worker job after about half the fields, rerun, count what the rerun computed
        out = tmp / "killed"
        kill_midway([*CLI, *common, str(src), "-o", str(out), "--workers", "2"],
                    lambda: len(list(out.glob("*_virtualstain.tif"))) >= args.fields // 2)
        before = sorted(p.name for p in out.glob("*_virtualstain.tif"))
        seconds, err = run([*CLI, *common, str(src), "-o", str(out), "--workers", "2"])
        redone = re.findall(r"\] (\S+): done", err)
        report["kill_and_resume"] = {
            "written_before_kill": len(before), "computed_by_rerun": len(redone),
            "recomputed_fields": len(set(redone) & {b.replace("_virtualstain.tif", ".tif") for b in before}),
            "partial_files_left": len(list(out.glob(".*.part"))), "rerun_seconds": round(seconds, 2),
            "all_written": len(list(out.glob("*_virtualstain.tif"))) == args.fields,
        }
        print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
