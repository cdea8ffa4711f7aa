"""Scaling study of the mean (one-pass) network on this CPU: how far does more training, width or crop size go?

    OMP_NUM_THREADS=1 nohup python benchmarks/scaling_study.py run w16_c128 --root runs/scaling &   # resumable
    python benchmarks/scaling_study.py score --root runs/scaling -o benchmarks/results/scaling_study.json

``run ARM`` trains one arm of the study with ``virtualstain train`` at a *constant* learning rate (so that no
schedule ending makes its own plateau) in segments that end at the snapshot steps; after each segment the bundle is
copied to ``ROOT/ARM/step_NNNNN`` and the next segment resumes the same run (``--resume``: the same random streams
as one long run). A killed run picks up at the last saved state; snapshots already written are kept. An annealed arm
(``ANNEALED``) trains in one run to its step instead: a cosine schedule's length is its run's. 1x is the
shipped mean network's budget (2,400 steps of 8 crops), so 4x = 9,600 and 16x = 38,400 steps.

``score`` measures every snapshot of the ndev arms on the validation strip (x >= 490 of t0-t7: never trained on) and on a sample of
the training region (x < 490 of t3 and t7: the fit): Hoechst Pearson r, and per labels route the bundle offers
(boundaries, stain, distance) nuclei F1@0.5 and the median centroid offset of matched nuclei, at the default
thresholds and at the ones that score best on the validation strip ("tuned", as the bundle's sampling defaults
are chosen; the fit is scored at the same thresholds). Held-out time points 8/9 are never read here. ISL arms
(``isl_aug``) are scored by DAPI / MAP2 / NFH r on their config's whole validation strips and on training pixels,
beside the shipped ``demo-isl-regression`` on the same strips; arms on ``configs/demo-isl-tiles.yaml`` on its tiles,
and they and the shipped ISL bundles also on the one region both splits hold out (``isl_common_region``); the
held-out quadrant is never read here. A
pretraining arm (``pre_isl_dapi``: ISL phase -> DAPI) is not scored itself: it is measured through the arm that
fine-tunes from it (``ft_isl_pre``), whose minutes do not include the pretraining's (its own ``train_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from napari_virtualstain.core.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/demo-stain.yaml"
DATA = REPO.parent / "shared/data/ndev_scratch_assay/scratch-assay-labeled-10T-2Ch.tiff"
BASE_STEPS = 2400  # the shipped demo-stain-regression budget
SNAPSHOTS = (600, 1200, 2400, 4800, 7200, 9600, 14400, 19200, 28800, 38400)
COMMON = ["--objective", "regression", "--batch-size", "8", "--lr", "5e-4", "--lr-schedule", "constant",
          "--val-every", "600", "--tile-size", "128", "--tile-overlap", "16", "--seed", "0", "--precision", "auto"]
SHIPPED_ISL_MEAN = REPO / "src/napari_virtualstain/checkpoints/demo-isl-regression"


def isl_refine_on(mean: Path) -> list[str]:
    """demo-isl's refinement recipe (16-32-64-64, kappa 1, 128² crops) on the mean network ``mean``."""
    return ["--objective", "residual_shift", "--residual-source", "mean_prediction", "--mean-from", str(mean),
            "--kappa", "1", "--channels", "16,32,64,64", "--crop-size", "128"]


