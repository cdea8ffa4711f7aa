"""Uncertainty maps (DDPMavg, step-std, seed-std) and flags: running stats, windows, batching, flagging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_virtualstain.core.bundle import load_bundle, save_bundle
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.model import Denoiser, build_unet
from napari_virtualstain.core.schedulers import make_scheduler
from napari_virtualstain.core.tasks.stain import predict_stain
from napari_virtualstain.core.uncertainty import (
    RunningStats,
    flag_regions,
    predict_uncertainty,
    window_mask,
    write_flag_table,
)

from conftest import make_tiny_config
from napari_virtualstain.core.settings import RunSettings


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :56]
    return (1000 + 300 * np.sin(yy / 5) * np.cos(xx / 7) + 50 * rng.standard_normal((40, 56))).astype(np.uint16)


@pytest.fixture(scope="module")
def ddpm(tiny_ddpm_bundle_dir):
    return load_bundle(tiny_ddpm_bundle_dir)


def test_running_stats_match_a_stored_stack():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(9, 2, 3, 5, 7, generator=g) * 3 + 1
    rs = RunningStats()
    for x in stack:
        rs.add(x)
    assert rs.count == 9
    np.testing.assert_allclose(rs.mean.numpy(), stack.double().mean(0).numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rs.var.sqrt().numpy(), stack.double().std(0, unbiased=False).numpy(), rtol=1e-9)


def test_window_is_a_fraction_of_the_schedule():
    ddim = make_scheduler("ddpm", make_tiny_config("ddpm").scheduler, "ddim", 20)  # T = 100, t = 99, 94, ...
    mask = window_mask(ddim.timesteps, 100, (0.3, 0.8))
    chosen = [int(t) for t, m in zip(ddim.timesteps, mask) if m]
    assert chosen and all(30 <= t < 80 for t in chosen)
    assert len(chosen) == sum(30 <= int(t) < 80 for t in ddim.timesteps)
    rs = make_scheduler("residual_shift", make_tiny_config().scheduler)
    assert [int(t) for t, m in zip(rs.timesteps, window_mask(rs.timesteps, 15, (0.3, 0.8))) if m] == list(range(11, 4, -1))


@pytest.mark.parametrize("window", [(0.8, 0.3), (-0.1, 0.5), (0.2, 1.5)])
def test_window_outside_the_schedule_is_refused(window):
    with pytest.raises(VirtualStainError, match="outside the schedule"):
        window_mask(range(99, -1, -1), 100, window)


def test_window_without_steps_is_refused():
    with pytest.raises(VirtualStainError, match="contains no step"):
        window_mask([99, 49], 100, (0.6, 0.9))


def test_maps_equal_the_stack_of_step_estimates(ddpm, image, monkeypatch):
    """The running maps equal mean/std over a stored stack of the in-window x̂0 (captured from the same run)."""
    import napari_virtualstain.core.uncertainty as unc

    captured = []
    real_add = unc.RunningStats.add

    def spy(self, x):
        captured.append(x.detach().clone())
        real_add(self, x)

    monkeypatch.setattr(unc.RunningStats, "add", spy)
    res = predict_uncertainty(ddpm, image, mode="steps", seeds=[5], steps=12, window=(0.2, 0.9), make_labels=False)
    steps_in_window = sum(20 <= t < 90 for t in res.provenance["window_timesteps"])
    assert len(captured) == res.provenance["window_steps"] == steps_in_window
    stack = torch.stack(captured)[:, 0].double()  # (n_steps, C, H, W), normalised units
    vmin, vmax = 100.0, 1100.0  # Hoechst's fixed scale in the tiny config
    avg = ((stack.mean(0)[0] + 1) / 2 * (vmax - vmin) + vmin).numpy()
    std = (stack.std(0, unbiased=False)[0] * (vmax - vmin) / 2).numpy()
    np.testing.assert_allclose(res.map_channel("avg", "Hoechst"), avg, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(res.map_channel("std_steps", "Hoechst"), std, rtol=1e-5, atol=1e-3)
    assert res.maps["std_steps"].shape == (3, 40, 56) and "std_seeds" not in res.maps
    assert (res.maps["std_steps"][0] > 0).mean() > 0.5  # (x̂0 clipped at the range ends can sit still)


def test_seeds_batched_equal_seeds_one_by_one(ddpm, image):
    seeds = [0, 1, 2]
    # float32: under bf16 autocast with several threads oneDNN picks kernels per batch size, and their rounding,
    # amplified over the chain, reaches ~8 % (a batch of 3 is not 3 batches of 1 then; the seeds are still the same)
    exact = {"half": False}
    both = predict_uncertainty(ddpm, image, mode="both", seeds=seeds, steps=8, make_labels=False,
                               settings=RunSettings(batch_size=4, **exact))
    singles = [predict_uncertainty(ddpm, image, mode="steps", seeds=[s], steps=8, make_labels=False,
                                   settings=RunSettings(**exact)) for s in seeds]
    avgs = np.stack([r.maps["avg"] for r in singles])
    np.testing.assert_allclose(both.maps["avg"], avgs.mean(0), rtol=1e-4, atol=0.25)  # Hoechst range 1000: batch-order float noise
    np.testing.assert_allclose(both.maps["std_seeds"], avgs.std(0), rtol=1e-3, atol=0.25)
    rms = np.sqrt(np.mean([r.maps["std_steps"] ** 2 for r in singles], axis=0))
    np.testing.assert_allclose(both.maps["std_steps"], rms, rtol=1e-3, atol=0.25)
    assert both.maps["std_seeds"].max() > 1.0  # different seeds really differ (Hoechst units)
    # the prediction is the first seed's final sample, exactly what plain prediction gives for that seed
    plain = predict_stain(ddpm, image, seed=0, steps=8, make_labels=False, settings=RunSettings(**exact))
    np.testing.assert_allclose(both.stain.image, plain.image, rtol=1e-4, atol=0.25)  # Hoechst range 1000: batch-order float noise
    assert both.provenance["seeds"] == seeds and both.provenance["sampler"] == "ddim"


def test_residual_shift_has_seed_std_too(tiny_bundle_dir, image):
    rs = load_bundle(tiny_bundle_dir)
    res = predict_uncertainty(rs, image, mode="seeds", seeds=[0, 1], make_labels=False)
    assert set(res.maps) == {"avg", "std_seeds"}
    assert res.maps["std_seeds"].shape == (3, 40, 56) and res.maps["std_seeds"].max() > 0
    assert res.provenance["sampler"] == "residual_shift" and res.provenance["window_steps"] == 7


def test_bad_requests_are_refused(tmp_path, ddpm, image):
    with pytest.raises(VirtualStainError, match="at least 2 seeds"):
        predict_uncertainty(ddpm, image, mode="seeds", seeds=[0])
    with pytest.raises(VirtualStainError, match="seeds must differ"):
        predict_uncertainty(ddpm, image, mode="seeds", seeds=[1, 1])
    with pytest.raises(VirtualStainError, match="mode"):
        predict_uncertainty(ddpm, image, mode="everything")
    config = make_tiny_config("regression")
    reg = save_bundle(tmp_path / "reg", config, build_unet(config.unet))
    with pytest.raises(VirtualStainError, match="regression model"):
        predict_uncertainty(reg, image)
    with pytest.raises(VirtualStainError, match="1 or more steps"):  # 0 steps is a mean-anchored bundle's mu alone
        predict_uncertainty(ddpm, image, steps=0)


def _blobs():
    m = np.full((64, 64), 0.1, np.float32)
    m[5:25, 5:25] = 1.0  # a large region (400 px) with a hole
    m[12:16, 12:16] = 0.1
    m[40:43, 40:43] = 1.0  # a small one (9 px)
    m[50:60, 30:40] = 0.6  # a moderate one
    return m


def test_flags_respect_min_area_and_fill_holes():
    m = _blobs()
    res = flag_regions(m, 0.5, median_size=1, min_area=16)
    areas = sorted(r["area"] for r in res.table)
    assert areas == [100, 400]  # the 9-px blob is dropped, the hole filled
    assert res.labels.max() == 2 and (res.labels > 0).sum() == 500
    big = max(res.table, key=lambda r: r["area"])
    assert big["max_std"] == pytest.approx(1.0) and 0.9 < big["mean_std"] <= 1.0
    assert abs(big["centroid_y"] - 14.5) < 0.01 and abs(big["centroid_x"] - 14.5) < 0.01
    kept_small = flag_regions(m, 0.5, median_size=1, min_area=4)
    assert len(kept_small.table) == 3
    holes = flag_regions(m, 0.5, median_size=1, min_area=1, fill_holes=False)
    assert (holes.labels > 0).sum() == 400 - 16 + 9 + 100


def test_otsu_within_the_above_threshold_values():
    m = _blobs()
    res = flag_regions(m, 0.3, otsu=True, median_size=1, min_area=16)
    assert 0.6 <= res.threshold < 1.0
    assert [r["area"] for r in res.table] == [400]
    auto = flag_regions(m, None, median_size=1)
    assert auto.settings["otsu"] and auto.threshold < 1.0


@pytest.mark.parametrize("threshold", [2.0, 0.05, float("nan")])
def test_threshold_outside_the_map_range_is_refused(threshold):
    with pytest.raises(VirtualStainError, match="outside the map's range"):
        flag_regions(_blobs(), threshold, median_size=1)


def test_reflagging_needs_no_model_call(ddpm, image, monkeypatch, tmp_path):
    res = predict_uncertainty(ddpm, image, mode="steps", seeds=[0], steps=6, make_labels=False)

    def forbidden(*a, **k):
        raise AssertionError("the model ran while re-flagging")

    monkeypatch.setattr(Denoiser, "forward", forbidden)
    std = res.map_channel("std_steps", "Hoechst")
    lo, hi = np.percentile(std, [50, 99])
    loose = flag_regions(std, float(lo), min_area=4)
    strict = flag_regions(std, float(hi), min_area=4)
    assert (loose.labels > 0).sum() > (strict.labels > 0).sum()
    path = write_flag_table(tmp_path / "flags.csv", loose.table, {"channel": "Hoechst"})
    lines = path.read_text().splitlines()
    assert lines[0] == "channel,id,area,centroid_y,centroid_x,mean_std,max_std"
    assert len(lines) == 1 + len(loose.table)


def test_nan_and_3d_maps_are_refused():
    m = _blobs()
    m[0, 0] = np.nan
    with pytest.raises(VirtualStainError, match="NaN"):
        flag_regions(m)
    with pytest.raises(VirtualStainError, match="2D"):
        flag_regions(np.zeros((2, 8, 8)))


def test_cli_writes_maps_flags_and_provenance(tiny_ddpm_bundle_dir, image, tmp_path, capsys):
    import csv
    import json

    import tifffile

    from napari_virtualstain.cli import main

    tifffile.imwrite(tmp_path / "bf.tif", image)
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "bf.tif"), "-c", str(tiny_ddpm_bundle_dir), "-o", str(out), "-q",
               "--uncertainty", "both", "--seeds", "2", "--steps", "6", "--window", "0.1,0.9", "--flag-min-area", "4"])
    assert rc == 0
    names = {p.name for p in out.iterdir()}
    assert {"bf_virtualstain.tif", "bf_uncertainty.tif", "bf_flags_Hoechst.tif", "bf_flags.csv"} <= names
    with tifffile.TiffFile(out / "bf_uncertainty.tif") as tf:
        labels = tf.imagej_metadata["Labels"]
        maps = tf.asarray()
        prov = json.loads(tf.imagej_metadata["Info"])
    assert maps.shape == (9, 40, 56) and labels[0] == "Hoechst avg" and "Hoechst std_seeds" in labels
    assert prov["seeds"] == [0, 1] and prov["uncertainty"] == "both" and prov["steps"] == 6
    assert prov["bundle_id"] == load_bundle(tiny_ddpm_bundle_dir).id
    flags = tifffile.imread(out / "bf_flags_Hoechst.tif")
    with open(out / "bf_flags.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert flags.shape == (40, 56) and len(rows) == flags.max()
    assert all(r["channel"] == "Hoechst" and r["map"] == "std_seeds" for r in rows)
    assert all(int(r["area"]) >= 4 for r in rows)


@pytest.mark.parametrize("extra, message", [
    (["--uncertainty", "seeds"], "at least 2 seeds"),
    (["--uncertainty", "steps", "--window", "0.95,0.99", "--steps", "4"], "contains no step"),
    (["--uncertainty", "steps", "--window", "0.3"], "--window takes two fractions"),
    (["--seeds", "3"], "--seeds is for --uncertainty"),
])
def test_cli_refuses_bad_uncertainty_options(tiny_ddpm_bundle_dir, image, tmp_path, capsys, extra, message):
    import tifffile

    from napari_virtualstain.cli import main

    tifffile.imwrite(tmp_path / "bf.tif", image)
    rc = main(["predict", str(tmp_path / "bf.tif"), "-c", str(tiny_ddpm_bundle_dir), "-o", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_review_budget_outside_0_1_before_any_model_runs(tmp_path, capsys):
    from napari_virtualstain.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", str(tmp_path / "bf.tif"), "-c", "demo-stain", "-o", str(tmp_path / "o"),
              "--uncertainty", "seeds", "--seeds", "2", "--flag-max-area", "1.5"])
    assert exc.value.code == 2
    assert "--flag-max-area: a fraction of the image in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_auroc_matches_pairwise_definition():
    from napari_virtualstain.core.metrics import auroc

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # ties on purpose
    positive = rng.random(300) < 0.2 + 0.5 * (scores > 0.5)
    p, n = scores[positive], scores[~positive]
    pairwise = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (p.size * n.size)
    assert auroc(scores, positive) == pytest.approx(pairwise, abs=1e-12)
    assert auroc(positive.astype(float), positive) == 1.0
    assert np.isnan(auroc(scores, np.zeros(300, bool)))


def test_review_flags_merge_fragments_and_keep_the_most_uncertain():
    """Many scattered specks above the threshold become at most ``max_regions`` regions, the strongest first."""
    rng = np.random.default_rng(0)
    m = rng.random((120, 120)).astype(np.float32) * 0.1
    for i in range(30):  # 30 separate 6x6 blobs, the later ones stronger
        y, x = 10 + (i // 6) * 20, 10 + (i % 6) * 20
        m[y : y + 6, x : x + 6] = 0.5 + i * 0.01
    m[60:66, 100:104] = 2.0  # two fragments 2 px apart: one region once merged
    m[60:66, 106:110] = 2.0
    plain = flag_regions(m, 0.3, median_size=1, min_area=16)
    assert plain.labels.max() >= 30
    review = flag_regions(m, 0.3, median_size=1, min_area=16, merge_radius=3, max_regions=5)
    assert review.labels.max() == 5 and review.settings["regions_dropped"] > 0
    assert review.labels[62, 101] > 0 and review.labels[62, 101] == review.labels[62, 108]  # merged and kept
    assert review.labels[10 + 4 * 20 + 2, 10 + 5 * 20 + 2] > 0  # the strongest blob (i = 29) is kept
    assert review.labels[12, 12] == 0  # the weakest (i = 0) is not


def test_review_flags_group_neighbours_into_fields_of_view_without_dropping_any():
    """Beyond ``max_regions`` the default joins neighbouring regions into that many compact groups: every flagged
    speck is still flagged, group 1 is the most uncertain, and a group is a neighbourhood, not a chain across the map."""
    from napari_virtualstain.core.uncertainty import REVIEW_DEFAULTS

    assert REVIEW_DEFAULTS["group"] is True
    m = np.zeros((200, 200), np.float32)
    for cy, cx, strength in ((30, 30, 1.0), (30, 170, 2.0), (170, 30, 1.0), (170, 170, 1.0)):  # four clusters
        for dy in (-12, 0, 12):
            for dx in (-12, 0, 12):
                m[cy + dy - 2 : cy + dy + 3, cx + dx - 2 : cx + dx + 3] = strength
    plain = flag_regions(m, 0.5, median_size=1, min_area=4)
    assert plain.labels.max() == 36
    grouped = flag_regions(m, 0.5, median_size=1, min_area=4, max_regions=4, group=True)
    assert grouped.labels.max() == 4 and grouped.settings["regions_dropped"] == 0
    assert grouped.settings["fragments"] == 36
    np.testing.assert_array_equal(grouped.labels > 0, plain.labels > 0)  # nothing dropped
    assert grouped.labels[30, 170] == 1  # the strongest cluster first
    for g in range(1, 5):
        ys, xs = np.nonzero(grouped.labels == g)
        assert np.ptp(ys) < 40 and np.ptp(xs) < 40  # one cluster each
    assert len(grouped.table) == 4 and sum(r["area"] for r in grouped.table) == int((plain.labels > 0).sum())


def test_review_boxes_stay_within_the_reviewers_budget_keeping_the_strongest():
    """With ``max_box_fraction`` the groups whose boxes would take the view past the budget are dropped, weakest
    evidence per boxed pixel first; the strongest cluster stays group 1 and the drop is counted."""
    m = np.zeros((200, 200), np.float32)
    for cy, cx, strength in ((30, 30, 1.0), (30, 170, 2.0), (170, 30, 1.2), (170, 170, 1.0)):
        for dy in (-12, 0, 12):
            for dx in (-12, 0, 12):
                m[cy + dy - 2 : cy + dy + 3, cx + dx - 2 : cx + dx + 3] = strength
    every = flag_regions(m, 0.5, median_size=1, min_area=4, max_regions=4, group=True)
    budget = flag_regions(m, 0.5, median_size=1, min_area=4, max_regions=4, group=True, max_box_fraction=0.05)
    from scipy import ndimage as ndi

    def box_fraction(lab):
        inside = np.zeros(lab.shape, bool)
        for b in ndi.find_objects(lab):
            inside[b] = True
        return inside.mean()

    assert box_fraction(every.labels) > 0.05 >= box_fraction(budget.labels)  # 4 boxes of 29² px
    assert budget.settings["regions_dropped"] > 0 and budget.labels.max() >= 1
    assert ((budget.labels > 0) <= (every.labels > 0)).all()  # only ever fewer flagged pixels
    strongest = every.labels == every.labels[30, 170]
    assert (budget.labels[strongest] == 1).all()  # the strongest cluster kept whole, still first
    weak = (every.labels > 0) & ~strongest
    assert (budget.labels[weak] == 0).sum() > 0  # what was dropped came from the weaker clusters


def test_step_maps_use_the_full_chain_when_predict_defaults_to_one_step(tiny_bundle_dir, image, tmp_path):
    """A bundle whose fast predict default is 1 step still gives step maps (the shipped demo-stain is such a bundle)."""
    import json
    import shutil

    folder = tmp_path / "one-step"
    shutil.copytree(tiny_bundle_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sampling"] = {"steps": 1, "samples": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    rs = load_bundle(folder)
    assert len(rs.make_scheduler(None, None).timesteps) == 1
    res = predict_uncertainty(rs, image, mode="steps", seeds=[0], make_labels=False)
    assert res.maps["std_steps"].max() > 0 and res.provenance["window_steps"] >= 2


def test_review_groups_cover_little_of_the_image():
    """Grouping joins the pair whose joint box adds the least area: a row of specks along a scratch edge and two
    clusters in the bottom corners make three fields of view covering ~2 % of the image (clustering centroids by
    diameter instead cut the row and boxed 40 % of it); above PREGROUP regions it still ends at the cap."""
    from scipy import ndimage as ndi

    from napari_virtualstain.core import uncertainty as unc

    lab = np.zeros((200, 600), np.int32)
    k = 0
    for x in range(5, 590, 50):
        k += 1
        lab[10:13, x : x + 3] = k
    for cy, cx in ((150, 40), (150, 560)):
        for dy in (0, 8):
            for dx in (0, 8):
                k += 1
                lab[cy + dy : cy + dy + 3, cx + dx : cx + dx + 3] = k
    groups = unc.group_regions(lab, 3, np.ones(k))
    assert groups.max() == 3 and (groups[lab > 0] > 0).all()
    inside = np.zeros(lab.shape, bool)
    for box in ndi.find_objects(groups):
        inside[box] = True
    assert inside.mean() < 0.05
    many = np.zeros((400, 400), np.int32)
    many[::8, ::8] = np.arange(1, 2501).reshape(50, 50)
    out = unc.group_regions(many, 20, np.ones(2500))
    assert out.max() == 20 and (out[many > 0] > 0).all()
