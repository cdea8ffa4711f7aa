"""Boundary/foreground targets and instance labels from them (model-free)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec
from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.model import default_unet_config
from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
from napari_virtualstain.core.postprocess import boundaries_to_labels, boundary_target, drop_small, foreground_target


def two_touching_squares() -> np.ndarray:
    lab = np.zeros((12, 16), np.int32)
    lab[2:10, 2:8] = 1
    lab[2:10, 8:14] = 2  # shares the edge between columns 7 and 8 with object 1
    return lab


def test_targets_of_two_touching_squares():
    lab = two_touching_squares()
    b = boundary_target(lab)
    fg = foreground_target(lab)
    assert b.dtype == np.float32 and fg.dtype == np.float32
    assert set(np.unique(b)) == {0.0, 1.0}
    np.testing.assert_array_equal(fg, (lab > 0).astype(np.float32))
    # the line where the two squares touch is marked on both sides ...
    assert (b[2:10, 7] == 1).all() and (b[2:10, 8] == 1).all()
    # ... as are the outlines against the background, inside and outside
    assert (b[2:10, 2] == 1).all() and (b[2:10, 1] == 1).all() and (b[2, 2:14] == 1).all()
    # interiors and far background are not boundary
    assert b[4:8, 4:6].sum() == 0 and b[4:8, 10:12].sum() == 0
    assert b[0, :].sum() == 0 and b[:, 15].sum() == 0
    # a single object: no internal line
    single = boundary_target((lab > 0).astype(np.int32))
    assert single[4:8, 7:9].sum() == 0


def test_targets_accept_integer_floats_and_reject_others():
    lab = two_touching_squares()
    np.testing.assert_array_equal(boundary_target(lab.astype(np.float32)), boundary_target(lab))
    with pytest.raises(VirtualStainError, match="integers"):
        boundary_target(lab + 0.5)
    with pytest.raises(VirtualStainError, match="2D"):
        foreground_target(lab[None])


def scene() -> np.ndarray:
    """Separate and touching objects of different shapes and sizes."""
    lab = np.zeros((64, 64), np.int32)
    lab[4:16, 4:16] = 1  # separate square
    yy, xx = np.mgrid[:64, :64]
    lab[(yy - 10) ** 2 + (xx - 40) ** 2 < 49] = 2  # separate disc
    lab[24:40, 4:20] = 3  # three touching rectangles
    lab[24:40, 20:34] = 4
    lab[40:52, 4:34] = 5
    lab[(yy - 40) ** 2 + (xx - 50) ** 2 < 64] = 6  # touching disc pair
    lab[((yy - 54) ** 2 + (xx - 50) ** 2 < 49) & (lab == 0)] = 7
    return lab


def match_iou(truth: np.ndarray, pred: np.ndarray) -> dict[int, float]:
    """Best IoU of every true object against the predicted ones."""
    out = {}
    for t in np.unique(truth)[1:]:
        m = truth == t
        best = 0.0
        for p in np.unique(pred[m]):
            if p == 0:
                continue
            q = pred == p
            best = max(best, (m & q).sum() / (m | q).sum())
        out[int(t)] = best
    return out


@pytest.mark.parametrize("use_foreground", [True, False])
def test_perfect_targets_recover_instances(use_foreground):
    lab = scene()
    assert len(np.unique(lab)) - 1 == 7
    b, fg = boundary_target(lab), foreground_target(lab)
    if use_foreground:
        pred = boundaries_to_labels(b, fg)
    else:
        # without a foreground map the background is one more (large) region; drop it by its overlap with 0
        pred = boundaries_to_labels(b, None)
        bg_ids = set(np.unique(pred[lab == 0])) - {0}
        pred = np.where(np.isin(pred, list(bg_ids)), 0, pred)
    assert pred.dtype == np.uint32 and pred.shape == lab.shape
    assert len(np.unique(pred)) - 1 == 7
    ious = match_iou(lab, pred)
    assert all(v > 0.8 for v in ious.values()), ious
    # each predicted object lies (but for a pixel or two on the shared boundary) in one true object
    for p in np.unique(pred)[1:]:
        counts = np.bincount(lab[pred == p], minlength=8)[1:]
        assert counts.max() >= 0.98 * counts.sum(), (p, counts)
    if use_foreground:
        assert (pred[lab == 0] == 0).all()
        assert list(np.unique(pred)) == list(range(8))  # relabelled 1..n


def test_noisy_soft_targets_still_recover_instances():
    lab = scene()
    rng = np.random.default_rng(0)
    b = np.clip(boundary_target(lab) * 0.8 + 0.1 + rng.normal(0, 0.05, lab.shape), 0, 1)
    fg = np.clip(foreground_target(lab) * 0.8 + 0.1 + rng.normal(0, 0.05, lab.shape), 0, 1)
    pred = boundaries_to_labels(b, fg)
    assert len(np.unique(pred)) - 1 == 7
    assert min(match_iou(lab, pred).values()) > 0.8


def test_min_area_drops_small_objects():
    lab = scene()
    lab[57:62, 2:7] = 8  # a 25-pixel speck
    b, fg = boundary_target(lab), foreground_target(lab)
    kept = boundaries_to_labels(b, fg, min_seed_area=1, min_area=16)
    dropped = boundaries_to_labels(b, fg, min_seed_area=1, min_area=30)
    assert kept[59, 4] > 0 and (kept == kept[59, 4]).sum() == 25
    assert dropped[59, 4] == 0
    assert len(np.unique(kept)) - 1 == 8 and len(np.unique(dropped)) - 1 == 7
    # min_area above every object: nothing left
    assert boundaries_to_labels(b, fg, min_area=10_000).max() == 0


def test_drop_small():
    lab = np.array([[1, 1, 0, 2], [1, 1, 0, 0], [0, 0, 0, 3], [3, 3, 3, 3]])
    np.testing.assert_array_equal(drop_small(lab, 3), np.where(lab == 2, 0, lab))
    np.testing.assert_array_equal(drop_small(lab, 1), lab)


def test_thresholds_rerun_without_model(monkeypatch):
    """labels_from_channels works on the predicted channels alone; other thresholds give other labels."""
    import napari_virtualstain.core.model as model
    from napari_virtualstain.core.tasks import stain

    def no_model(*a, **k):
        raise AssertionError("re-running the thresholds must not build or run a network")

    monkeypatch.setattr(model, "build_unet", no_model)
    monkeypatch.setattr(model.Denoiser, "forward", no_model)

    cfg = BundleConfig(
        name="t",
        task="stain",
        objective="residual_shift",
        input_channels=[ChannelSpec("bf", "input", PercentileNorm())],
        output_channels=[
            ChannelSpec("b", "boundary", FixedNorm(0.0, 1.0), labels="cells", foreground="fg"),
            ChannelSpec("fg", "foreground", FixedNorm(0.0, 1.0)),
        ],
        unet=default_unet_config(3, 2, block_out_channels=(8, 16)),
        scheduler={},
    )
    lab = two_touching_squares()
    b = boundary_target(lab)
    # a weak boundary between the squares (0.4), strong against the background
    b[2:10, 7:9] = 0.4
    image = np.stack([b, foreground_target(lab)])
    strict = stain.labels_from_channels(cfg, image, boundary_threshold=0.3, min_seed_area=1, min_area=1)
    lenient = stain.labels_from_channels(cfg, image, boundary_threshold=0.5, min_seed_area=1, min_area=1)
    assert set(strict) == {"cells"}
    assert strict["cells"].max() == 2  # the weak line separates the squares
    assert lenient["cells"].max() == 1  # ... unless it is below the threshold
    assert strict["cells"][5, 4] != strict["cells"][5, 11]


def test_cells_seeded_by_nuclei_one_cell_per_nucleus():
    """Touching cells with a faint (sub-threshold) boundary still come out one per nucleus when seeded."""
    cells = np.zeros((40, 60), np.int32)
    cells[5:35, 5:30] = 1
    cells[5:35, 30:55] = 2
    nuclei = np.zeros_like(cells)
    nuclei[15:25, 12:20] = 1
    nuclei[15:25, 40:48] = 2
    faint = boundary_target(cells) * 0.3  # a blurry prediction: never above the 0.5 threshold
    fg = foreground_target(cells)
    unseeded = boundaries_to_labels(faint, fg)
    seeded = boundaries_to_labels(faint, fg, seeds=nuclei)
    assert unseeded.max() == 1  # merged without seeds
    assert seeded.max() == 2
    for i in (1, 2):
        overlap = np.bincount(seeded[cells == i], minlength=3)
        assert overlap.argmax() > 0 and overlap.max() / (cells == i).sum() > 0.9


def test_labels_from_channels_seeds_cells_with_predicted_nuclei():
    from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec
    from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm
    from napari_virtualstain.core.tasks.stain import labels_from_channels

    unit = FixedNorm(0.0, 1.0)
    outs = [
        ChannelSpec("cells boundary", "boundary", unit, "cells", "cells foreground", "nuclei"),  # listed first on purpose
        ChannelSpec("cells foreground", "foreground", unit, "cells"),
        ChannelSpec("nuclei boundary", "boundary", unit, "nuclei", "nuclei foreground"),
        ChannelSpec("nuclei foreground", "foreground", unit, "nuclei"),
    ]
    cfg = BundleConfig("t", "stain", "regression", [ChannelSpec("bf", "input", PercentileNorm())], outs,
                       {"in_channels": 1, "out_channels": 4, "block_out_channels": [8, 16]}, None, 32, 8)
    assert BundleConfig.from_dict(cfg.to_dict()).output_channels[0].seeds == "nuclei"
    cells = np.zeros((40, 60), np.int32)
    cells[5:35, 5:30], cells[5:35, 30:55] = 1, 2
    nuclei = np.zeros_like(cells)
    nuclei[15:25, 12:20], nuclei[15:25, 40:48] = 1, 2
    image = np.stack([boundary_target(cells) * 0.3, foreground_target(cells), boundary_target(nuclei),
                      foreground_target(nuclei)])
    labels = labels_from_channels(cfg, image)
    assert list(labels) == ["cells", "nuclei"]
    assert labels["nuclei"].max() == 2 and labels["cells"].max() == 2


def test_bundle_refuses_seeds_from_unknown_labels():
    import pytest

    from napari_virtualstain.core.bundle import BundleConfig, ChannelSpec
    from napari_virtualstain.core.errors import BundleError
    from napari_virtualstain.core.normalize import FixedNorm, PercentileNorm

    outs = [ChannelSpec("cells boundary", "boundary", FixedNorm(0.0, 1.0), "cells", None, "nuclei")]
    cfg = BundleConfig("t", "stain", "regression", [ChannelSpec("bf", "input", PercentileNorm())], outs,
                       {"in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16]}, None, 32, 8)
    with pytest.raises(BundleError, match="seeds from 'nuclei'"):
        BundleConfig.from_dict(cfg.to_dict())


def _field_of_cells(shape=(420, 610), seed=0):
    """Nuclei (discs) on a jittered grid, cells = their Voronoi regions; a right-hand band holds nothing."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    centres = [(y + rng.integers(-5, 6), x + rng.integers(-5, 6))
               for y in range(20, shape[0] - 15, 30) for x in range(20, shape[1] - 170, 30)]
    nuclei = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        nuclei[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(25, 64)] = i
    from scipy import ndimage as ndi

    _, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    cells = nuclei[iy, ix]
    cells[:, shape[1] - 150:] = 0
    return nuclei, cells


