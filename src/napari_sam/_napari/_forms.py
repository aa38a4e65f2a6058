"""Small Qt building blocks shared by the dock widgets: form layouts, a progress relay."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QFormLayout, QGroupBox, QHBoxLayout, QLayout, QSpinBox, QWidget


class ProgressRelay(QObject):
    """Carries ``progress(done, total)`` calls from a worker thread to the main thread.

    Emit ``changed`` from the worker; slots connected on the main thread run there.
    """

    changed = Signal(int, int)


def form_row(*widgets: QWidget) -> QHBoxLayout:
    """The widgets side by side, the first one stretching."""
    row = QHBoxLayout()
    for i, widget in enumerate(widgets):
        row.addWidget(widget, 1 if i == 0 else 0)
    return row


def spin_box(low: int, high: int, value: int, tip: str) -> QSpinBox:
    """An integer spin box from ``low`` to ``high`` showing ``value``, with a tooltip."""
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setValue(value)
    spin.setToolTip(tip)
    return spin


def form_group(title: str, rows: Sequence[tuple[str | None, QWidget | QLayout]]) -> QGroupBox:
    """A group box with a form of ``(label or None, widget or layout)`` rows."""
    box = QGroupBox(title)
    form = QFormLayout(box)
    for label, field in rows:
        if label is None:
            form.addRow(field)
        else:
            form.addRow(label, field)
    return box
