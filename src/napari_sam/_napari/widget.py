"""The "Segment Anything" dock widget: Qt controls over the viewer's :class:`SamSession`.

All state lives in the session (shared with the other widgets of the
viewer and with the console as ``sam``); this widget only shows it and
forwards the user's choices.
"""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image, Labels
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_sam.precision import PRECISIONS

from ._keys import KEYS, NEGATIVE_MODIFIER
from .layers import POSITIVE
from .models import DEVICES, describe_source, model_entries
from .session import EMPTY_MASK_HINT, SamSession

_FILE_ITEM = "Checkpoint file…"
_NEW_LABELS = "New layer (on first commit)"
_MODES = {"Keep existing objects": "keep", "Overwrite": "overwrite"}
_CANDIDATES = ("#1", "#2", "#3")
_PRECISION_TIP = (
    "auto: bf16 where this CPU/GPU runs it fast (fp16 on older GPUs), else fp32. "
    "exact: fp32, identical to the reference implementation. "
    "fp32, bf16, fp16: forced (fp16 is slow on most CPUs). "
    "Changing it recomputes the embedding."
)
_PREFETCH_TIP = (
    "Stacks and time series: while you work on a slice, encode the next one "
    "(the way you last moved the slider) in the background, so that moving there "
    "shows its embedding at once. Clicks made while it runs are slower (the two share the CPU)."
)


def _index_of(combo: QComboBox, value) -> int:
    """Index of the item whose data equals ``value`` (-1 if none)."""
    return next((i for i in range(combo.count()) if combo.itemData(i) == value), -1)


def _disconnect_on_destroy(widget: QWidget, pairs) -> None:
    """Disconnect napari event callbacks when ``widget`` is destroyed (no reference to it)."""

    def disconnect(*_args) -> None:
        for emitter, callback in pairs:
            emitter.disconnect(callback)

    widget.destroyed.connect(disconnect)


def _connect_while_alive(widget: QWidget, pairs) -> None:
    """Connect napari ``(emitter, callback)`` pairs until ``widget`` is destroyed."""
    for emitter, callback in pairs:
        emitter.connect(callback)
    _disconnect_on_destroy(widget, pairs)