def test_big_fields_are_labelled_block_by_block_with_the_same_objects():
    """Block-by-block labels (memory of one block) hold the objects a whole-field run finds, each once, seams
    included; an empty part of the field stays empty on the stain route (the field's own Otsu level, not a block's)."""
    from napari_virtualstain.core.tasks.stain import labels_from_channels

    unit = FixedNorm(0.0, 1.0)
    outs = [
        ChannelSpec("Hoechst", "stain", unit),
        ChannelSpec("cells boundary", "boundary", unit, "cells", "cells foreground", "nuclei"),
        ChannelSpec("cells foreground", "foreground", unit, "cells"),
        ChannelSpec("nuclei boundary", "boundary", unit, "nuclei", "nuclei foreground"),
        ChannelSpec("nuclei foreground", "foreground", unit, "nuclei"),
    ]
    cfg = BundleConfig("t", "stain", "regression", [ChannelSpec("bf", "input", PercentileNorm())], outs,
                       {"in_channels": 1, "out_channels": 5, "block_out_channels": [8, 16]}, None, 32, 8,
                       labels_from_stain={"nuclei": "Hoechst"})
    nuclei, cells = _field_of_cells()
    noise = np.random.default_rng(1).normal(0, 0.02, nuclei.shape).astype(np.float32)
    image = np.stack([(nuclei > 0) * 0.8 + 0.1 + noise, boundary_target(cells), foreground_target(cells),
                      boundary_target(nuclei), foreground_target(nuclei)]).astype(np.float32)

    from napari_virtualstain.core.metrics import match_labels

    for route in ("boundaries", "stain"):
        whole = labels_from_channels(cfg, image, route)
        blocked = labels_from_channels(cfg, image, route, block=100)  # 5 x 7 blocks, many seams
        assert set(blocked) == set(whole) == {"cells", "nuclei"}
        for name in whole:
            a, b = whole[name], blocked[name]
            assert len(np.unique(b)) - 1 == b.max()  # ids 1..n, none lost when pasting
            # the same objects, each once (cells may trade a pixel where two floods meet on a flat boundary)
            assert match_labels(a, b, 0.9)["f1"] >= 0.99, (route, name)
            if name == "nuclei":
                assert match_labels(a, b, 0.999)["f1"] >= 0.98, route
        assert whole["nuclei"].max() >= 0.95 * nuclei.max()
        assert not blocked["nuclei"][:, -140:].any()  # nothing invented in the empty band
    small = labels_from_channels(cfg, image[:, :200, :200], "boundaries", block=100)  # not over block + 2 halos
    np.testing.assert_array_equal(small["nuclei"], labels_from_channels(cfg, image[:, :200, :200])["nuclei"])


def test_big_field_labels_are_uint16_until_their_ids_need_more():
    """A big field's labels cost half the memory while ids fit in uint16; past 65,535 objects none is lost."""
    from napari_virtualstain.core.postprocess import labels_in_blocks

    def one_object_per_pixel(ys, xs):
        h, w = ys.stop - ys.start, xs.stop - xs.start
        return {"specks": np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w)}

    def one_object(ys, xs):
        lab = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.int32)
        lab[:4, :4] = 1  # a small object at each crop's corner: kept by the block whose core holds it
        return {"spot": lab}

    few = labels_in_blocks(one_object, (400, 400), 200, halo=8)["spot"]
    assert few.dtype == np.uint16 and few.max() >= 1
    many = labels_in_blocks(one_object_per_pixel, (400, 300), 100, halo=8)["specks"]  # 120,000 objects
    assert many.dtype == np.uint32
    assert many.min() == 1 and many.max() == 400 * 300 == len(np.unique(many))