AUG_DIST = ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--augment"]  # aug_mse_dist's
# recipe (the shipped mean network's), which the regularisation and pretraining arms change one thing of
ARMS = {
    "w16_c128": ["--channels", "16,32,64,128", "--crop-size", "128"],  # today's mean network, constant lr
    "w32_c128": ["--channels", "32,64,128,256", "--crop-size", "128"],
    "w16_c256": ["--channels", "16,32,64,128", "--crop-size", "256"],  # frames are 210 high: crops reflect-padded
    "w32_c256": ["--channels", "32,64,128,256", "--crop-size", "256"],
    # objectives at today's size (compare with w16_c128 at the same step: equal CPU time within a few %)
    "obj_mse_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head"],
    "obj_spotlight_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--loss", "spotlight"],
    "obj_l1msssim_dist": ["--channels", "16,32,64,128", "--crop-size", "128", "--distance-head", "--loss", "l1_msssim"],
    "aug_mse_dist": AUG_DIST,
    # the width question asked again under augmentation (without it, more capacity only overfits faster)
    "aug_w32_dist": ["--channels", "32,64,128,256", "--crop-size", "128", "--distance-head", "--augment"],
    # regularisation: past 4x the fit keeps rising while validation falls (memorising eight frames); AdamW's
    # decoupled weight decay at the usual 0.05 instead of 1e-4
    "aug_wd_dist": [*AUG_DIST, "--weight-decay", "0.05"],
    # crop size under augmentation: 256² crops at batch 2 see the same pixels per step as 8 crops of 128² (equal
    # CPU time per step), trading crop diversity for context; the 210-px-high frames are reflect-padded to 256
    "aug_c256_dist": [*AUG_DIST, "--crop-size", "256", "--batch-size", "2"],
    # the decay phase of a warm-up-stable-decay schedule: the shipped 4x network (constant rate, 9,600 steps) trained
    # on with the rate annealed to zero by cosine; one run of ANNEALED[arm] steps (a schedule's length is the run's)
    "aug_anneal_dist": [*AUG_DIST, "--lr-schedule", "cosine", "--init",
                        str(REPO / "src/napari_virtualstain/checkpoints/demo-stain-regression")],
    # the ISL demo's mean network under augmentation (3 quadrants of 13 phase planes -> DAPI/MAP2/NFH; no labels, so
    # no centre head); ``score`` measures it by r per stain on the whole validation strips (score_isl_bundle)
    "isl_aug": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment"],
    # demo-isl's refinement (predict, then refine) trained on the shipped mean network (round 3d: on the round 3c
    # one, then shipped); options after COMMON override its --objective (argparse keeps the last)
    "isl_refine": isl_refine_on(SHIPPED_ISL_MEAN),
    # data-side: pretrain on another microscope's nuclei (ISL phase z06 -> DAPI, 3 quadrants), then fine-tune the
    # aug_mse_dist recipe from its 2,400-step snapshot (--init: a new last layer for Hoechst + labels heads).
    # Compare ft_isl_pre at s with aug_mse_dist at s (same scratch-assay steps) and at the same CPU minutes
    "pre_isl_dapi": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment"],
    "ft_isl_pre": [*AUG_DIST, "--init", str(REPO / "runs/scaling/pre_isl_dapi/step_02400")],
    # the shipped recipe again under another seed (crops, augmentation draws, initial weights): how much of the
    # differences between arms is seed noise, and a second member for a deep ensemble (Lakshminarayanan et al. 2017)
    "aug_mse_dist_s1": [*AUG_DIST, "--seed", "1"],
    "aug_mse_dist_s2": [*AUG_DIST, "--seed", "2"],  # a third member (issue 20: does a third network still pay?)
    # elastic deformation on top (Ronneberger et al. 2015): augmentation is what moved the plateau; does more of it?
    "aug_elastic_dist": [*AUG_DIST, "--elastic", "3"],
    # isl_aug's recipe under another seed: a second ISL member for a deep ensemble (issue 23)
    "isl_aug_s1": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment", "--seed", "1"],
    # isl_aug's recipe on configs/demo-isl-tiles.yaml: validation tiles with nuclei, so the curve can see DAPI
    "isl_tiles": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment"],
    # the refinement on the seed-0 round 7 mean network (isl_tiles 4,800; its first 2,400 steps ran on that
    # snapshot's fp16 copy, then bundled as demo-isl-regression), trained and validated on the same split
    "isl_tiles_refine": isl_refine_on(REPO / "runs/scaling/isl_tiles/step_04800"),
    # ... and on the two-seed mean that ships as demo-isl-regression from round 7 on
    "isl_pair_refine": isl_refine_on(SHIPPED_ISL_MEAN),
    # the same under seed 1: a second member for an ISL deep ensemble, validated on the same tiles (round 7)
    "isl_tiles_s1": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment", "--seed", "1"],
    # per-plane gain/offset on top (round 8): the per-image normalisation moves each plane on its own, the shared
    # intensity draws move all 13 together; tiles-trained nets lose on crops whose percentiles differ from the field's
    "isl_tiles_pj": ["--channels", "16,32,64,128", "--crop-size", "128", "--augment", "--plane-jitter"],
}
ISL_TILES = REPO / "configs/demo-isl-tiles.yaml"  # validation tiles that hold every stain (round 6)
ARM_CONFIGS = {"isl_aug": REPO / "configs/demo-isl.yaml", "isl_aug_s1": REPO / "configs/demo-isl.yaml",
               "isl_tiles": ISL_TILES, "isl_tiles_s1": ISL_TILES, "isl_tiles_refine": ISL_TILES,
               "isl_pair_refine": ISL_TILES, "isl_tiles_pj": ISL_TILES,
               "isl_refine": REPO / "configs/demo-isl.yaml",
               "pre_isl_dapi": REPO / "configs/isl-dapi-phase.yaml"}
