"""Per-cell phenotype measures in the core, and `virtualstain phenotype` on real wells of the NF-kB assay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main
from napari_virtualstain.core.phenotype import compare, fraction_of_the_way, per_cell, pooled_ratio, pooled_sums


def test_per_cell_ratio_of_known_cells():
    nuclei = np.zeros((60, 80), np.int32)
    marker = np.ones((60, 80), np.float32)
    yy, xx = np.mgrid[:60, :80]
    for i, (cy, cx, inside) in enumerate([(20, 20, 2.0), (40, 55, 0.5)], start=1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        nuclei[disk], marker[disk] = i, inside
    cells = per_cell(marker, nuclei, ring_width=4)
    assert list(cells.label) == [1, 2]
    np.testing.assert_allclose(cells.ratio, [2.0, 0.5])
    assert [r["cell"] for r in cells.rows()] == [1, 2]


def test_pooled_ratio_weighs_pixels_not_cells():
    """Two nuclei: a big one with the marker 3x its ring, a small one with 1x — the per-cell median is 2, the pooled
    ratio sits near the big cell's, and pooling two images sums their pixels before dividing."""
    yy, xx = np.mgrid[:80, :120]
    image = np.ones((2, 80, 120), np.float32)
    big = (yy - 40) ** 2 + (xx - 35) ** 2 < 15**2
    small = (yy - 40) ** 2 + (xx - 95) ** 2 < 4**2
    image[1][big | small] = 10.0  # DNA
    image[0][big] = 3.0
    parts = pooled_sums(image, ring_width=4)
    assert parts[1] == pytest.approx((big | small).sum(), rel=0.05) and parts[3] > 0  # Otsu of the smoothed DNA
    assert 2.5 < pooled_ratio(parts) < 3.0
    assert pooled_ratio([parts, parts]) == pytest.approx(pooled_ratio(parts))


def test_distribution_distances_and_fraction_of_the_way():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.1, 500), rng.normal(2.0, 0.1, 500)
    c = compare(a, b)
    assert c["ks"] > 0.99 and c["wasserstein"] == pytest.approx(1.0, abs=0.05)
    assert compare(a, a)["ks"] == 0.0
    assert fraction_of_the_way(a, (a + b) / 2, b) == pytest.approx(0.5, abs=0.02)


def test_phenotype_command_separates_stimulated_from_unstimulated_wells(shared_data, tmp_path, capsys):
    from napari_virtualstain.core.io import read_image

    d = shared_data / "nfkb_translocation"
    for well in ("A12", "A01"):  # held-out rows of both wells, as named 2-channel files
        (tmp_path / well).mkdir()
        nfkb, dna = read_image(d / f"{well}_nfkb.tif"), read_image(d / f"{well}_dna.tif")
        for i, x in enumerate((0, 512)):
            tifffile.imwrite(tmp_path / well / f"crop{i}.tif", np.stack([nfkb[768:1024, x : x + 256],
                                                                          dna[768:1024, x : x + 256]]),
                             imagej=True, metadata={"axes": "CYX", "Labels": ["NF-kB", "DNA"]})
    out = tmp_path / "report"
    assert main(["phenotype", "--group", f"source={tmp_path / 'A12'}", "--group", f"translated={tmp_path / 'A01'}",
                 "--group", f"target={tmp_path / 'A01'}", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    source, target = (summary["groups"][k]["median_ratio"] for k in ("source", "target"))
    assert target > source + 0.3  # stimulated: NF-kB in the nucleus
    assert summary["pairs"]["source vs target"]["ks"] > 0.5
    assert summary["fraction_of_the_way"] == pytest.approx(1.0)
    assert (out / "ratios.png").is_file() and "median ratio" in capsys.readouterr().out
    assert main(["phenotype", "--group", f"x={tmp_path / 'A12'}", "--marker", "GFP", "-o", str(out)]) == 2
    assert "no channel named 'GFP'" in capsys.readouterr().err
