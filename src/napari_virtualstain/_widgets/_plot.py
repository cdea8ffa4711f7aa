"""A small line plot drawn with QPainter: the Train widget's live curves without a plotting dependency
(matplotlib is not installed with napari, and napari's own canvases want OpenGL in the dock)."""

from __future__ import annotations

from qtpy.QtCore import QPointF
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

COLOURS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373", "#ba68c8")


class CurvePlot(QWidget):
    """Named series of (x, y) points on shared axes, with the y range and the last value of each in the legend."""

    def __init__(self, title: str, parent: QWidget | None = None, height: int = 110):
        super().__init__(parent)
        self.title = title
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(height)
        self.setMaximumHeight(height)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_series(self, series: dict[str, list[tuple[float, float]]]) -> None:
        self.series = {k: list(v) for k, v in series.items() if v}
        self.update()

    def clear(self) -> None:
        self.set_series({})

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 6, 6, 16, 6
        p.setPen(QPen(QColor("#808080")))
        p.drawRect(left, top, w - left - right, h - top - bottom)
        points = [pt for pts in self.series.values() for pt in pts]
        legend = "  ".join(f"{name} {pts[-1][1]:.3g}" for name, pts in self.series.items())
        p.drawText(left, 12, f"{self.title}   {legend}" if points else f"{self.title} (appears as training runs)")
        if not points:
            return
        xs, ys = [x for x, _ in points], [y for _, y in points]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6
        pw, ph = w - left - right, h - top - bottom

        def at(x, y):
            return QPointF(left + pw * (x - x0) / (x1 - x0), top + ph * (1 - (y - y0) / (y1 - y0)))

        for i, pts in enumerate(self.series.values()):
            pen = QPen(QColor(COLOURS[i % len(COLOURS)]))
            pen.setWidth(2)
            p.setPen(pen)
            for a, b in zip(pts, pts[1:]):
                p.drawLine(at(*a), at(*b))
            if len(pts) == 1:
                p.drawEllipse(at(*pts[0]), 2, 2)
        p.setPen(QPen(QColor("#b0b0b0")))
        p.drawText(left + 2, top + 12, f"{y1:.3g}")
        p.drawText(left + 2, top + ph - 2, f"{y0:.3g}")
        label = f"step {x1:.0f}"
        p.drawText(w - right - 4 - p.fontMetrics().horizontalAdvance(label), top + ph - 2, label)
        p.end()
