"""`virtualstain evaluate`: metrics against hand-computed values, and the report (CSV, JSON, figures) end to end."""

from __future__ import annotations

import csv
import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.evaluate import DEFAULT_IOU_THRESHOLDS, evaluate, write_report
from napari_virtualstain.core.io import write_channels, write_labels
from napari_virtualstain.core.metrics import (
    image_metrics,
    label_overlap,
    match_labels,
    match_pairs,
    matching_sweep,
    normalize_pair,
    pool_matching,
)

# --------------------------------------------------------------------------------------------------------------
# image metrics


def _ramp(h=16, w=16):
    return np.add.outer(np.arange(h), np.arange(w)) / (h + w - 2)  # 0..1


def test_image_metrics_perfect_prediction():
    t = _ramp()
    m = image_metrics(t.copy(), t)
    assert m["pearson"] == pytest.approx(1.0)
    assert m["mse"] == 0.0 and math.isinf(m["psnr"])
    assert m["ssim"] == pytest.approx(1.0)


def test_image_metrics_offset_and_shifted_stripes():
    t = _ramp() * 0.8
    m = image_metrics(t + 0.1, t)  # MSE 0.01 -> PSNR 10 log10(1 / 0.01) = 20 dB; a constant offset keeps r = 1
    assert m["mse"] == pytest.approx(0.01)
    assert m["psnr"] == pytest.approx(20.0)
    assert m["pearson"] == pytest.approx(1.0)

    stripes = np.repeat((np.arange(8) % 2).astype(float)[:, None], 8, axis=1)  # rows 0, 1, 0, 1, ...
    shifted = np.roll(stripes, 1, axis=0)  # = 1 - stripes
    m = image_metrics(shifted, stripes)
    assert m["pearson"] == pytest.approx(-1.0)
    assert m["mse"] == pytest.approx(1.0)
    assert m["psnr"] == pytest.approx(0.0)


def test_ssim_of_constants_is_the_luminance_term():
    a, b, c1 = 0.5, 0.6, (0.01 * 1.0) ** 2  # variances 0: SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    m = image_metrics(np.full((9, 9), b), np.full((9, 9), a))
    assert m["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert not math.isnan(image_metrics(np.full((5, 5), b), np.full((5, 5), a))["ssim"])  # smaller window, no crash


def test_normalize_pair_uses_the_truths_percentiles():
    truth = np.arange(101.0).reshape(1, 101)  # percentiles 1 and 99.8 are 1.0 and 99.8
    pred_n, truth_n, (lo, hi) = normalize_pair(truth + 10, truth)
    assert (lo, hi) == pytest.approx((1.0, 99.8))
    assert truth_n[0, 50] == pytest.approx(49 / 98.8)
    assert truth_n[0, 0] == 0.0 and truth_n[0, 100] == 1.0  # clipped
    assert pred_n[0, 50] == pytest.approx(59 / 98.8) and pred_n[0, 95] == 1.0
    with pytest.raises(VirtualStainError, match="constant"):
        normalize_pair(truth, np.full((4, 4), 3.0))


# --------------------------------------------------------------------------------------------------------------
# instance matching


def _boxes(shape, boxes):
    lab = np.zeros(shape, np.uint32)
    for i, (y0, y1, x0, x1) in boxes.items():
        lab[y0:y1, x0:x1] = i
    return lab


TRUE = _boxes((24, 24), {1: (0, 4, 0, 4), 2: (10, 14, 10, 14)})
# pred 5 shifts true 1 by one column: overlap 12, union 20 -> IoU 0.6; pred 9 shifts true 2 by two: 8 / 24 = 1/3;
# pred 300 touches nothing.
PRED = _boxes((24, 24), {5: (0, 4, 1, 5), 9: (10, 14, 12, 16), 300: (20, 23, 0, 3)})


def test_overlap_ious():
    ov = label_overlap(TRUE, PRED)
    assert list(ov.true_ids) == [1, 2] and list(ov.pred_ids) == [5, 9, 300]
    got = {(int(ov.true_ids[t]), int(ov.pred_ids[p])): v for t, p, v in zip(ov.pair_true, ov.pair_pred, ov.pair_iou)}
    assert got == pytest.approx({(1, 5): 0.6, (2, 9): 1 / 3})


def test_matching_known_case():
    r = match_labels(TRUE, PRED, 0.5, return_matches=True)
    assert (r["n_true"], r["n_pred"], r["tp"], r["fp"], r["fn"]) == (2, 3, 1, 2, 1)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 2)
    assert r["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert r["mean_matched_iou"] == pytest.approx(0.6)
    assert r["panoptic_quality"] == pytest.approx(0.6 / (1 + 1 + 0.5))
    assert r["matches"] == [(1, 5, pytest.approx(0.6))]

    r = match_labels(TRUE, PRED, 0.3)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 0)
    assert r["f1"] == pytest.approx(0.8)
    assert r["mean_matched_iou"] == pytest.approx((0.6 + 1 / 3) / 2)
    assert r["panoptic_quality"] == pytest.approx((0.6 + 1 / 3) / 2.5)

    sweep = matching_sweep(TRUE, PRED, [0.5, 0.6, 0.7])
    assert [s["tp"] for s in sweep] == [1, 1, 0]
    assert sweep[2]["f1"] == 0.0 and sweep[2]["panoptic_quality"] == 0.0


