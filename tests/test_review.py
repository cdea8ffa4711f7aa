"""Flag review: decisions survive a new threshold and hand edits (the merge rule), and an export restores a review."""

from __future__ import annotations

import numpy as np
import pytest

from napari_virtualstain.core.errors import VirtualStainError
from napari_virtualstain.core.review import edited_ids, measure, merge, read_review, sync, write_review


def _map():
    m = np.zeros((40, 60), np.float32)
    m[5:15, 5:15] = 0.9  # A: the most uncertain
    m[20:30, 30:45] = 0.5  # B
    m[30:36, 2:8] = 0.2  # C
    return m


def _labels(threshold):
    from napari_virtualstain.core.uncertainty import flag_regions

    return flag_regions(_map(), threshold, median_size=1, min_area=4).labels


def test_regions_come_most_uncertain_first_and_decisions_are_checked():
    review = measure(_labels(0.1), _map())
    ids = review.order()
    assert len(ids) == 3 and [review.regions[i].mean_std for i in ids] == pytest.approx([0.9, 0.5, 0.2])
    review.decide(ids[0], "hallucination")
    assert review.counts() == {"unreviewed": 2, "hallucination": 1, "fine": 0}
    with pytest.raises(VirtualStainError, match="decision 'maybe'"):
        review.decide(ids[1], "maybe")
    with pytest.raises(VirtualStainError, match="no flagged region 99"):
        review.decide(99, "fine")


def test_decisions_and_hand_edits_survive_a_new_threshold():
    m = _map()
    auto = _labels(0.1)
    review = measure(auto, m)
    a, b, c = review.order()
    review.decide(a, "hallucination")
    review.decide(b, "fine")
    # by hand: region C enlarged, and a new region drawn where the map saw nothing
    current = auto.copy()
    current[30:38, 2:12] = c
    current[0:4, 50:58] = 7
    assert edited_ids(current, auto) == {c, 7}
    review = sync(review, current, auto, m)
    review.decide(7, "hallucination")
    assert review.regions[c].by_hand and review.regions[7].by_hand and not review.regions[a].by_hand

    higher = merge(_labels(0.4), review, m)  # C falls below the new threshold, but it was edited by hand: kept
    got = {(r.decision, r.by_hand, r.area) for r in higher.regions.values()}
    assert got == {("hallucination", False, 100), ("fine", False, 150), ("unreviewed", True, 80),
                   ("hallucination", True, 32)}
    lower = merge(_labels(0.1), higher, m)  # back down: the same four, same decisions
    assert sorted((r.decision, r.by_hand) for r in lower.regions.values()) == sorted(
        (r.decision, r.by_hand) for r in higher.regions.values())


def test_an_export_restores_the_review(tmp_path):
    m = _map()
    review = measure(_labels(0.1), m)
    a, b, _ = review.order()
    review.decide(a, "hallucination")
    review.decide(b, "fine")
    csv_path, tif_path = write_review(tmp_path / "review.csv", review, {"bundle_id": "abc"},
                                      {"channel": "Hoechst", "map": "std_seeds", "threshold": 0.1})
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:3] == ["channel", "map", "threshold"] and "decision" in header and "bbox_y0" in header
    assert csv_path.read_text().splitlines()[1].split(",")[4] == "hallucination"  # most uncertain first
    restored, meta = read_review(csv_path, m)
    assert meta["bundle_id"] == "abc" and meta["review"]["channel"] == "Hoechst"
    assert {i: r.decision for i, r in restored.regions.items()} == {i: r.decision for i, r in review.regions.items()}
    assert np.array_equal(restored.labels, review.labels)
    (tmp_path / "review_labels.tif").unlink()
    with pytest.raises(VirtualStainError, match="review_labels.tif not found"):
        read_review(csv_path, m)
