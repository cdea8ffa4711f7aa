"""Same seed, same pixels: record every task's output on small real crops, then check a refactor changed none.

    python benchmarks/same_pixels.py record runs/pixels_before.npz     # before the change
    python benchmarks/same_pixels.py check runs/pixels_before.npz      # after it: exit 1 on any differing pixel

Covers one-pass, residual-shift (mean-anchored) and DDPM stain prediction with labels, tiled and block-by-block
fields, seed averaging, test-time augmentation, the uncertainty maps, the confidence ensemble, translation and
synthesis — each on the shipped demo bundles, one thread, float32 (bf16 differs between CPUs, not between commits).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from napari_virtualstain._sample_data import nfkb_wells, scratch_assay
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.confidence import predict_ensemble
from napari_virtualstain.core.settings import RunSettings
from napari_virtualstain.core.tasks.classcond import synthesize, translate
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.uncertainty import predict_uncertainty

RUN = RunSettings(threads=1, half=False)


def outputs() -> dict[str, np.ndarray]:
    phase = scratch_assay()[0][0][9].astype(np.float32)  # (Y, X) of t9
    crop = phase[:160, :160]
    field = phase[:, :400]
    stain, ddpm, regression = load_bundle("demo-stain"), load_bundle("demo-stain-ddpm"), load_bundle("demo-stain-regression")
    out: dict[str, np.ndarray] = {}

    def put(name, result):
        out[f"{name}.image"] = result.image
        for key, lab in (result.labels or {}).items():
            out[f"{name}.labels.{key}"] = lab

    put("stain", predict_stain(stain, crop, settings=RUN))
    put("stain_tta2", predict_stain(stain, crop, tta=2, settings=RUN))
    put("regression_tiled", predict_stain(regression, field, tta=1, settings=RunSettings(threads=1, half=False,
                                                                                            tile_size=128, tile_overlap=16)))
    put("regression_blocks", predict_stain(regression, field, tta=1, settings=RUN.replace(block_size=160)))
    put("ddpm_k2", predict_stain(ddpm, crop[:96, :96], seed=3, steps=4, samples=2, settings=RUN))
    unc = predict_uncertainty(ddpm, crop[:96, :96], mode="both", seeds=(0, 1), steps=4, settings=RUN)
    put("uncertainty", unc.stain)
    for key, m in unc.maps.items():
        out[f"uncertainty.{key}"] = m
    ens = predict_ensemble(stain, crop, 2, seed=1, tta=1, settings=RUN)
    put("ensemble", ens.prediction)
    out["ensemble.std"] = ens.std
    for j, labs in enumerate(ens.member_labels):
        for key, lab in labs.items():
            out[f"ensemble.member{j}.labels.{key}"] = lab
    nfkb = load_bundle("demo-nfkb")
    well = nfkb_wells()[1]  # (NF-kB, DNA) of the unstimulated well
    two = np.asarray(well[0], np.float32)[:, :64, :64]
    tr = translate(nfkb, two, well[1]["metadata"]["class"], nfkb.config.classes[0], steps=4, channel_axis=0,
                   settings=RUN)
    out["translate.image"], out["translate.control"] = tr.translated, tr.control
    syn = synthesize(nfkb, nfkb.config.classes[1], 2, seed=5, steps=4, condition=two[1, :32, :32], settings=RUN)
    out["synthesize.images"] = syn.images
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("record", "check"))
    p.add_argument("file")
    args = p.parse_args(argv)
    now = outputs()
    if args.mode == "record":
        np.savez_compressed(args.file, **now)
        print(f"recorded {len(now)} arrays to {args.file}")
        return 0
    before = dict(np.load(args.file))
    bad = [k for k in sorted(set(before) | set(now))
           if k not in before or k not in now or before[k].shape != now[k].shape
           or not np.array_equal(before[k], now[k], equal_nan=True)]
    for k in bad:
        print(f"differs: {k}")
    print(f"{len(now) - len(bad)}/{len(set(before) | set(now))} arrays bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