def test_perfect_and_empty_matching():
    r = match_labels(TRUE, TRUE, 0.9)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 0, 0)
    assert (r["f1"], r["mean_matched_iou"], r["panoptic_quality"]) == (1.0, 1.0, 1.0)
    empty = np.zeros_like(TRUE)
    r = match_labels(TRUE, empty)
    assert (r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"]) == (0, 0, 2, 0.0, 0.0, 0.0)
    assert match_labels(empty, empty)["f1"] == 0.0


def test_exactly_half_iou_is_still_one_to_one():
    truth = _boxes((8, 8), {1: (0, 4, 0, 4)})
    halves = _boxes((8, 8), {1: (0, 4, 0, 2), 2: (0, 4, 2, 4)})  # each half: 8 / 16 = IoU 0.5 with the truth
    r = match_labels(truth, halves, 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    assert r["mean_matched_iou"] == pytest.approx(0.5)


def test_hungarian_maximises_matches_then_iou():
    # greedy-by-IoU takes t0-p0 (0.45) and leaves t1 alone; the one-to-one optimum matches both
    pt, pp, iou = [0, 0, 1], [0, 1, 0], [0.45, 0.30, 0.30]
    chosen = match_pairs(pt, pp, iou, 0.25)
    assert sorted((pt[i], pp[i]) for i in chosen) == [(0, 1), (1, 0)]
    # equal numbers of matches: the larger summed IoU wins (0.4 + 0.35 over 0.3 + 0.3)
    pt, pp, iou = [0, 0, 1, 1], [0, 1, 0, 1], [0.4, 0.3, 0.3, 0.35]
    chosen = match_pairs(pt, pp, iou, 0.25)
    assert sorted((pt[i], pp[i]) for i in chosen) == [(0, 0), (1, 1)]


def test_pooled_scores_sum_counts_over_images():
    a, b = match_labels(TRUE, PRED, 0.5), match_labels(TRUE, TRUE, 0.5)
    p = pool_matching([a, b])
    assert (p["tp"], p["fp"], p["fn"]) == (3, 2, 1)
    assert p["f1"] == pytest.approx(6 / (6 + 2 + 1))
    assert p["panoptic_quality"] == pytest.approx((0.6 + 2.0) / (3 + 1 + 0.5))


# --------------------------------------------------------------------------------------------------------------
# report, end to end

NAMES = ["Hoechst", "nuclei boundary", "nuclei foreground"]


def _make_case(tmp_path, stems=("f1", "f2"), shape=(24, 24)):
    """Truth stains + labels, inputs, and two methods: 'perfect' (exact copy) and 'shifted' (rolled by 1 column)."""
    rng = np.random.default_rng(0)
    for stem in stems:
        hoechst = (rng.random(shape) * 1000 + 100).astype(np.float32)
        (tmp_path / "truth").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "truth" / f"{stem}.tif", hoechst)
        lab = _boxes(shape, {1: (0, 4, 0, 4), 2: (10, 14, 10, 14)})
        write_labels(tmp_path / "true_labels" / f"{stem}.tif", lab, {})
        (tmp_path / "inputs").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "inputs" / f"{stem}.tif", (rng.random(shape) * 200).astype(np.uint16))
        for method, shift in (("perfect", 0), ("shifted", 1)):
            pred = np.stack([np.roll(hoechst, shift, axis=1), rng.random(shape), rng.random(shape)])
            prov = {"bundle_name": method, "seed": 0}
            write_channels(tmp_path / method / f"{stem}_virtualstain.tif", pred, NAMES, prov)
            write_labels(tmp_path / method / f"{stem}_nuclei_labels.tif", np.roll(lab, shift, axis=1), prov)
    return tmp_path


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_evaluate_writes_report(tmp_path, capsys):
    _make_case(tmp_path)
    out = tmp_path / "report"
    rc = main(["evaluate", "--pred", f"perfect={tmp_path / 'perfect'}", "--pred", str(tmp_path / "shifted"),
               "--truth", str(tmp_path / "truth"), "--truth-channels", "Hoechst",
               "--labels", f"nuclei={tmp_path / 'true_labels'}", "--input", str(tmp_path / "inputs"), "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perfect Hoechst" in printed and "wrote" in printed and "F1 1.000" in printed
    notes = [ln for ln in printed.splitlines() if ln.startswith("note:")]
    assert len(notes) == len(set(notes)) == 2 and all("'nuclei boundary', 'nuclei foreground'" in ln for ln in notes)

    rows = _read_csv(out / "metrics.csv")
    image_rows = [r for r in rows if r["metric_type"] == "image"]
    inst_rows = [r for r in rows if r["metric_type"] == "instances"]
    assert len(image_rows) == 2 * 2  # methods x images, one channel (boundary/foreground have no truth: skipped)
    assert len(inst_rows) == 2 * 2 * len(DEFAULT_IOU_THRESHOLDS)
    perfect = [r for r in image_rows if r["method"] == "perfect"]
    assert all(float(r["pearson"]) == pytest.approx(1.0) and r["psnr"] == "inf" for r in perfect)
    assert all(float(r["mse"]) == 0 for r in perfect)
    assert all(r["target"] == "Hoechst" and float(r["norm_high"]) > float(r["norm_low"]) for r in perfect)
    shifted = [r for r in image_rows if r["method"] == "shifted"]
    assert all(float(r["pearson"]) < 0.5 for r in shifted)  # noise rolled by a pixel is uncorrelated
    at = {(r["method"], r["image"], float(r["iou_threshold"])): r for r in inst_rows}
    assert float(at["perfect", "f1", 0.9]["f1"]) == 1.0
    r = at["shifted", "f1", 0.5]  # both 4x4 boxes shifted one column: IoU 12/20 = 0.6 each
    assert (int(r["tp"]), int(r["fp"]), int(r["fn"])) == (2, 0, 0)
    assert float(r["mean_matched_iou"]) == pytest.approx(0.6)
    assert int(at["shifted", "f1", 0.65]["tp"]) == 0

    summary = _read_csv(out / "summary.csv")
    s = {(r["method"], r["target"], r["iou_threshold"]): r for r in summary}
    assert s["shifted", "nuclei", "0.5"]["n_images"] == "2" and float(s["shifted", "nuclei", "0.5"]["f1"]) == 1.0
    assert float(s["perfect", "Hoechst", ""]["ssim"]) == pytest.approx(1.0)

    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert report["methods"] == ["perfect", "shifted"]
    assert "99.8" in report["settings"]["normalisation"]
    assert len(report["rows"]) == len(rows)
    assert any(f["provenance"].get("bundle_name") == "shifted" for f in report["files"])
    assert any("nuclei boundary" in n for n in report["notes"])
    assert "| perfect | Hoechst |" in (out / "report.md").read_text()

    pngs = sorted((out / "figures").glob("*.png"))
    assert {p.name for p in pngs} == {"f1.png", "f2.png", "metrics_summary.png", "instances_vs_iou.png"}
    for p in pngs:
        img = iio.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200 and img.shape[2] == 3
        assert img.std() > 10  # something is drawn


def test_evaluate_api_multichannel_truth(tmp_path):
    _make_case(tmp_path, stems=("a",))
    hoechst = tifffile.imread(tmp_path / "truth" / "a.tif")
    (tmp_path / "truth2").mkdir()
    tifffile.imwrite(tmp_path / "truth2" / "a.tif", np.stack([np.ones_like(hoechst), hoechst]))  # (C, Y, X)
    report = evaluate({"perfect": tmp_path / "perfect"}, tmp_path / "truth2", truth_channels=["Actin", "hoechst"])
    assert [(r["target"], r["pearson"]) for r in report.rows] == [("Hoechst", pytest.approx(1.0))]
    assert any("'Actin'" in n for n in report.notes)
    assert report.summary_value("perfect", "Hoechst", "mse") == 0.0
    written = write_report(report, tmp_path / "rep")
    assert (tmp_path / "rep" / "metrics.csv") in written and (tmp_path / "rep" / "figures" / "a.png") in written
    assert not (tmp_path / "rep" / "figures" / "instances_vs_iou.png").exists()  # no labels compared


def test_labels_only_evaluation(tmp_path):
    _make_case(tmp_path, stems=("a",))
    report = evaluate({"s": tmp_path / "shifted"}, label_dirs={"nuclei": tmp_path / "true_labels"},
                      iou_thresholds=[0.5, 0.7])
    assert [(r["iou_threshold"], r["tp"]) for r in report.rows] == [(0.5, 2), (0.7, 0)]


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_evaluate_errors(tmp_path, capsys):
    _make_case(tmp_path, stems=("a",))
    truth, labels = str(tmp_path / "truth"), f"nuclei={tmp_path / 'true_labels'}"
    out = ["-o", str(tmp_path / "rep")]
    (tmp_path / "other").mkdir()
    write_channels(tmp_path / "other" / "zzz_virtualstain.tif", np.zeros((3, 24, 24)), NAMES, {})
    assert "no matching files" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "other"), "--truth", truth, *out])

    (tmp_path / "small").mkdir()
    write_channels(tmp_path / "small" / "a_virtualstain.tif", np.zeros((3, 20, 24)), NAMES, {})
    assert "shape mismatch" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "small"), "--truth", truth, *out])

    err = _err(capsys, ["evaluate", "--pred", str(tmp_path / "perfect"), "--truth", truth, "--truth-channels", "DAPI",
                        *out])
    assert "unknown channel names" in err and "DAPI" in err and "Hoechst" in err

    err = _err(capsys, ["evaluate", "--pred", str(tmp_path / "perfect"), "--truth", truth, "--truth-channels",
                        "Hoechst,Actin", *out])
    assert "--truth-channels names 2" in err

    assert "NAME=FOLDER" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "perfect"), "--labels",
                                          str(tmp_path / "true_labels"), *out])
    assert "nothing to compare" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "perfect"), *out])
    assert "does not exist" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "nope"), "--truth", truth, *out])
    assert "(0, 1]" in _err(capsys, ["evaluate", "--pred", str(tmp_path / "perfect"), "--labels", labels,
                                     "--iou-thresholds", "0.5,1.5", *out])