# arms trained in one run to this step (cosine: no snapshots along the way), after the steps of the network they start
# from (the shipped 4x snapshot of aug_mse_dist): the table and figure count both
ANNEALED = {"aug_anneal_dist": (2400, 9600)}
UNSCORED = {"pre_isl_dapi"}  # a means, not an end: scored through the arm it starts
# every other arm trains on CONFIG
VAL_X = 490  # first validation column of the 576-wide frames (val_fraction 0.15)
FIT_FRAMES = (3, 7)


def arm_options(arm: str) -> list[str]:
    if arm in ARMS:
        return COMMON + ARMS[arm]
    spec = json.loads((Path(arm) / "arm.json").read_text()) if Path(arm, "arm.json").is_file() else None
    if spec is None:
        raise SystemExit(f"error: unknown arm {arm!r}; use one of {', '.join(ARMS)}")
    return spec["options"]


def saved_step(bundle: Path) -> int:
    state = bundle / "training_state/state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def run(arm: str, root: Path, until: int, extra: list[str]) -> int:
    folder = root / arm
    bundle = folder / "bundle"
    folder.mkdir(parents=True, exist_ok=True)
    options = arm_options(arm) + extra
    config = ARM_CONFIGS.get(arm, CONFIG)
    (folder / "arm.json").write_text(json.dumps({"arm": arm, "options": options, "config": str(config)}, indent=1))
    targets = [ANNEALED[arm][0]] if arm in ANNEALED else [s for s in SNAPSHOTS if s <= until]
    for target in targets:
        snap = folder / f"step_{target:05d}"
        if snap.is_dir():
            continue
        done = saved_step(bundle)
        if done < target:
            cmd = [sys.executable, "-m", "napari_virtualstain.cli", "train", str(config), "-o", str(bundle),
                   "--name", f"scaling-{arm}", "--steps", str(target), *options, *(["--resume"] if done else [])]
            print(time.strftime("%H:%M:%S"), " ".join(cmd[3:]), flush=True)
            rc = subprocess.call(cmd)
            if rc:
                return rc
        tmp = folder / f".{snap.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in bundle.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        tmp.rename(snap)  # a snapshot appears whole or not at all
    return 0


def _frames():
    import tifffile

    data = tifffile.imread(DATA)  # C0 Hoechst, C1 transmitted light, C2 nuclei labels, C3 cells
    val = [(data[1, t][:, VAL_X:], data[0, t][:, VAL_X:], data[2, t][:, VAL_X:]) for t in range(8)]
    fit = [(data[1, t][:, :VAL_X], data[0, t][:, :VAL_X], data[2, t][:, :VAL_X]) for t in FIT_FRAMES]
    return {"val": val, "fit": fit}


def centroid_offsets(true, pred, matches) -> list[float]:
    """Distance (px) between the centroids of every matched (true, predicted) pair."""
    import numpy as np
    from scipy import ndimage as ndi

    if not matches:
        return []
    t_ids = [m[0] for m in matches]
    p_ids = [m[1] for m in matches]
    ct = np.array(ndi.center_of_mass(np.ones_like(true), true, t_ids))
    cp = np.array(ndi.center_of_mass(np.ones_like(pred), pred, p_ids))
    return list(np.hypot(*(ct - cp).T))


