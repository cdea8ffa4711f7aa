"""Trust per nucleus and per pixel: ensemble agreement, split-conformal intervals, CRPS; the CLI's doors to them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile

from napari_virtualstain.cli import main
from napari_virtualstain.core.bundle import load_bundle
from napari_virtualstain.core.confidence import (
    Ensemble,
    calibrate,
    conformal_quantile,
    crps_ensemble,
    interval_channels,
    nucleus_table,
    predict_ensemble,
    save_calibration,
)
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.tasks.stain import StainResult


def test_conformal_quantile_is_the_finite_sample_rank_and_crps_matches_its_definition():
    scores = np.arange(1, 101, dtype=float)
    assert conformal_quantile(scores, 0.9) == 91.0  # ceil(101 * 0.9) = 91st smallest
    assert conformal_quantile(scores, 0.999) == 100.0
    y = np.array([1.0])
    assert crps_ensemble(np.array([[1.0], [1.0]]), y) == 0.0
    assert crps_ensemble(np.array([[0.0], [2.0]]), y) == pytest.approx(0.5)  # E|X-y| - E|X-X'|/2 = 1 - 0.5


def _result(labels):
    img = np.zeros((2, *labels.shape), np.float32)
    img[0] = labels > 0
    return StainResult(img, ["Hoechst", "nuclei foreground"], ["stain", "foreground"], {"nuclei": labels}, {})


def test_agreement_is_one_where_every_member_drew_the_nucleus_and_zero_where_none_did():
    lab = np.zeros((32, 32), np.int32)
    lab[4:12, 4:12] = 1
    lab[20:28, 20:28] = 2
    other = lab.copy()
    other[other == 2] = 0  # the members never find nucleus 2
    ens = Ensemble(_result(lab), [_result(lab).image] * 3, "boundaries", [{"nuclei": other}, {"nuclei": other}])
    rows = {r["label"]: r for r in nucleus_table(ens, "nuclei", "Hoechst")}
    assert rows[1]["confidence"] == 1.0 and rows[1]["found_by"] == 1.0 and rows[1]["area_px"] == 64
    assert rows[2]["confidence"] == 0.0 and rows[2]["found_by"] == 0.0
    assert rows[1]["centroid_y"] == pytest.approx(7.5) and rows[1]["mean_Hoechst"] == pytest.approx(1.0)


def test_each_nucleus_gets_a_calibrated_interval_for_its_mean_stain(tiny_bundle_dir, tmp_path):
    """Per-object split conformal: on its own calibration nuclei the interval of each nucleus's mean stain holds the
    real mean for at least the level's fraction; the table carries low/high in the stain's units."""
    import shutil

    from napari_virtualstain.core.confidence import object_scores, object_tables

    shutil.copytree(tiny_bundle_dir, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    rng = np.random.default_rng(2)
    lab = np.zeros((40, 48), np.int32)
    for k in range(12):  # twelve 6x6 nuclei on a grid
        y, x = 2 + 12 * (k // 4), 2 + 12 * (k % 4)
        lab[y:y + 6, x:x + 6] = k + 1
    scores, cases = [], []
    for _ in range(10):
        res = _result(lab)
        res.image[0] = 400 + 50 * rng.standard_normal(lab.shape).astype(np.float32)
        members = [res.image + rng.normal(0, 20, res.image.shape).astype(np.float32) for _ in range(3)]
        ens = Ensemble(res, [res.image] + members, "boundaries", [{"nuclei": lab}] * 3)
        truth = res.image[0] + rng.normal(0, 60, lab.shape)  # the real stain differs per nucleus
        truth += np.where(lab > 0, rng.normal(0, 40, 13)[lab], 0)
        scores.append(object_scores(bundle, ens, lab, "Hoechst", truth))
        cases.append((ens, truth))
    assert all(len(s_) == 12 for s_ in scores)
    q = conformal_quantile(np.concatenate(scores), 0.9)
    save_calibration(bundle, {"bundle_id": bundle.id, "members": 4, "sigma_floor": 0.01, "images": 10,
                              "groups": ["background", "foreground"], "stains": {"Hoechst": {
                                  "pixels": {"background": 1, "foreground": 1},
                                  "q": {"background": {"0.9": 1.0}, "foreground": {"0.9": 1.0}}}},
                              "objects": {"nuclei": {"stain": "Hoechst", "objects": 120, "q": {"0.9": q}}}})
    from scipy import ndimage as ndi

    inside = []
    for ens, truth in cases:
        rows = object_tables(bundle, ens, 0.9)["nuclei"]
        real = ndi.mean(truth, lab, [r["label"] for r in rows])
        for r, y in zip(rows, real):
            assert r["Hoechst_low_90"] < r["mean_Hoechst"] < r["Hoechst_high_90"]
            inside.append(r["Hoechst_low_90"] <= y <= r["Hoechst_high_90"])
    assert np.mean(inside) >= 0.9
    with pytest.raises(VirtualStainError, match="level 0.8"):
        object_tables(bundle, cases[0][0], 0.8)
    assert "Hoechst_low_90" not in object_tables(bundle, cases[0][0])["nuclei"][0]  # no level, no interval
    from napari_virtualstain.core.confidence import load_calibration, object_interval_note

    assert object_interval_note(bundle) is None
    old = load_calibration(bundle)
    del old["objects"]  # a calibration made before per-nucleus intervals: pixel intervals only, and a note says so
    save_calibration(bundle, old)
    assert "calibrate" in object_interval_note(bundle)
    assert "Hoechst_low_90" not in object_tables(bundle, cases[0][0], 0.9)["nuclei"][0]


def test_calibrated_intervals_cover_their_level_and_refuse_a_mismatch(tiny_bundle_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_bundle_dir, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    rng = np.random.default_rng(0)
    pairs = [(rng.random((40, 48)).astype(np.float32), {"Hoechst": 100 + 900 * rng.random((40, 48))})
             for _ in range(3)]
    with pytest.raises(VirtualStainError, match="not calibrated"):
        interval_channels(bundle, predict_ensemble(bundle, pairs[0][0], 2, make_labels=False), 0.9)
    record = calibrate(bundle, pairs, (0.5, 0.9), members=3)
    assert set(record["stains"]["Hoechst"]["q"]) == {"background", "foreground"}
    save_calibration(bundle, record)
    inside = []
    for image, truth in pairs:
        ens = predict_ensemble(bundle, image, 3, make_labels=False)
        planes, names = interval_channels(bundle, ens, 0.9)
        assert names == ["Hoechst low 90%", "Hoechst high 90%"] and (planes[1] >= planes[0]).all()
        inside.append((truth["Hoechst"] >= planes[0]) & (truth["Hoechst"] <= planes[1]))
    assert np.mean(inside) >= 0.9  # on its own calibration pixels, conformal coverage is at least the level
    with pytest.raises(VirtualStainError, match="--members 3"):
        interval_channels(bundle, predict_ensemble(bundle, pairs[0][0], 2, make_labels=False), 0.9)
    with pytest.raises(VirtualStainError, match="level 0.8"):
        interval_channels(bundle, predict_ensemble(bundle, pairs[0][0], 3, make_labels=False), 0.8)


def test_cli_objects_table_calibrate_and_interval_channels(tiny_bundle_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_bundle_dir, tmp_path / "b")
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for sub in ("input", "target"):
        (data / sub).mkdir(parents=True)
    for i in range(2):
        tifffile.imwrite(data / "input" / f"f{i}.tif", (rng.random((40, 48)) * 1000).astype(np.uint16))
        tifffile.imwrite(data / "target" / f"f{i}.tif", (100 + rng.random((40, 48)) * 900).astype(np.uint16))
    field = data / "input" / "f0.tif"
    out = tmp_path / "out"
    assert main(["predict", "-c", str(tmp_path / "b"), str(field), "-o", str(out), "--interval", "0.9", "-q"]) == 2
    assert "virtualstain calibrate" in capsys.readouterr().err  # the fix it names is the command below
    assert main(["calibrate", str(tmp_path / "b"), str(data), "--stain-names", "Hoechst", "--members", "3"]) == 0
    assert (tmp_path / "b" / "calibration.json").is_file()
    # an untrained network draws no nuclei on the calibration images: no per-nucleus q, and predict says so
    record = json.loads((tmp_path / "b" / "calibration.json").read_text())
    assert record["objects"]["nuclei"] == {"stain": "Hoechst", "objects": 0, "q": {}}
    assert "nuclei (mean Hoechst of 0 predicted objects): none" in capsys.readouterr().out
    assert main(["predict", "-c", str(tmp_path / "b"), str(field), "-o", str(out), "--interval", "0.9", "--objects",
                 "--members", "3", "-q"]) == 0
    assert "held no predicted 'nuclei'" in capsys.readouterr().err
    from napari_virtualstain.core.io import read_channel_names

    names = read_channel_names(out / "f0_virtualstain.tif")
    assert names[-2:] == ["Hoechst low 90%", "Hoechst high 90%"]
    with open(out / "f0_nuclei_objects.csv") as fh:
        header = fh.readline()
        rows = list(csv.DictReader(fh))
    assert '"bundle_id"' in header and '"members": 3' in header
    if rows:
        assert 0 <= float(rows[0]["confidence"]) <= 1 and int(rows[0]["label"]) >= 1
    assert main(["calibrate", str(tmp_path / "b"), str(data), "--stain-names", "DAPI"]) == 2


def test_evaluate_scores_interval_coverage_and_confidence_from_predict_outputs(tiny_bundle_dir, tmp_path):
    """What predict --interval/--objects writes, evaluate scores: coverage, AUROC, reliability — consistent with the
    arrays themselves."""
    import shutil

    from napari_virtualstain.core.evaluate import evaluate, write_report

    shutil.copytree(tiny_bundle_dir, tmp_path / "b")
    rng = np.random.default_rng(2)
    for sub in ("data/input", "data/target", "truth", "nuc"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(2):
        img = (rng.random((40, 48)) * 1000).astype(np.uint16)
        stain = (100 + rng.random((40, 48)) * 900).astype(np.uint16)
        tifffile.imwrite(tmp_path / "data/input" / f"f{i}.tif", img)
        tifffile.imwrite(tmp_path / "data/target" / f"f{i}.tif", stain)
        tifffile.imwrite(tmp_path / "truth" / f"f{i}.tif", stain)
        lab = np.zeros((40, 48), np.uint16)
        lab[5:15, 5:15], lab[20:30, 25:35] = 1, 2
        tifffile.imwrite(tmp_path / "nuc" / f"f{i}.tif", lab)
    assert main(["calibrate", str(tmp_path / "b"), str(tmp_path / "data"), "--stain-names", "Hoechst",
                 "--members", "2", "--levels", "0.9"]) == 0
    assert main(["predict", "-c", str(tmp_path / "b"), str(tmp_path / "data/input"), "-o", str(tmp_path / "p"),
                 "--interval", "0.9", "--objects", "--members", "2", "-q"]) == 0
    report = evaluate({"tiny": tmp_path / "p"}, tmp_path / "truth", truth_channels=["Hoechst"],
                      label_dirs={"nuclei": tmp_path / "nuc"})
    cov = [r for r in report.summary if r["metric_type"] == "interval"]
    assert len(cov) == 1 and cov[0]["interval_level"] == 0.9 and cov[0]["coverage"] >= 0.9  # its own pixels
    conf = [r for r in report.summary if r["metric_type"] == "confidence"]
    if conf:  # an untrained network may draw no nuclei at all
        assert 0 <= conf[0]["matched_fraction"] <= 1
    written = write_report(report, tmp_path / "r")
    assert any(p.name == "report.md" for p in written)
    assert "Calibrated intervals" in (tmp_path / "r" / "report.md").read_text()
    assert not any("low 90%" in n for n in report.notes)
