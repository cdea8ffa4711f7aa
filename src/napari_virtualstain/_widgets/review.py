"""The review panel of the Uncertainty widget: step through the flagged regions, most uncertain first, and decide.

Next / Previous centre and zoom the view on a region (and select it in the ``flags`` layer, so the brush edits it);
"Hallucination" / "Fine" record a decision and move on. Keys (on the whole viewer): Alt-N next, Alt-P previous,
Alt-H hallucination, Alt-F fine, Alt-U unreviewed. Decisions and hand edits survive threshold changes by the merge
rule of ``core.review``; the state lives in the Uncertainty widget, the panel only shows and changes it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QListWidget, QListWidgetItem, QPushButton

KEYS = {"Alt-N": "next", "Alt-P": "previous", "Alt-H": "hallucination", "Alt-F": "fine", "Alt-U": "unreviewed"}
MARK = {"unreviewed": "·", "hallucination": "✗ hallucination", "fine": "✓ fine"}
REGION_SHARE = 0.3  # a focused region spans about this share of the canvas
CURRENT_LAYER = "region under review"  # a yellow box around the region the panel shows (a Shapes layer)


class ReviewPanel(QGroupBox):
    """List of regions + navigation + decisions. ``get_review`` / ``on_decide`` connect it to the widget's state."""

    def __init__(self, viewer, get_review: Callable, on_decide: Callable[[int, str], None], flags_layer: Callable):
        super().__init__("Review (most uncertain first)")
        self.viewer, self.get_review, self.on_decide, self.flags_layer = viewer, get_review, on_decide, flags_layer
        grid = QGridLayout(self)
        self.list = QListWidget()
        self.list.setMinimumHeight(120)
        self.list.currentRowChanged.connect(lambda _: self.focus())
        grid.addWidget(self.list, 0, 0, 1, 3)
        self.previous_button, self.next_button = QPushButton("◀ Previous (Alt-P)"), QPushButton("Next ▶ (Alt-N)")
        self.hallucination_button = QPushButton("Hallucination (Alt-H)")
        self.fine_button = QPushButton("Fine (Alt-F)")
        self.unreviewed_button = QPushButton("Undecide (Alt-U)")
        grid.addWidget(self.previous_button, 1, 0)
        grid.addWidget(self.next_button, 1, 1)
        grid.addWidget(self.unreviewed_button, 1, 2)
        grid.addWidget(self.hallucination_button, 2, 0)
        grid.addWidget(self.fine_button, 2, 1)
        self.counts = QLabel("")
        self.counts.setWordWrap(True)
        grid.addWidget(self.counts, 3, 0, 1, 3)
        self.previous_button.clicked.connect(lambda: self.step(-1))
        self.next_button.clicked.connect(lambda: self.step(1))
        self.hallucination_button.clicked.connect(lambda: self.decide("hallucination"))
        self.fine_button.clicked.connect(lambda: self.decide("fine"))
        self.unreviewed_button.clicked.connect(lambda: self.decide("unreviewed"))
        actions = {"next": lambda: self.step(1), "previous": lambda: self.step(-1),
                   "hallucination": lambda: self.decide("hallucination"), "fine": lambda: self.decide("fine"),
                   "unreviewed": lambda: self.decide("unreviewed")}
        for key, name in KEYS.items():
            viewer.bind_key(key, lambda _viewer, fn=actions[name]: fn() if self.isEnabled() else None, overwrite=True)
        self.setEnabled(False)

    # -- state -> view ---------------------------------------------------------------------------------------------
    def refresh(self, keep: int | None = None) -> None:
        """Rebuild the list from the widget's review; keep region ``keep`` (else the current one) selected."""
        review = self.get_review()
        keep = self.current_id() if keep is None else keep
        self.list.blockSignals(True)
        self.list.clear()
        if review is not None:
            for i in review.order():
                r = review.regions[i]
                item = QListWidgetItem(f"#{i}  std {r.mean_std:.3g}  {r.area} px{'  (by hand)' if r.by_hand else ''}"
                                       f"  {MARK[r.decision]}")
                item.setData(256, i)  # Qt.UserRole
                self.list.addItem(item)
        ids = self.ids()
        self.list.setCurrentRow(ids.index(keep) if keep in ids else (0 if ids else -1))
        self.list.blockSignals(False)
        self.setEnabled(bool(ids))
        if review is not None:
            c = review.counts()
            self.counts.setText(f"{len(ids)} regions: {c['hallucination']} hallucination, {c['fine']} fine, "
                                f"{c['unreviewed']} to review")

    def ids(self) -> list[int]:
        return [self.list.item(k).data(256) for k in range(self.list.count())]

    def current_id(self) -> int | None:
        item = self.list.currentItem()
        return None if item is None else item.data(256)

    # -- actions -----------------------------------------------------------------------------------------------
    def step(self, delta: int) -> None:
        n = self.list.count()
        if n:
            self.list.setCurrentRow((self.list.currentRow() + delta) % n)

    def decide(self, decision: str) -> None:
        """Record a decision for the current region and move to the next one still unreviewed (if any)."""
        rid = self.current_id()
        if rid is None:
            return
        self.on_decide(rid, decision)
        review = self.get_review()
        order = review.order()
        start = order.index(rid)
        later = [i for i in order[start + 1 :] + order[:start] if review.regions[i].decision == "unreviewed"]
        self.refresh(keep=later[0] if later and decision != "unreviewed" else rid)
        self.focus()

    def focus(self) -> None:
        """Centre the view on the current region, zoomed so it fills about a third of the canvas; select it."""
        review, rid, layer = self.get_review(), self.current_id(), self.flags_layer()
        if review is None or rid is None or layer is None or rid not in review.regions:
            return
        r = review.regions[rid]
        lead = [0.0] * (layer.ndim - 2)
        world = np.asarray(layer.data_to_world([*lead, *r.centroid]), dtype=float)
        camera = camera_of(self.viewer)
        camera.center = tuple(world[-2:])
        scale = np.abs(np.asarray(layer.scale[-2:], dtype=float))
        extent = np.maximum((np.asarray(r.bbox[2:]) - np.asarray(r.bbox[:2])) * scale, 1e-6)
        canvas = canvas_size(self.viewer)
        if canvas is not None and canvas.min() > 1:
            camera.zoom = float(REGION_SHARE * np.min(canvas / extent))
        layer.selected_label = rid
        self.highlight(r.bbox, layer)

    def highlight(self, bbox, flags_layer) -> None:
        """Draw (or move) the yellow box around the current region, a little larger than its bounding box, on the
        flags layer's grid; the user's layers are not touched (the box is its own Shapes layer)."""
        y0, x0, y1, x1 = (float(v) for v in bbox)
        pad = 3.0
        box = np.array([[y0 - pad, x0 - pad], [y0 - pad, x1 + pad], [y1 + pad, x1 + pad], [y1 + pad, x0 - pad]])
        if CURRENT_LAYER in self.viewer.layers:
            self.viewer.layers[CURRENT_LAYER].data = [box]
            return
        self.viewer.add_shapes([box], shape_type="rectangle", name=CURRENT_LAYER, edge_color="yellow",
                               face_color="transparent", edge_width=1.5, opacity=1.0,
                               scale=np.asarray(flags_layer.scale)[-2:], translate=np.asarray(flags_layer.translate)[-2:])
        self.viewer.layers.selection.active = flags_layer  # the brush keeps editing the flags


def camera_of(viewer):
    """The viewer's camera (napari >= 0.9 keeps it in ``viewer.scene``)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def canvas_size(viewer) -> np.ndarray | None:
    """(height, width) of the canvas in screen pixels, where napari says it."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None) if canvas is not None else getattr(viewer, "_canvas_size", None)
    return None if size is None else np.asarray(size, dtype=float)