def score_bundle(path, frames: dict, **predict_options) -> dict:
    """Hoechst r, and per labels route nuclei F1@0.5 and median centroid offset, on the validation strip and on
    training pixels: at the default thresholds (0.5), and at the foreground/centre thresholds that score best on the
    validation strip ("tuned"; the fit is then scored at those same thresholds)."""
    import numpy as np

    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.metrics import match_labels, pearson, pool_matching
    from napari_virtualstain.core.tasks.stain import labels_from_channels, predict_stain

    bundle = load_bundle(path)
    routes = bundle.config.label_routes()
    preds = {part: [(predict_stain(bundle, image, seed=0, make_labels=False, **predict_options,
                                   settings=RunSettings(threads=1)), stain,
                     nuclei) for image, stain, nuclei in items] for part, items in frames.items()}

    def f1(part, route, **thr):
        ms, offsets = [], []
        for res, _, nuclei in preds[part]:
            lab = labels_from_channels(bundle.config, res.image, route, **thr)["nuclei"]
            m = match_labels(nuclei, lab, 0.5, return_matches=True)
            ms.append(m)
            offsets += centroid_offsets(nuclei, lab, m["matches"])
        return pool_matching(ms)["f1"], float(np.median(offsets)) if offsets else None

    out = {part: {"hoechst_r": float(np.mean([pearson(r.channel("Hoechst"), st.astype(np.float32))
                                              for r, st, _ in items]))} for part, items in preds.items()}
    for route in routes:
        default = {"foreground_threshold": 0.5, "center_threshold": 0.5, "boundary_threshold": 0.5}
        grid = [{**default, "foreground_threshold": fg, "center_threshold": ct}
                for fg in ((0.3, 0.4, 0.5) if route != "stain" else (0.5,))
                for ct in ((0.3, 0.4, 0.5, 0.6) if route == "distance" else (0.5,))]
        tuned = max(grid, key=lambda thr: f1("val", route, **thr)[0])
        for part in preds:
            out[part][f"nuclei_f1_05_{route}"], out[part][f"centroid_offset_px_{route}"] = f1(part, route, **default)
            out[part][f"nuclei_f1_05_{route}_tuned"], out[part][f"centroid_offset_px_{route}_tuned"] = f1(
                part, route, **tuned)
        out["val"][f"thresholds_{route}_tuned"] = {k: v for k, v in tuned.items() if k != "boundary_threshold"}
    return out


def isl_regions(config: Path | None = None) -> dict:
    """An ISL config's validation regions (demo-isl.yaml: the right-hand 15 % of quadrants 00, 01, 10;
    demo-isl-tiles.yaml: one 256² tile of each) and, for the fit, the top 256 rows of each training part; the
    held-out quadrant 11 is never listed in either config."""
    from napari_virtualstain.train.data import load_config, split_regions

    train, val = split_regions(load_config(config or ARM_CONFIGS["isl_aug"]))
    fit = [(im, xs, slice(0, 256)) for im, xs in train]
    return {"val": [(im, xs, slice(None)) for im, xs in val], "fit": fit}


def isl_common_region() -> list:
    """The one ISL region both splits hold out: demo-isl.yaml's q00 strip (x >= round(0.85 * 512) = 435) inside
    demo-isl-tiles.yaml's q00 tile [256:512, 256:512] -- 256 x 77 px that neither a strips-trained bundle (the
    shipped ones up to round 6) nor a tiles-trained one saw, so the two can be compared on it (it holds nuclei)."""
    from napari_virtualstain.train.data import load_config, split_regions

    _, val = split_regions(load_config(ISL_TILES))
    q00 = next(im for im, _ in val if im.name == "q00_val")
    return [(q00, slice(435 - 256, 512 - 256), slice(None))]