class SamWidget(QWidget):
    """Interactive segmentation: image, model, prompts, candidates, commit.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Passed by napari when the widget is opened from the Plugins menu.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.session = SamSession.for_viewer(napari_viewer)
        self.viewer = self.session.viewer  # the real viewer (napari passes a proxy)
        if hasattr(napari_viewer, "update_console"):
            napari_viewer.update_console({"sam": self.session})
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_setup())
        self.status = QLabel("Choose an image layer.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addWidget(self._build_prompts())
        layout.addWidget(self._build_commit())
        layout.addStretch(1)
        self._connect()
        self._refresh_layers()

    # ----------------------------------------------------------------- build
    def _build_setup(self) -> QGroupBox:
        box = QGroupBox("Image and model")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("vit_b is a good default; vit_t (MobileSAM) is fastest on CPU")
        self._fill_models()
        self.load_button = QPushButton("Load")
        self.load_button.setToolTip("Load (download if needed) the chosen model now")
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.load_button)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setCurrentText(self.session.models.device)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(PRECISIONS)
        self.precision_combo.setCurrentText(self.session.models.precision)
        self.precision_combo.setToolTip(_PRECISION_TIP)
        form.addRow("Image", self.image_combo)
        form.addRow("Model", row)
        form.addRow("Device", self.device_combo)
        form.addRow("Precision", self.precision_combo)
        self.prefetch_check = QCheckBox("Pre-encode the next slice")
        self.prefetch_check.setChecked(self.session.prefetch)
        self.prefetch_check.setToolTip(_PREFETCH_TIP)
        form.addRow(self.prefetch_check)
        return box

    def _build_prompts(self) -> QGroupBox:
        box = QGroupBox("Prompts")
        vbox = QVBoxLayout(box)
        hint = QLabel(
            f"Click: positive point; {NEGATIVE_MODIFIER}-click or right-click: negative; "
            f"{KEYS['toggle_sign']}: toggle the sign of the next points. "
            "Draw rectangles in the 'SAM boxes' layer (one object per box)."
        )
        hint.setWordWrap(True)
        vbox.addWidget(hint)
        self.sign_button = QPushButton()
        self.sign_button.setToolTip(f"Sign of the next points ({KEYS['toggle_sign']})")
        vbox.addWidget(self.sign_button)
        self.candidate_group = QButtonGroup(self)
        row = QHBoxLayout()
        self.candidate_buttons = []
        for i, name in enumerate(_CANDIDATES):
            button = QRadioButton(name)
            button.setToolTip(
                "SAM's candidates for one ambiguous point (typically whole, part, subpart) "
                "with their predicted IoU"
            )
            self.candidate_group.addButton(button, i)
            self.candidate_buttons.append(button)
            row.addWidget(button)
        self.next_mask_button = QPushButton(f"Next ({KEYS['next_mask']})")
        row.addWidget(self.next_mask_button)
        vbox.addWidget(QLabel("Candidate masks of one point (predicted IoU):"))
        vbox.addLayout(row)
        return box

    def _build_commit(self) -> QGroupBox:
        box = QGroupBox("Commit")
        form = QFormLayout(box)
        self.labels_combo = QComboBox()
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(_MODES))
        self.mode_combo.setToolTip("Keep existing: new pixels only fill background")
        self.selected_check = QCheckBox("Use the layer's selected label")
        self.selected_check.setToolTip("Otherwise each object gets the next free id")
        self.commit_button = QPushButton(f"Commit ({KEYS['commit']})")
        self.clear_button = QPushButton(f"Clear ({KEYS['clear']})")
        buttons = QHBoxLayout()
        buttons.addWidget(self.commit_button)
        buttons.addWidget(self.clear_button)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Mode", self.mode_combo)
        form.addRow(self.selected_check)
        form.addRow(buttons)
        return box

    def _fill_models(self) -> None:
        combo, source = self.model_combo, self.session.models.source
        combo.blockSignals(True)
        combo.clear()
        for entry in model_entries():
            combo.addItem(entry.label, entry.name)
            combo.setItemData(combo.count() - 1, entry.note, Qt.ItemDataRole.ToolTipRole)
        if _index_of(combo, source) < 0:
            kind = "file" if isinstance(source, Path) else "in memory"
            combo.addItem(f"{describe_source(source)} ({kind})", source)
        combo.addItem(_FILE_ITEM, None)
        combo.setCurrentIndex(_index_of(combo, source))
        combo.blockSignals(False)

    # --------------------------------------------------------------- connect
    def _connect(self) -> None:
        s = self.session
        self.image_combo.currentIndexChanged.connect(self._on_image_choice)
        self.model_combo.activated.connect(self._on_model_choice)
        self.load_button.clicked.connect(s.load_model_async)
        self.device_combo.activated.connect(self._on_device_choice)
        self.precision_combo.activated.connect(self._on_precision_choice)
        self.prefetch_check.toggled.connect(lambda on: setattr(s, "prefetch", on))
        self.sign_button.clicked.connect(lambda: (s.toggle_sign(), self._show_sign()))
        self.candidate_group.idClicked.connect(s.select_mask)
        self.next_mask_button.clicked.connect(lambda: s.cycle_mask(1))
        self.labels_combo.activated.connect(self._on_labels_choice)
        self.mode_combo.currentTextChanged.connect(
            lambda text: setattr(s, "commit_mode", _MODES[text])
        )
        self.selected_check.toggled.connect(
            lambda on: setattr(s, "id_policy", "selected" if on else "next_free")
        )
        self.commit_button.clicked.connect(s.commit_from_ui)
        self.clear_button.clicked.connect(s.clear_prompts)
        layer_events = self.viewer.layers.events
        pairs = [
            (s.events.status, self._on_status),
            (s.events.error, self._on_error),
            (s.events.prediction, self._on_prediction),
            (s.events.model, self._on_model_event),
            (s.events.model_list, self._on_model_event),
            (s.events.committed, self._on_committed),
            (layer_events.inserted, self._refresh_layers),
            (layer_events.removed, self._refresh_layers),
        ]
        for emitter, callback in pairs:
            emitter.connect(callback)
        _disconnect_on_destroy(self, pairs)
        self._show_sign()
        self._on_prediction()

    # ------------------------------------------------------------- callbacks
    def _refresh_layers(self, event=None) -> None:
        own = {id(self.session.preview_layer)}
        images = [la for la in self.viewer.layers if isinstance(la, Image)]
        labels = [la for la in self.viewer.layers if isinstance(la, Labels) and id(la) not in own]
        self._fill(self.image_combo, images, self.session.image_layer or (images or [None])[-1])
        self._fill(self.labels_combo, labels, self.session.labels_layer, first=_NEW_LABELS)
        if self.session.image_layer is None and self.image_combo.currentData() is not None:
            self._on_image_choice()  # first image added, or ours was removed

    @staticmethod
    def _fill(combo: QComboBox, layers, current, first: str | None = None) -> None:
        combo.blockSignals(True)
        combo.clear()
        if first is not None:
            combo.addItem(first, None)
        for layer in layers:
            combo.addItem(layer.name, layer)
        index = next((i for i in range(combo.count()) if combo.itemData(i) is current), 0)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)

    def _on_image_choice(self, index=None) -> None:
        layer = self.image_combo.currentData()
        if layer is not self.session.image_layer:
            self.session.set_image(layer)
            self._refresh_layers()

    def _on_model_choice(self, index: int) -> None:
        source = self.model_combo.itemData(index)
        if source is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors);;All (*)"
            )
            if not path:
                self._fill_models()
                return
            source = Path(path)
        self.session.set_model_source(source)
        self._fill_models()

    def _on_device_choice(self, index: int) -> None:
        try:
            self.session.set_device(self.device_combo.itemText(index))
        except (ValueError, RuntimeError, AssertionError) as exc:  # e.g. CUDA not compiled in
            self.session._error(f"Device not available: {exc}")
            self.device_combo.setCurrentText(self.session.models.device)

    def _on_precision_choice(self, index: int) -> None:
        self.session.set_precision(self.precision_combo.itemText(index))

    def _on_labels_choice(self, index: int) -> None:
        try:
            self.session.set_labels_layer(self.labels_combo.itemData(index))
        except (ValueError, TypeError) as exc:
            self.session._error(str(exc))
            self._refresh_layers()

    def _on_status(self, event) -> None:
        self.status.setStyleSheet("")
        self.status.setText(event.value)
        self._show_sign()

    def _on_error(self, event) -> None:
        self.status.setStyleSheet("color: #ff8080;")
        self.status.setText(event.value)

    def _on_model_event(self, event=None) -> None:
        self._fill_models()
        self.device_combo.setCurrentText(self.session.models.device)
        self.precision_combo.setCurrentText(self.session.models.precision)

    def _on_committed(self, event) -> None:
        self._refresh_layers()

    def _show_sign(self) -> None:
        sign = self.session.next_sign
        colour = "#3c3" if sign == POSITIVE else "#e33"
        self.sign_button.setText(f"Next points: {sign} ({KEYS['toggle_sign']} toggles)")
        self.sign_button.setStyleSheet(f"color: {colour};")

    def _on_prediction(self, event=None) -> None:
        self._show_sign()
        result = self.session.result
        ambiguous = result is not None and result.n_candidates > 1
        for i, button in enumerate(self.candidate_buttons):
            button.setEnabled(ambiguous)
            if ambiguous:
                button.setText(f"{_CANDIDATES[i]} {result.iou_scores[0, i]:.2f}")
                button.setChecked(result.selected[0] == i)
            else:
                button.setText(_CANDIDATES[i])
        self.next_mask_button.setEnabled(ambiguous)
        if result is not None and result.is_empty:
            self.status.setStyleSheet("color: #ffb060;")
            self.status.setText(EMPTY_MASK_HINT[0].upper() + EMPTY_MASK_HINT[1:] + ".")
        elif result is not None:
            scores = ", ".join(
                f"{result.iou_scores[b, m]:.2f}" for b, m in enumerate(result.selected)
            )
            self.status.setStyleSheet("")
            self.status.setText(
                f"{result.n_objects} object(s), predicted IoU {scores}. "
                f"{KEYS['commit']}: commit, {KEYS['clear']}: clear"
            )
