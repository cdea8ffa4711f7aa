"""Condition translation on held-out NF-kB crops (BBBC014: A12 unstimulated <-> A01 stimulated): does NF-kB move,
do the cells stay the same cells, and how good is the reconstruction control? Per-cell, both directions, a guidance x
strength (x tiling) grid, whole-image and invariant-DNA bundles side by side.

    python benchmarks/eval_translation.py whole=runs/nfkb-whole invariant=runs/nfkb-inv --rows 768:896 \\
        --guidance 1,2,4 --strength 0.6,1 -o benchmarks/results/translation_tune.json
    python benchmarks/eval_translation.py invariant=demo-nfkb --rows 896:1024 --guidance 2 --strength 1 \\
        -o benchmarks/results/translation_report.json --figure docs/images/translation_nfkb.png \\
        --hist-figure docs/images/translation_nfkb_cells.png

Held out: rows 768-1023 of each well (configs/demo-nfkb.yaml trains on rows 0-767 only), cut into crops with more
than 200 px of nuclei. Choose settings on one band of rows (``--rows 768:896``) and report on the other
(``896:1024``), so the reported numbers were not tuned on.

Per cell (``core.phenotype``: nuclei from the DNA channel by Otsu + watershed, a 6 px cytoplasmic ring, ratio = mean
NF-kB in the nucleus / in its ring), pooled over the crops of a direction:
- medians of the source cells, the translated cells, the control's cells and the real target well's cells (same
  rows); "fraction of the way" = (median translated - median source) / (median target - median source), measured on
  the translated image's own nuclei and on the *source's* nuclei (the same cells followed through the translation;
  identical for an invariant-DNA bundle, whose nuclei are the source's);
- the same fraction by the pooled ratio (``core.phenotype.pooled_ratio``: mean NF-kB in all Otsu nuclei over the
  mean in a 6 px ring, all pixels of all crops pooled; the real target: all crops of the other well in the rows);
- Kolmogorov-Smirnov and Wasserstein distances translated -> target beside source -> target;
- DNA SSIM translated vs source (1 when DNA is invariant) and the reconstruction control's PSNR (source's 1-99.8 %
  scale) on NF-kB and DNA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.io import read_image
from napari_virtualstain.core.metrics import image_metrics, normalize_pair
from napari_virtualstain.core.phenotype import (
    compare,
    fraction_of_the_way,
    histogram_figure,
    measure_image,
    pooled_ratio,
    pooled_sums,
)
from napari_virtualstain.core.postprocess import stain_to_labels
from napari_virtualstain.core.sampling import tile_settings
from napari_virtualstain.core.settings import RunSettings
from napari_virtualstain.core.tasks.classcond import translate

DATA = Path(__file__).resolve().parents[2] / "shared/data/nfkb_translocation"
DIRECTIONS = {"A12-A01": ("A12", "A01"), "A01-A12": ("A01", "A12")}


def crops(well: str, size: int, rows: tuple[int, int]) -> list[np.ndarray]:
    """(NF-kB, DNA) float32 crops of one well within ``rows`` that hold more than 200 px of nuclei."""
    nfkb = read_image(DATA / f"{well}_nfkb.tif").astype(np.float32)
    dna = read_image(DATA / f"{well}_dna.tif").astype(np.float32)
    out = []
    for y in range(rows[0], rows[1] - size + 1, size):
        for x in range(0, nfkb.shape[1] - size + 1, size):
            c = np.stack([nfkb[y : y + size, x : x + size], dna[y : y + size, x : x + size]])
            if (stain_to_labels(c[1]) > 0).sum() > 200:
                out.append(c)
    return out


def ratios(img: np.ndarray, nuclei: np.ndarray | None = None) -> np.ndarray:
    return measure_image(img, marker=0, dna=1, nuclei=nuclei).ratio


def scaled(pred: np.ndarray, truth: np.ndarray) -> dict:
    pn, tn, _ = normalize_pair(pred, truth)
    return image_metrics(pn, tn)


def evaluate(bundle, sources, target_cells, target_pooled, source_class, target_class, guidance, strength, steps,
             settings=None):
    cells = {"source": [], "translated": [], "translated_source_nuclei": [], "control": []}
    parts = {"source": [], "translated": []}
    dna_ssim, psnr_nfkb, psnr_dna, examples = [], [], [], []
    t0 = time.perf_counter()
    for src in sources:
        res = translate(bundle, src, source_class, target_class, steps=steps, guidance=guidance, strength=strength,
                        settings=settings or RunSettings())
        nuclei = stain_to_labels(src[1])
        cells["source"].append(ratios(src, nuclei))
        cells["translated"].append(ratios(res.translated))
        cells["translated_source_nuclei"].append(ratios(res.translated, nuclei))
        cells["control"].append(ratios(res.control, nuclei))
        parts["source"].append(pooled_sums(src))
        parts["translated"].append(pooled_sums(res.translated))
        dna_ssim.append(scaled(res.translated[1], src[1])["ssim"])
        psnr_nfkb.append(scaled(res.control[0], src[0])["psnr"])
        if not np.array_equal(res.control[1], src[1]):  # an invariant DNA channel comes back exactly
            psnr_dna.append(scaled(res.control[1], src[1])["psnr"])
        if len(examples) < 3:
            examples.append((src, res.translated, res.control, res.difference))
    seconds = (time.perf_counter() - t0) / max(len(sources), 1)
    pooled = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cells.items()}
    row = {
        "direction": f"{source_class}->{target_class}", "guidance": guidance, "strength": strength, "steps": steps,
        "tile": list(tile_settings(bundle.config, settings or RunSettings())),  # asked for (a crop that fits
        # in one tile runs as one tile of its own size: the results' provenance)
        "n_crops": len(sources), "n_cells": {k: int(len(v)) for k, v in pooled.items()} | {"target": int(len(target_cells))},
        "median": {k: float(np.median(v)) for k, v in pooled.items()} | {"target": float(np.median(target_cells))},
        "fraction_of_the_way": fraction_of_the_way(pooled["source"], pooled["translated"], target_cells),
        "fraction_of_the_way_source_nuclei": fraction_of_the_way(pooled["source"], pooled["translated_source_nuclei"],
                                                                 target_cells),
        "pooled_ratio": {k: pooled_ratio(v) for k, v in parts.items()} | {"target": target_pooled},
        "fraction_of_the_way_pooled": _fraction(pooled_ratio(parts["source"]), pooled_ratio(parts["translated"]),
                                                target_pooled),
        "translated_vs_target": compare(pooled["translated_source_nuclei"], target_cells),
        "source_vs_target": compare(pooled["source"], target_cells),
        "dna_ssim_translated_vs_source": float(np.mean(dna_ssim)),
        "control_psnr_nfkb": float(np.mean(psnr_nfkb)),
        "control_psnr_dna": float(np.mean(psnr_dna)) if psnr_dna else None,  # None: DNA kept exactly (invariant)
        "seconds_per_crop": seconds,
    }
    return row, pooled, examples


def _fraction(source: float, translated: float, target: float) -> float:
    return (translated - source) / (target - source) if target != source else float("nan")


def save_figure(path: Path, rows: list[tuple[np.ndarray, ...]]) -> None:
    """source | translated | control | difference | a real crop of the target well, NF-kB channel, one row each."""
    from PIL import Image

    tiles = []
    for src, tr, ctl, diff, real in rows:
        lo, hi = np.percentile(np.concatenate([src[0].ravel(), real[0].ravel()]), [1, 99.8])

        def grey(a):
            return np.repeat((np.clip((a - lo) / (hi - lo), 0, 1) * 255)[..., None], 3, -1)

        d = diff[0] / max(np.abs(diff[0]).max(), 1e-6)
        div = np.stack([np.clip(1 + np.minimum(d, 0), 0, 1), np.clip(1 - np.abs(d), 0, 1),
                        np.clip(1 - np.maximum(d, 0), 0, 1)], -1) * 255
        sep = np.full((src.shape[1], 4, 3), 255.0)
        tiles.append(np.concatenate([grey(src[0]), sep, grey(tr[0]), sep, grey(ctl[0]), sep, div, sep, grey(real[0])], 1))
        tiles.append(np.full((4, tiles[-1].shape[1], 3), 255.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.concatenate(tiles[:-1]).astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+", help="NAME=BUNDLE (or a bundle: named after it)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rows", default="768:1024", help="held-out rows to cut crops from, Y0:Y1")
    p.add_argument("--direction", choices=["both", *DIRECTIONS], default="both")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-crops", type=int, default=8, help="source crops per direction")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", default="1", help="comma-separated guidance scales")
    p.add_argument("--strength", default="1", help="comma-separated strengths")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tile", default="", help="comma-separated SIZE/OVERLAP tilings to compare (default: the bundle's)")
    p.add_argument("--figure", default=None, help="PNG: examples of the first bundle/setting, A12 -> A01")
    p.add_argument("--hist-figure", default=None, help="PNG: per-cell distributions of the first bundle/setting")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    y0, y1 = (int(v) for v in args.rows.split(":"))
    wells = {w: crops(w, args.size, (y0, y1)) for w in ("A01", "A12")}
    target_cells = {w: np.concatenate([ratios(c) for c in cs]) for w, cs in wells.items()}
    target_pooled = {w: pooled_ratio([pooled_sums(c) for c in cs]) for w, cs in wells.items()}
    directions = list(DIRECTIONS) if args.direction == "both" else [args.direction]
    grid = list(itertools.product([float(g) for g in args.guidance.split(",")],
                                  [float(s) for s in args.strength.split(",")]))
    tilings = [RunSettings(tile_size=int(t.split("/")[0]), tile_overlap=int(t.split("/")[1]), threads=args.threads)
               for t in args.tile.split(",") if t] or [RunSettings(threads=args.threads)]
    rows, first = [], None
    for spec in args.bundles:
        name, _, path = spec.rpartition("=")
        bundle = load_bundle(path)
        name = name or bundle.config.name
        for d in directions:
            src_class, tgt_class = DIRECTIONS[d]
            sources = wells[src_class][: args.max_crops]
            for (guidance, strength), tiling in itertools.product(grid, tilings):
                row, pooled, examples = evaluate(bundle, sources, target_cells[tgt_class], target_pooled[tgt_class],
                                                 src_class, tgt_class, guidance, strength, args.steps, tiling)
                row = {"bundle": name, "bundle_id": bundle.id, "invariant": bundle.config.input_names} | row
                rows.append(row)
                print(json.dumps(row), flush=True)
                if first is None and d == "A12-A01":
                    first = (pooled, examples, tgt_class)
    result = {"rows_of_well": [y0, y1], "crop_size": args.size, "machine": platform.platform(),
              "threads": args.threads, "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    if first is not None:
        pooled, examples, tgt = first
        if args.figure:
            save_figure(Path(args.figure), [(*e, wells[tgt][i % len(wells[tgt])]) for i, e in enumerate(examples)])
        if args.hist_figure:
            histogram_figure({"A12 source": pooled["source"], "translated to A01": pooled["translated_source_nuclei"],
                              "control": pooled["control"], "A01 real": target_cells[tgt]}, args.hist_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