def score_isl_common(results: dict, root: Path, output: Path) -> None:
    """Score the shipped ISL bundles and every tiles-trained snapshot on ``isl_common_region`` (once each), both as
    a crop of its own ("crop": normalised and predicted alone, 256 x 77) and inside the whole 256² tile it lies in
    ("in tile": more context, as a field is predicted; only the common columns scored)."""
    from napari_virtualstain.core.bundle import load_bundle

    common = results.setdefault("isl common region", {})
    (q00, cols, ys), = isl_common_region()
    regions = {"crop": [(q00, cols, ys)], "in tile": [(q00, slice(None), ys, cols)]}
    snaps = [(f"shipped {b.config.name} {b.short_id}", b.path)
             for b in map(load_bundle, ("demo-isl-regression", "demo-isl"))]
    for folder in sorted(root.iterdir()):
        arm_json = folder / "arm.json"
        if arm_json.is_file() and Path(json.loads(arm_json.read_text()).get("config", CONFIG)) == ISL_TILES:
            snaps += [(f"{folder.name} {snap.name}", snap) for snap in sorted(folder.glob("step_*"))]
    for key, path in snaps:
        if key not in common:
            common[key] = score_isl_bundle(path, regions)
            print("common region", key, json.dumps(common[key]), flush=True)
            output.write_text(json.dumps(results, indent=1))


def score_isl_bundle(path, regions: dict) -> dict:
    """Pearson r per stain (truth's 1-99.8 % scale, as ``virtualstain evaluate``), averaged over the regions, on
    the validation strips (whole: the training loop validates on 256² corners only) and on training pixels."""
    import numpy as np

    from napari_virtualstain.core.bundle import load_bundle
    from napari_virtualstain.core.metrics import image_metrics, normalize_pair
    from napari_virtualstain.core.tasks.stain import predict_stain

    bundle = load_bundle(path)
    stains = [o.name for o in bundle.config.output_channels if o.kind == "stain"]
    # a refinement: "_r" at 1 step (the shipped demo-isl's default), "_r_chain" along its full chain
    variants = ({"": 1, "_chain": int(bundle.config.scheduler["num_train_timesteps"])}
                if bundle.config.objective == "residual_shift" else {"": None})
    out = {}
    for part, items in regions.items():
        out[part] = {}
        for suffix, steps in variants.items():
            rs = {n: [] for n in stains}
            for im, xs, ys, *scored in items:  # scored: the columns of the prediction to score (default all)
                cols = scored[0] if scored else slice(None)
                res = predict_stain(bundle, im.inputs[:, ys, xs], channel_axis=0, make_labels=False, seed=0,
                                    steps=steps, settings=RunSettings(threads=1))
                for i, n in enumerate(stains):
                    pn, tn, _ = normalize_pair(res.channel(n)[:, cols], im.stains[i][ys, xs][:, cols])
                    rs[n].append(image_metrics(pn, tn)["pearson"])
            out[part].update({f"{n}_r{suffix}": float(np.mean(v)) for n, v in rs.items()})
    return out


def _score_snapshots(folder: Path, results: dict, output: Path, measure) -> None:
    """Score every snapshot of one arm not yet in ``results`` (saved after each)."""
    arm = results.setdefault(folder.name, {"options": json.loads((folder / "arm.json").read_text())["options"]})
    points = arm.setdefault("points", {})
    for snap in sorted(folder.glob("step_*")):
        if snap.name in points:
            continue
        t0 = time.perf_counter()
        hist = json.loads((snap / "config.json").read_text())["training"]["history"][-1]
        points[snap.name] = {"step": hist["step"], "train_seconds": hist["seconds"], "loss": hist["loss"],
                             **measure(snap)}
        print(folder.name, snap.name, json.dumps(points[snap.name]), f"({time.perf_counter() - t0:.0f} s)",
              flush=True)
        output.write_text(json.dumps(results, indent=1))


