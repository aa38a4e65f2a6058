"""A small painted line plot of a training run: loss and validation IoU against steps.

Pure Qt (no plotting library): the loss on the left axis (its own range),
validation IoUs on the right axis (0 to 1), steps along the bottom.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from napari_sam.training import TrainingRecord

#: key -> (colour, legend text, right axis)
SERIES: dict[str, tuple[str, str, bool]] = {
    "loss": ("#f0a030", "loss", False),
    "one_click": ("#40b8ff", "IoU 1 click", True),
    "box": ("#60d060", "IoU box", True),
}
_AXES = QColor("#a0a0a0")
_MARGINS = (44, 22, 34, 22)  # left, top, right, bottom


class LossPlot(QWidget):
    """Loss and validation IoU (one click, box) of the records added so far.

    Attributes
    ----------
    series : dict of str -> list of (int, float)
        ``(step, value)`` per key of :data:`SERIES`, in the order added.
    total_steps : int
        Right end of the step axis (at least the last step shown).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.series: dict[str, list[tuple[int, float]]] = {key: [] for key in SERIES}
        self.total_steps = 1
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Training loss (left axis) and validation IoU (right axis, 0 to 1)")

    def clear(self, total_steps: int = 1) -> None:
        """Forget every point; the step axis will end at ``total_steps``."""
        for points in self.series.values():
            points.clear()
        self.total_steps = max(int(total_steps), 1)
        self.update()

    def add_record(self, record: TrainingRecord) -> None:
        """Add the loss of ``record`` and its validation IoUs (when it has a validation)."""
        values = {"loss": record.loss}
        if record.validation is not None:
            metrics = record.validation.overall
            values.update(one_click=metrics.one_click_iou, box=metrics.box_iou)
        for key, value in values.items():
            if math.isfinite(value):
                self.series[key].append((int(record.step), float(value)))
        self.total_steps = max(self.total_steps, int(record.step))
        self.update()

    # ------------------------------------------------------------- painting
    def _loss_range(self) -> tuple[float, float]:
        values = [v for _, v in self.series["loss"]] or [0.0, 1.0]
        low, high = min(min(values), 0.0), max(values)
        return low, high if high > low else low + 1.0

    def paintEvent(self, event) -> None:
        """Draw the axes, the lines and the legend."""
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        left, top, right, bottom = _MARGINS
        area = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
        low, high = self._loss_range()
        self._draw_axes(painter, area, low, high)
        for key, (colour, _, on_right) in SERIES.items():
            points = self.series[key]
            if not points:
                continue
            ylow, yhigh = (0.0, 1.0) if on_right else (low, high)
            polygon = QPolygonF(
                [
                    QPointF(
                        area.left() + area.width() * step / self.total_steps,
                        area.bottom() - area.height() * (value - ylow) / (yhigh - ylow),
                    )
                    for step, value in points
                ]
            )
            painter.setPen(QPen(QColor(colour), 2))
            painter.drawPolyline(polygon)
            if len(points) == 1:
                painter.drawEllipse(polygon[0], 2.5, 2.5)
        self._draw_legend(painter, area)
        painter.end()

    def _draw_axes(self, painter: QPainter, area: QRectF, low: float, high: float) -> None:
        painter.setPen(QPen(_AXES, 1))
        painter.drawRect(area)
        align_right = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        align_left = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
        for y, text_left, text_right in (
            (area.top(), f"{high:.3g}", "1"),
            (area.bottom(), f"{low:.3g}", "0"),
        ):
            painter.drawText(QRectF(0, y - 8, area.left() - 4, 16), align_right, text_left)
            painter.drawText(QRectF(area.right() + 4, y - 8, 30, 16), align_left, text_right)
        below = area.bottom() + 2
        painter.drawText(QRectF(area.left(), below, 60, 16), Qt.AlignmentFlag.AlignLeft, "0")
        painter.drawText(
            QRectF(area.right() - 120, below, 120, 16),
            Qt.AlignmentFlag.AlignRight,
            f"{self.total_steps} steps",
        )

    def _draw_legend(self, painter: QPainter, area: QRectF) -> None:
        x = area.left()
        for key, (colour, text, _) in SERIES.items():
            if key != "loss" and not self.series[key]:
                continue
            painter.setPen(QPen(QColor(colour), 2))
            painter.drawLine(QPointF(x, 10), QPointF(x + 14, 10))
            painter.setPen(QPen(_AXES, 1))
            width = painter.fontMetrics().horizontalAdvance(text)
            painter.drawText(QRectF(x + 18, 2, width + 4, 16), Qt.AlignmentFlag.AlignLeft, text)
            x += width + 28
