"""One-call GPU recipe: train every demo bundle from its config at GPU scale and pack the results to come back.

    python scripts/gpu_train.py --prepare                 # here, once: data -> gpu_data/, wheels -> .whl/ (ignored)
    # on the GPU machine (carry gpu_data and .whl; it has torch, scikit-image, tifffile, safetensors, no diffusers):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=src:/tmp/site python3 scripts/gpu_train.py -o $OUT --data-root gpu_data --minutes 8.5
    python scripts/gpu_train.py --smoke -o /tmp/smoke     # the same code at toy scale on the CPU (< 2 min; a test)

Jobs, in order (each trains with ``train.loop.train``, the loop the CLI uses, under a share of the time budget):
stain mean predictor (regression) -> mean-anchored stain model on it; ISL mean -> mean-anchored ISL; class-conditional
NF-kB; DDPM stain (v-prediction, anchored on the stain mean predictor). GPU scale: bf16 autocast, wide UNets, large
batches, cosine schedule; each job's step count is what fits its share (probed after 20 steps). Output, at most 8 files (the remote machine returns no
more, each <= 16 MiB): one ``NAME.tar`` per bundle (config.json + fp16 safetensors) and ``summary.json`` with every
job's validation curve, steps, seconds and device.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIG_PREFIX = "../../shared/data/"
WHEELS = ["diffusers==0.42.1", "importlib_metadata"]


@dataclass
class Job:
    name: str
    config: str
    share: float  # fraction of the time budget
    options: dict = field(default_factory=dict)
    mean_of: str | None = None  # mean-anchored: the job whose bundle is mu


# sized so that a mean-anchored bundle (mu + refinement, fp16) packs into one 16 MiB file: 8.3 + 5 MiB
GPU_UNET = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1)
REFINE_UNET = dict(block_out_channels=(24, 48, 96, 128), layers_per_block=1)
MAX_FILE = 16 * 2**20
JOBS = [
    # the CPU scaling study's validation winner (docs/benchmarks.md, issue 20): centre map + augmentation
    Job("demo-stain-regression", "demo-stain.yaml", 0.14, dict(objective="regression", distance_head=True,
                                                               augment=True, **GPU_UNET)),
    Job("demo-stain", "demo-stain.yaml", 0.20, dict(objective="residual_shift", **REFINE_UNET), "demo-stain-regression"),
    Job("demo-isl-regression", "demo-isl.yaml", 0.14, dict(objective="regression", augment=True, **GPU_UNET)),
    Job("demo-isl", "demo-isl.yaml", 0.18, dict(objective="residual_shift", **REFINE_UNET), "demo-isl-regression"),
    Job("demo-nfkb", "demo-nfkb.yaml", 0.20, dict(objective="ddpm", crop_size=256, **GPU_UNET)),
    # anchored on mu like the shipped demo-stain-ddpm (the DDPM generates x0 - mu(x): it learns on the CPU only so)
    Job("demo-stain-ddpm", "demo-stain.yaml", 0.14, dict(objective="ddpm", prediction_type="v_prediction",
                                                         **REFINE_UNET), "demo-stain-regression"),
]
GPU_DEFAULTS = dict(steps=100_000, batch_size=32, crop_size=128, lr=5e-4, lr_schedule="cosine", val_every=1000,
                    tile_size=256, tile_overlap=32, half_weights=True, max_val_size=256)
SMOKE = dict(steps=2, batch_size=2, crop_size=32, val_every=2, block_out_channels=(8, 16), layers_per_block=1,
             tile_size=32, tile_overlap=8, max_val_size=32, half_weights=True, lr_schedule="cosine")


def config_files() -> list[Path]:
    return sorted({REPO / "configs" / j.config for j in JOBS})


def referenced_data(config: Path) -> list[str]:
    """Paths under ../shared/data that a training config reads."""
    text = config.read_text()
    out, i = [], 0
    while (i := text.find(CONFIG_PREFIX, i)) >= 0:
        j = i + len(CONFIG_PREFIX)
        end = j
        while end < len(text) and text[end] not in " ,}]\n\"'":
            end += 1
        out.append(text[j:end])
        i = end
    return sorted(set(out))


def prepare(data_dest: Path, wheel_dest: Path) -> None:
    """Copy the data the configs read into ``data_dest`` and download the wheels the GPU machine lacks."""
    for cfg in config_files():
        for rel in referenced_data(cfg):
            dst = data_dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                shutil.copy2(SHARED / rel, dst)
    wheel_dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", "-d", str(wheel_dest), *WHEELS], check=True)
    print(f"data in {data_dest}, wheels in {wheel_dest}; carry both (see the module docstring)")


def localised_config(config: Path, data_root: Path, work: Path) -> Path:
    """The config with its ../shared/data paths pointing at ``data_root`` (the folder that travelled)."""
    text = config.read_text().replace(CONFIG_PREFIX, str(data_root.resolve()) + "/")
    out = work / config.name
    out.write_text(text)
    return out


def run_jobs(out: Path, data_root: Path, minutes: float, smoke: bool, only: list[str] | None) -> dict:
    import torch

    from napari_virtualstain.train.specs import load_training_spec  # noqa: F401  (the CLI's loader: same parsing)
    from napari_virtualstain.train.classcond_data import load_classcond_config
    from napari_virtualstain.train.data import load_config
    from napari_virtualstain.train.loop import TrainOptions, train

    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in JOBS if not only or j.name in only]
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "minutes": minutes, "smoke": smoke, "jobs": {}}
    t_all = time.perf_counter()
    for job in jobs:
        cfg = localised_config(REPO / "configs" / job.config, data_root, work)
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        spec = load_classcond_config(cfg, raw) if raw.get("task") == "classcond" else load_config(cfg)
        spec.name = job.name
        settings = {**GPU_DEFAULTS, **job.options}
        if smoke:
            settings = {**settings, **SMOKE}
            if job.options.get("crop_size"):
                settings["crop_size"] = 32
        else:
            settings["max_minutes"] = minutes * job.share
        if job.mean_of is not None:
            settings |= dict(residual_source="mean_prediction", mean_from=str(work / job.mean_of))
        command = f"python scripts/gpu_train.py (job {job.name}; {json.dumps({k: v for k, v in settings.items()}, default=str)})"
        opts = TrainOptions(**settings, command=command, seed=0)
        t0 = time.perf_counter()
        bundle, history = train(spec, work / job.name, opts)
        seconds = time.perf_counter() - t0
        summary["jobs"][job.name] = {"steps": bundle.config.training["steps"], "seconds": round(seconds, 1),
                                     "bundle_id": bundle.id, "history": history, "settings": settings}
        print(f"{job.name}: {bundle.config.training['steps']} steps in {seconds:.0f} s; last val "
              f"{json.dumps(history[-1].get('val') if history else None)}", flush=True)
        size = pack(work / job.name, out / f"{job.name}.tar")
        summary["jobs"][job.name]["tar_bytes"] = size
        if size > MAX_FILE:
            print(f"warning: {job.name}.tar is {size / 2**20:.1f} MiB, over the 16 MiB a remote run returns",
                  file=sys.stderr)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    shutil.rmtree(work)
    return summary


def pack(bundle_dir: Path, tar_path: Path) -> int:
    """config.json + safetensors of a bundle (no training state) in one tar, the bundle's folder name inside;
    returns its size in bytes. Unpack with ``tar xf NAME.tar`` (a bundle folder, ready for ``virtualstain info``)."""
    with tarfile.open(tar_path, "w") as tar:
        for f in sorted(bundle_dir.iterdir()):
            if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "training_log.json")):
                tar.add(f, arcname=f"{bundle_dir.name}/{f.name}")
    return tar_path.stat().st_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", help="folder for NAME.tar bundles + summary.json")
    p.add_argument("--data-root", default=None, help="folder holding the configs' data (default: ../shared/data)")
    p.add_argument("--minutes", type=float, default=8.5, help="time budget for all training jobs")
    p.add_argument("--only", default=None, help="comma-separated job names (default: all)")
    p.add_argument("--smoke", action="store_true", help="toy scale on the CPU: 2 steps per job, tiny UNets")
    p.add_argument("--prepare", action="store_true", help="copy data to gpu_data/ and download wheels to .whl/")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(REPO / "gpu_data", REPO / ".whl")
        return 0
    if not args.output:
        p.error("-o/--output is required")
    data_root = Path(args.data_root) if args.data_root else SHARED
    missing = [rel for cfg in config_files() for rel in referenced_data(cfg) if not (data_root / rel).exists()]
    if missing:
        print(f"error: {data_root} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; run "
              "'python scripts/gpu_train.py --prepare' and carry gpu_data", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else None
    summary = run_jobs(Path(args.output), data_root, args.minutes, args.smoke, only)
    print(f"done in {summary['seconds']:.0f} s on {summary['device']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