def score(root: Path, output: Path) -> int:
    frames, isl, tiles = None, None, None
    results = json.loads(output.read_text()) if output.is_file() else {}
    for folder in sorted(p for p in root.iterdir() if (p / "arm.json").is_file() and p.name not in UNSCORED):
        arm_config = Path(json.loads((folder / "arm.json").read_text()).get("config", CONFIG))
        on_isl = arm_config != CONFIG
        if arm_config == ISL_TILES:  # its own validation tiles (the shipped bundles trained on them: not scored there)
            tiles = tiles or isl_regions(ISL_TILES)
            _score_snapshots(folder, results, output, lambda snap: score_isl_bundle(snap, tiles))
            continue
        if on_isl and isl is None:
            isl = isl_regions()
            from napari_virtualstain.core.bundle import load_bundle

            for name in ("demo-isl-regression", "demo-isl"):  # the shipped ISL bundles on the same strips
                b = load_bundle(name)
                shipped = results.setdefault(f"shipped {name}", {"options": [b.config.training.get("command", "")],
                                                                 "points": {}})
                key = f"shipped {b.short_id}"  # one point per shipped version (round 3b's was keyed "shipped")
                on_tiles = ISL_TILES.name in b.config.training.get("command", "")  # the strips are its training pixels
                if key not in shipped["points"] and not on_tiles:
                    hist = b.config.training["history"][-1]
                    shipped["points"][key] = {"step": hist["step"], "train_seconds": hist["seconds"],
                                              "loss": hist["loss"], "bundle_id": b.id, **score_isl_bundle(b.path, isl)}
        if not on_isl and frames is None:
            frames = _frames()
        _score_snapshots(folder, results, output,
                         lambda snap: score_isl_bundle(snap, isl) if on_isl else score_bundle(snap, frames))
    if tiles is not None:
        score_isl_common(results, root, output)
    from napari_virtualstain.core.bundle import load_bundle

    b = load_bundle("demo-stain-regression")  # the shipped default's mean network(s), on the same strip and fit
    shipped = results.setdefault("shipped demo-stain-regression", {"options": [b.config.training.get("command", "")],
                                                                   "points": {}})
    key = f"shipped {b.short_id}"
    if key not in shipped["points"]:
        hist = b.config.training["history"][-1]
        shipped["points"][key] = {"step": hist["step"], "train_seconds": hist["seconds"], "loss": hist["loss"],
                                  "bundle_id": b.id, "networks": len(b.config.networks) + 1,
                                  **score_bundle(b.path, frames if frames is not None else _frames())}
        output.write_text(json.dumps(results, indent=1))
    return 0


def best_route(point: dict, part: str = "val") -> tuple[str, float]:
    """The labels route with the highest tuned validation F1 (the one the bundle's defaults would pick)."""
    routes = [k[len("nuclei_f1_05_"):-len("_tuned")] for k in point["val"] if k.endswith("_tuned")
              and k.startswith("nuclei_f1_05_")]
    route = max(routes, key=lambda r: point["val"][f"nuclei_f1_05_{r}_tuned"])
    return route, point[part][f"nuclei_f1_05_{route}_tuned"]


def report(scores: Path, figure: Path | None) -> str:
    """A markdown table of every arm and snapshot, and (optionally) a PNG of the validation/fit curves."""
    results = json.loads(scores.read_text())
    rows = ["| arm | step | × 1 budget | train min | val r | val F1 (route) | fit r | fit F1 | val offset px |",
            "|---|---|---|---|---|---|---|---|---|"]
    curves, isl_rows = {}, []
    common = results.pop("isl common region", {})
    for arm, entry in results.items():
        for name, pt in sorted(entry["points"].items()):
            if "DAPI_r" in pt["val"]:  # an ISL arm: r per stain, no labels
                v, f = pt["val"], pt["fit"]
                isl_rows.append(f"| {arm} | {pt['step']} | {pt['train_seconds'] / 60:.0f} | {v['DAPI_r']:.3f} / "
                                f"{v['MAP2_r']:.3f} / {v['NFH_r']:.3f} | {f['DAPI_r']:.3f} / {f['MAP2_r']:.3f} / "
                                f"{f['NFH_r']:.3f} |")
                continue
            step = pt["step"] + ANNEALED.get(arm, (0, 0))[1]
            route, vf1 = best_route(pt)
            ff1 = pt["fit"][f"nuclei_f1_05_{route}_tuned"]
            off = pt["val"][f"centroid_offset_px_{route}_tuned"]
            rows.append(f"| {arm} | {step} | {step / BASE_STEPS:g} | {pt['train_seconds'] / 60:.0f} | "
                        f"{pt['val']['hoechst_r']:.3f} | {vf1:.3f} ({route}) | {pt['fit']['hoechst_r']:.3f} | "
                        f"{ff1:.3f} | {'–' if off is None else f'{off:.2f}'} |")
            curves.setdefault(arm, []).append((step, pt["val"]["hoechst_r"], vf1, pt["fit"]["hoechst_r"], ff1))
    if figure is not None:
        _plot(curves, figure)
    if isl_rows:
        rows += ["", "| ISL arm | step | train min | val r DAPI / MAP2 / NFH | fit r DAPI / MAP2 / NFH |",
                 "|---|---|---|---|---|", *isl_rows]
    if common:
        rows += ["", "| on the ISL region both splits hold out | r DAPI / MAP2 / NFH, in its 256² tile | "
                     "as a 256 × 77 crop alone |", "|---|---|---|",
                 *(f"| {k} | " + " | ".join(" / ".join(f"{v[part][f'{n}_r']:.3f}" for n in ("DAPI", "MAP2", "NFH"))
                                             for part in ("in tile", "crop")) + " |" for k, v in common.items())]
    return "\n".join(rows)


