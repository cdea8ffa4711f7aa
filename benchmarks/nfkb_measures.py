"""Why do two measures of NF-kB translocation disagree on the same translation? (issue 20, item 6)

    python benchmarks/nfkb_measures.py -o benchmarks/results/nfkb_measures.json

On the held-out bottom-right 256² crop of both BBBC014 wells (the sample data's crop), ``demo-nfkb`` translates
each well into the other at its validated settings; "fraction of the way" = (translated − source) / (real other
well − source) is then computed three ways on the same images: the pooled ratio (mean NF-kB in all Otsu nuclei of
the DNA over the mean in a 6 px ring around them), the median of per-cell ratios (``core.phenotype``, the project's
translation benchmark) and their mean. Same crop, same translation: any difference is the measure's. Each is also
given against the other well's population (its held-out rows 768-1023, all columns, in 256² tiles): the cells at
the crop's coordinates in the other well are not these cells' counterparts, and only ~20 of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tifffile

from napari_virtualstain._sample_data import NFKB_CROP, nfkb_data_dir
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.phenotype import measure_image, pooled_ratio, pooled_sums
from napari_virtualstain.core.settings import RunSettings
from napari_virtualstain.core.tasks.classcond import translate


def cell_ratios(image: np.ndarray) -> np.ndarray:
    c = measure_image(image, 0, 1)
    return c.nuclear / c.ring


def tiles(image: np.ndarray, size: int = 256) -> list[np.ndarray]:
    """(C, Y, X) -> its size x size tiles (the population's measures are made tile by tile, as on the crop)."""
    return [image[:, y : y + size, x : x + size] for y in range(0, image.shape[1] - size + 1, size)
            for x in range(0, image.shape[2] - size + 1, size)]


def fraction(source: float, translated: float, target: float) -> float:
    return (translated - source) / (target - source)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    folder = nfkb_data_dir()
    wells = {w: np.stack([tifffile.imread(folder / f"{w}_{c}.tif")[NFKB_CROP] for c in ("nfkb", "dna")])
             .astype(np.float32) for w in ("A01", "A12")}
    held_out = {w: np.stack([tifffile.imread(folder / f"{w}_{c}.tif")[768:1024] for c in ("nfkb", "dna")])
                .astype(np.float32) for w in ("A01", "A12")}  # each well's held-out rows, all columns
    population = {w: {"pooled": pooled_ratio([pooled_sums(c) for c in tiles(x)]),
                      "per_cell_median": float(np.median(np.concatenate([cell_ratios(c) for c in tiles(x)])))}
                  for w, x in held_out.items()}
    bundle = load_bundle("demo-nfkb")
    report = {"bundle": bundle.id, "crop": "rows 768-1023, columns 1104-1359", "sampling": bundle.config.sampling}
    for src, tgt in (("A12", "A01"), ("A01", "A12")):
        tr = translate(bundle, wells[src], src, tgt, channel_axis=0, settings=RunSettings(threads=1)).translated
        cells = [cell_ratios(x) for x in (wells[src], tr, wells[tgt])]
        pooled = [pooled_ratio(pooled_sums(x)) for x in (wells[src], tr, wells[tgt])]
        medians = [float(np.median(c)) for c in cells]
        means = [float(np.mean(c)) for c in cells]
        report[f"{src}->{tgt}"] = {
            "dna_identical": bool(np.array_equal(tr[1], wells[src][1])),
            "cells": [len(c) for c in cells],
            "pooled": {"source": pooled[0], "translated": pooled[1], "target": pooled[2], "fraction": fraction(*pooled)},
            "per_cell_median": {"source": medians[0], "translated": medians[1], "target": medians[2],
                                "fraction": fraction(*medians)},
            "per_cell_mean": {"source": means[0], "translated": means[1], "target": means[2],
                              "fraction": fraction(*means)},
            # the same translated cells against the other well's population (held-out rows 768-1023): the cells
            # at the same coordinates of another well are other cells, a small and arbitrary reference
            "vs_population": {k: {"target": population[tgt][k],
                                  "fraction": fraction(v[0], v[1], population[tgt][k])}
                              for k, v in (("pooled", pooled), ("per_cell_median", medians))},
        }
        r = report[f"{src}->{tgt}"]
        print(f"{src}->{tgt}: fraction of the way pooled {r['pooled']['fraction']:.2f}, per-cell median "
              f"{r['per_cell_median']['fraction']:.2f}, per-cell mean {r['per_cell_mean']['fraction']:.2f}; against "
              f"the other well's held-out rows: pooled {r['vs_population']['pooled']['fraction']:.2f}, per-cell "
              f"median {r['vs_population']['per_cell_median']['fraction']:.2f} "
              f"(cells {r['cells']}; DNA identical: {r['dna_identical']})")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
