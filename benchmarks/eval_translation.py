"""Condition translation on held-out NF-kB crops (BBBC014 A12 unstimulated -> A01 stimulated): does NF-kB move into
the nucleus, do the cells stay the same cells, and how good is the reconstruction control?

    python benchmarks/eval_translation.py runs/demo-nfkb -o benchmarks/results/translation_nfkb.json \\
        --figure docs/images/translation_nfkb.png

Held-out: rows 768-1023 of each well (configs/demo-nfkb.yaml trains on rows 0-767 only), cut into crops.
Per crop: the median per-cell ratio of ``core.phenotype`` (nuclei from the DNA channel by Otsu + watershed, a 6 px
cytoplasmic ring per cell; ratio = mean NF-kB in the nucleus / in its ring; ``virtualstain phenotype`` reports the
same per-cell distributions). Results before this change used a per-crop pooled ratio (Otsu mask, 6 px dilation). Reported: the ratio of real A12 crops (before),
their translations (after), real A01 crops (target), "fraction of the way" = (after - before) / (target - before);
SSIM of the DNA channel translation vs source (same cells?) on the source's 1-99.8 percentile scale; PSNR of the
reconstruction control vs the source on the same scale, and of the NF-kB channel.
"""

from __future__ import annotations

import argparse
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
from napari_virtualstain.core.phenotype import measure_image
from napari_virtualstain.core.postprocess import stain_to_labels
from napari_virtualstain.core.tasks.classcond import translate

DATA = Path(__file__).resolve().parents[2] / "shared/data/nfkb_translocation"


def crops(well: str, size: int, rows=(768, 1024)):
    nfkb = read_image(DATA / f"{well}_nfkb.tif").astype(np.float32)
    dna = read_image(DATA / f"{well}_dna.tif").astype(np.float32)
    out = []
    for y in range(rows[0], rows[1] - size + 1, size):
        for x in range(0, nfkb.shape[1] - size + 1, size):
            out.append(np.stack([nfkb[y : y + size, x : x + size], dna[y : y + size, x : x + size]]))
    return out


def nuclei_labels(dna: np.ndarray) -> np.ndarray:
    """Nuclei as the core measures them (``core.phenotype``: Otsu + watershed on the DNA channel)."""
    return stain_to_labels(dna)


def nuc_cyto_ratio(img: np.ndarray, nuclei: np.ndarray | None = None) -> float:
    """Median per-cell nuclear/cytoplasmic NF-kB ratio of a (NF-kB, DNA) crop (``core.phenotype.measure_image``)."""
    ratio = measure_image(img, marker=0, dna=1, nuclei=nuclei).ratio
    return float(np.median(ratio)) if len(ratio) else float("nan")


def scaled_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    pn, tn, _ = normalize_pair(pred, truth)
    return image_metrics(pn, tn)


def save_figure(path: Path, rows: list[tuple[np.ndarray, ...]]) -> None:
    """source | translated | control | difference | a real A01 crop, NF-kB channel, one row per example."""
    from PIL import Image

    tiles = []
    for src, tr, ctl, diff, real in rows:
        lo, hi = np.percentile(np.concatenate([src[0].ravel(), real[0].ravel()]), [1, 99.8])

        def grey(a):
            return np.repeat((np.clip((a - lo) / (hi - lo), 0, 1) * 255)[..., None], 3, -1)

        d = diff[0] / max(np.abs(diff[0]).max(), 1e-6)
        div = np.stack([np.clip(1 + np.minimum(d, 0), 0, 1), np.clip(1 - np.abs(d), 0, 1), np.clip(1 - np.maximum(d, 0), 0, 1)], -1) * 255
        sep = np.full((src.shape[1], 4, 3), 255.0)
        tiles.append(np.concatenate([grey(src[0]), sep, grey(tr[0]), sep, grey(ctl[0]), sep, div, sep, grey(real[0])], 1))
        tiles.append(np.full((4, tiles[-1].shape[1], 3), 255.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles[:-1]).astype(np.uint8)).resize(
        (tiles[0].shape[1] * 2, (sum(t.shape[0] for t in tiles[:-1])) * 2), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--max-crops", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    src_crops = [c for c in crops("A12", args.size) if (nuclei_labels(c[1]) > 0).sum() > 200][: args.max_crops]
    real_a01 = [c for c in crops("A01", args.size) if (nuclei_labels(c[1]) > 0).sum() > 200]
    per_crop, figure_rows = [], []
    t0 = time.perf_counter()
    for i, src in enumerate(src_crops):
        res = translate(bundle, src, "A12", "A01", steps=args.steps, guidance=args.guidance, strength=args.strength)
        mask = nuclei_labels(src[1])
        per_crop.append({
            "crop": i,
            "ratio_source": nuc_cyto_ratio(src),
            "ratio_translated": nuc_cyto_ratio(res.translated),
            "ratio_translated_source_nuclei": nuc_cyto_ratio(res.translated, mask),
            "ratio_control": nuc_cyto_ratio(res.control),
            "dna_ssim_translated_vs_source": scaled_metrics(res.translated[1], src[1])["ssim"],
            "control_psnr_dna": scaled_metrics(res.control[1], src[1])["psnr"],
            "control_psnr_nfkb": scaled_metrics(res.control[0], src[0])["psnr"],
            "control_ssim_nfkb": scaled_metrics(res.control[0], src[0])["ssim"],
        })
        print(json.dumps(per_crop[-1]), flush=True)
        if len(figure_rows) < 3:
            figure_rows.append((src, res.translated, res.control, res.difference, real_a01[len(figure_rows) % len(real_a01)]))
    seconds = time.perf_counter() - t0

    def mean(key):
        return float(np.nanmean([c[key] for c in per_crop]))

    target = float(np.nanmean([nuc_cyto_ratio(c) for c in real_a01]))
    before, after = mean("ratio_source"), mean("ratio_translated")
    summary = {
        "n_crops": len(per_crop), "crop_size": args.size, "steps": args.steps, "guidance": args.guidance,
        "strength": args.strength, "ratio_A12_real": before, "ratio_A12_translated": after,
        "ratio_A12_translated_source_nuclei": mean("ratio_translated_source_nuclei"),
        "ratio_A12_control": mean("ratio_control"), "ratio_A01_real": target, "n_A01_crops": len(real_a01),
        "fraction_of_the_way": (after - before) / (target - before) if target != before else float("nan"),
        "dna_ssim_translated_vs_source": mean("dna_ssim_translated_vs_source"),
        "control_psnr_dna": mean("control_psnr_dna"), "control_psnr_nfkb": mean("control_psnr_nfkb"),
        "control_ssim_nfkb": mean("control_ssim_nfkb"), "seconds_per_crop": seconds / max(len(per_crop), 1),
    }
    print(json.dumps(summary, indent=1))
    result = {"bundle": bundle.config.name, "bundle_id": bundle.id, "training_steps": bundle.config.training.get("history", [{}])[-1].get("step"),
              "machine": platform.platform(), "threads": args.threads, "summary": summary, "crops": per_crop}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    if args.figure:
        save_figure(Path(args.figure), figure_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