def test_evaluate_reads_what_predict_writes(tiny_bundle_dir, tmp_path, capsys):
    """`virtualstain predict` outputs (channel names, labels file names) are what `evaluate` looks for."""
    rng = np.random.default_rng(0)
    for d in ("inputs", "truth", "true_labels"):
        (tmp_path / d).mkdir()
    tifffile.imwrite(tmp_path / "inputs" / "well.tif", (rng.random((32, 40)) * 3000 + 200).astype(np.uint16))
    tifffile.imwrite(tmp_path / "truth" / "well.tif", (rng.random((32, 40)) * 1000 + 100).astype(np.float32))
    tifffile.imwrite(tmp_path / "true_labels" / "well.tif", _boxes((32, 40), {1: (2, 12, 2, 12), 2: (15, 30, 20, 38)}))
    assert main(["predict", "-c", str(tiny_bundle_dir), str(tmp_path / "inputs"), "-o", str(tmp_path / "pred"), "-q",
                 "--tile-size", "32", "--tile-overlap", "8"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--pred", f"tiny={tmp_path / 'pred'}", "--truth", str(tmp_path / "truth"),
                 "--truth-channels", "Hoechst", "--labels", f"nuclei={tmp_path / 'true_labels'}",
                 "--input", str(tmp_path / "inputs"), "-o", str(tmp_path / "rep")]) == 0
    rows = _read_csv(tmp_path / "rep" / "metrics.csv")
    assert {(r["target"], r["metric_type"]) for r in rows} == {("Hoechst", "image"), ("nuclei", "instances")}
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["files"][0]["provenance"]["bundle_name"] == "tiny"
    assert (tmp_path / "rep" / "figures" / "well.png").stat().st_size > 0