def _plot(curves: dict, path: Path) -> None:
    """Four panels (val r, val F1, fit r, fit F1) against log2(steps), one colour per arm; numpy + Pillow only."""
    import math

    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (23, 190, 207), (188, 189, 34), (0, 0, 0), (127, 127, 127), (0, 0, 139),
               (139, 0, 0), (0, 100, 0)]
    titles = ["validation Hoechst r", "validation nuclei F1@0.5", "fit (training pixels) r", "fit nuclei F1@0.5"]
    W, H, pad = 360, 240, 34
    rows = -(-len(curves) // 6)  # legend rows of six arms
    img = Image.new("RGB", (2 * W, 2 * H + 20 + 16 * rows), "white")
    d = ImageDraw.Draw(img)
    steps = [p[0] for c in curves.values() for p in c]
    lx0, lx1 = math.log2(min(steps)), math.log2(max(steps)) + 1e-9
    for k, title in enumerate(titles):
        ox, oy = (k % 2) * W, (k // 2) * H
        vals = [p[k + 1] for c in curves.values() for p in c]
        y0, y1 = min(vals) - 0.02, max(vals) + 0.02
        d.rectangle([ox + pad, oy + 20, ox + W - 10, oy + H - pad], outline=(160, 160, 160))
        d.text((ox + pad, oy + 4), title, fill="black")
        d.text((ox + 2, oy + 20), f"{y1:.2f}", fill="black")
        d.text((ox + 2, oy + H - pad - 10), f"{y0:.2f}", fill="black")
        d.text((ox + pad, oy + H - pad + 4), f"{min(steps)} steps", fill="black")
        d.text((ox + W - 90, oy + H - pad + 4), f"{max(steps)} steps", fill="black")

        def at(step, v):
            x = ox + pad + (W - 10 - pad) * (math.log2(step) - lx0) / (lx1 - lx0)
            y = oy + 20 + (H - pad - 20) * (1 - (v - y0) / (y1 - y0))
            return x, y

        for i, (arm, pts) in enumerate(curves.items()):
            pts = sorted(pts)
            xy = [at(p[0], p[k + 1]) for p in pts]
            if len(xy) > 1:
                d.line(xy, fill=colours[i % len(colours)], width=2)
            for x, y in xy:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[i % len(colours)])
    for i, arm in enumerate(curves):
        d.text((10 + 120 * (i % 6), 2 * H + 14 + 16 * (i // 6)), arm, fill=colours[i % len(colours)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one arm, snapshot by snapshot (resumable)")
    r.add_argument("arm", help=f"one of {', '.join(ARMS)}, or a folder holding an arm.json")
    r.add_argument("--root", type=Path, default=REPO / "runs/scaling")
    r.add_argument("--until", type=int, default=SNAPSHOTS[-1], help="last snapshot step (default 16x = 38400)")
    s = sub.add_parser("score", help="measure every snapshot of every arm under --root")
    s.add_argument("--root", type=Path, default=REPO / "runs/scaling")
    s.add_argument("-o", "--output", type=Path, default=REPO / "benchmarks/results/scaling_study.json")
    t = sub.add_parser("report", help="markdown table (stdout) and a PNG of the curves from the scores JSON")
    t.add_argument("scores", type=Path)
    t.add_argument("--figure", type=Path, default=None)
    args, extra = p.parse_known_args(argv)
    if args.cmd == "report":
        print(report(args.scores, args.figure))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.cmd == "run":
        return run(args.arm, args.root, args.until, extra)
    return score(args.root, args.output)


if __name__ == "__main__":
    raise SystemExit(main())
