"""An OME-Zarr HCS plate end to end on this machine: fields/minute with 1 vs 2 workers, the per-field cost of the plate
path against a plain predict of the same fields as TIFFs, a job killed half-way then rerun, and a worker's peak memory
for a small and a large plate. One run, ratios.

    python benchmarks/bench_plate.py --out benchmarks/results/plate.json [--wells 24 --fields 4 --size 192,256]

The plate is built in a temp folder from held-out scratch-assay crops (time points 8-9; channels brightfield +
Hoechst, the checkpoint's input picked by name), never from copies in the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runner import CLI, kill_midway, run  # noqa: E402

NDEV = Path(__file__).resolve().parents[2] / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"


def build_plate(path: Path, n_wells: int, n_fields: int, shape: tuple[int, int], tiffs: Path | None = None) -> int:
    """A plate of ``n_wells`` x ``n_fields`` distinct held-out crops; the same crops as TIFFs in ``tiffs``."""
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    full = tifffile.imread(NDEV)
    rows = [chr(ord("A") + i) for i in range(max(1, (n_wells + 11) // 12))]
    wells = [f"{rows[i // 12]}/{i % 12 + 1}" for i in range(n_wells)]
    root = zarr.open_group(str(path), mode="w")
    write_plate_metadata(root, rows, [str(c + 1) for c in range(min(12, n_wells))], wells, field_count=n_fields,
                         name="bench")
    h, w = shape
    k = 0
    channels = [{"label": n, "color": "FFFFFF", "active": True, "window": {"min": 0, "max": 65535, "start": 0,
                                                                           "end": 65535}} for n in ("brightfield", "Hoechst")]
    for well in wells:
        group = root.require_group(well)
        write_well_metadata(group, [str(f) for f in range(n_fields)])
        for f in range(n_fields):
            t = 8 + k % 2
            y, x = (k // 2) % (full.shape[2] - h + 1), (7 * k) % (full.shape[3] - w + 1)
            img = np.stack([full[1, t, y : y + h, x : x + w], full[0, t, y : y + h, x : x + w]])
            write_image(img, group.require_group(str(f)), axes="cyx", scale_factors=[],
                        scale={"c": 1.0, "y": 0.619, "x": 0.619}, axes_units={"y": "micrometer", "x": "micrometer"},
                        omero={"channels": channels})
            if tiffs is not None:
                tifffile.imwrite(tiffs / f"{well.replace('/', '')}_{f}.tif", img[0])
            k += 1
    return k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--wells", type=int, default=24)
    p.add_argument("--fields", type=int, default=4)
    p.add_argument("--size", default="192,256", help="field height,width")
    p.add_argument("--checkpoint", default="demo-stain")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.size.split(","))
    report = {"checkpoint": args.checkpoint, "wells": args.wells, "fields_per_well": args.fields,
              "field_shape": list(shape), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "tiffs").mkdir()
        n = build_plate(tmp / "plate.zarr", args.wells, args.fields, shape, tmp / "tiffs")
        report["fields"] = n
        common = ["predict", "-c", args.checkpoint, "-q"]
        for w in (1, 2):
            seconds, err = run([*CLI, *common, str(tmp / "plate.zarr"), "-o", str(tmp / f"w{w}.zarr"), "--workers",
                                str(w)])
            report[f"workers_{w}"] = {"seconds": round(seconds, 2), "fields_per_minute": round(60 * n / seconds, 2),
                                      "fields_done": len(re.findall(r": done", err))}
            print(f"{w} worker(s): {seconds:.1f} s for {n} fields", flush=True)
        report["speedup_2_over_1_workers"] = round(report["workers_1"]["seconds"] / report["workers_2"]["seconds"], 2)

        # per-field cost in one process (start-up cancels: all fields minus a quarter, over the difference):
        # the plate path (lazy read, zarr write) against the same crops as TIFF files
        quarter = build_plate(tmp / "quarter.zarr", max(1, args.wells // 4), args.fields, shape)
        tiffs = sorted((tmp / "tiffs").glob("*.tif"))
        small_t, _ = run([*CLI, *common, *map(str, tiffs[:quarter]), "-o", str(tmp / "t_small")])
        full_t, _ = run([*CLI, *common, str(tmp / "tiffs"), "-o", str(tmp / "t_all")])
        small_p, _ = run([*CLI, *common, str(tmp / "quarter.zarr"), "-o", str(tmp / "p_small.zarr")])
        full_p, _ = run([*CLI, *common, str(tmp / "plate.zarr"), "-o", str(tmp / "p_all.zarr")])
        report["per_field_tiff_s"] = round((full_t - small_t) / (n - quarter), 3)
        report["per_field_plate_s"] = round((full_p - small_p) / (n - quarter), 3)
        report["per_field_overhead_plate_over_tiff"] = round(report["per_field_plate_s"] / report["per_field_tiff_s"]
                                                             - 1, 3)
        print(f"per field: TIFF {report['per_field_tiff_s']} s, plate {report['per_field_plate_s']} s", flush=True)

        # a worker's peak memory (the runner asks each worker at the end of the job): a quarter plate vs the whole
        for name, store in (("quarter", "quarter.zarr"), ("whole", "plate.zarr")):
            _, err = run([*CLI, *common, str(tmp / store), "-o", str(tmp / f"mem_{name}.zarr"), "--workers", "1"])
            report[f"worker_peak_rss_mb_{name}_plate"] = float(re.search(r"worker peak memory: (\d+) MB", err).group(1))
        report["worker_peak_rss_whole_over_quarter"] = round(report["worker_peak_rss_mb_whole_plate"]
                                                             / report["worker_peak_rss_mb_quarter_plate"], 3)

        # kill a 2-worker job after about half the fields, rerun, count what the rerun computed
        import zarr

        out = tmp / "killed.zarr"

        def finished() -> set[str]:
            """Fields whose provenance (written last) is there."""
            done = set()
            for g in out.glob("*/*/*"):
                if g.is_dir():
                    try:
                        if "virtualstain" in zarr.open_group(str(g), mode="r").attrs:
                            done.add("/".join(g.parts[-3:]))
                    except Exception:  # noqa: BLE001 - a group the kill left without metadata
                        pass
            return done

        kill_midway([*CLI, *common, str(tmp / "plate.zarr"), "-o", str(out), "--workers", "2"],
                    lambda: len(finished()) >= n // 2)
        before = finished()
        seconds, err = run([*CLI, *common, str(tmp / "plate.zarr"), "-o", str(out), "--workers", "2"])
        redone = {m.split("plate.zarr/")[-1] for m in re.findall(r"\] (\S+): done", err)}
        report["kill_and_resume"] = {"finished_before_kill": len(before), "computed_by_rerun": len(redone),
                                     "recomputed_fields": len(redone & before), "rerun_seconds": round(seconds, 2),
                                     "all_finished": len(finished()) == n}
        print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