def test_raw_pearson_shows_what_clipping_hides(tmp_path, capsys):
    """Four huge hot pixels in a prediction of a low-signal truth: clipped to 1 they barely move the clipped r
    (0.997), on the raw values they dominate it (0.09). pearson_raw must reach the CSV, JSON, Markdown and CLI."""
    rng = np.random.default_rng(1)
    truth = (rng.random((24, 24)) * 10 + 100).astype(np.float32)
    hot = truth.copy()
    hot[:2, :2] = 1e6
    (tmp_path / "truth").mkdir()
    tifffile.imwrite(tmp_path / "truth" / "a.tif", truth)
    write_channels(tmp_path / "hot" / "a_virtualstain.tif", hot[None], ["Hoechst"], {})
    write_channels(tmp_path / "same" / "a_virtualstain.tif", truth[None], ["Hoechst"], {})
    out = tmp_path / "rep"
    assert main(["evaluate", "--pred", f"hot={tmp_path / 'hot'}", "--pred", f"same={tmp_path / 'same'}",
                 "--truth", str(tmp_path / "truth"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if ln.startswith("hot Hoechst"))
    assert "Pearson r 0.997 (raw 0.087)" in line, line
    row = _read_csv(out / "metrics.csv")[0]
    assert row["method"] == "hot" and float(row["pearson"]) > 0.99 and float(row["pearson_raw"]) < 0.2
    summary = {r["method"]: r for r in _read_csv(out / "summary.csv")}
    assert float(summary["hot"]["pearson_raw"]) == pytest.approx(float(row["pearson_raw"]))
    assert float(summary["same"]["pearson_raw"]) == pytest.approx(1.0)
    report = json.loads((out / "report.json").read_text())
    assert {r["method"]: round(r["pearson_raw"], 3) for r in report["summary"]} == {"hot": 0.087, "same": 1.0}
    assert "pearson_raw" in report["settings"]["normalisation"]
    md = (out / "report.md").read_text()
    assert "Pearson r (raw)" in md and "| hot | Hoechst | 1 | 0.997 | 0.087 |" in md


def test_object_intervals_are_scored_on_the_real_stain_inside_each_predicted_object():
    from napari_virtualstain.core.evaluate.scores import object_interval_rows

    lab = np.zeros((8, 8), np.int32)
    lab[:4, :4], lab[4:, 4:] = 1, 2
    real = np.where(lab == 1, 100.0, 300.0)
    records = [{"label": "1", "confidence": "0.9", "Hoechst_low_90": "90", "Hoechst_high_90": "110"},
               {"label": "2", "confidence": "0.5", "Hoechst_low_90": "100", "Hoechst_high_90": "200"}]
    rows = object_interval_rows("m", "f", "nuclei", records, lab, (real[None], ["Hoechst"]))
    assert len(rows) == 1 and rows[0]["metric_type"] == "object_interval"
    assert rows[0]["interval_level"] == 0.9 and rows[0]["coverage"] == 0.5 and rows[0]["interval_width"] == 60
    assert object_interval_rows("m", "f", "nuclei", records, lab, (real[None], ["DAPI"])) == []  # no such stain
