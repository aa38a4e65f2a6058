"""The "Text prompt" dock widget: type what to segment, CLIP picks among SAM's objects.

The SAM model and the embedding cache are the viewer's :class:`SamSession`
(shared with the other widgets and the console); the widget adds a CLIP
model, a cache of automatic masks (so a second query on the same slice is
fast), its own output Labels layer (one feature row per object: text,
score, ...) and a table of the scores. Accept copies the objects into a
labels layer of the user: only background pixels are filled, with new ids,
in one undo step.
"""

from __future__ import annotations

import threading

from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_sam.automatic import AutomaticSettings, Cancelled
from napari_sam.text import AutomaticMaskCache
from napari_sam.weights import CheckpointError

from . import _workers
from ._forms import ProgressRelay
from ._text_job import (
    CLIP_CHOICES,
    ClipSlot,
    TextRequest,
    accept_result,
    folder_choice,
    make_request,
    output_layer_for,
    run_request,
    show_result,
)
from .own_layers import make_labels_layer
from .session import SamSession
from .widget import SamWidget, _disconnect_on_destroy

_FOLDER_ITEM = "open_clip folder…"
_NEW_LABELS = "New layer (on accept)"
_COLUMNS = ("id", "text", "score", "area")
_ERRORS = (CheckpointError, ImportError, ValueError, TypeError, RuntimeError, OSError)


class TextPromptWidget(QWidget):
    """Segment the objects a text describes (SAM proposes, CLIP ranks).

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Passed by napari when the widget is opened from the Plugins menu.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.session = SamSession.for_viewer(napari_viewer)
        self.viewer = self.session.viewer
        self.clip_slot = ClipSlot()
        self.mask_cache = AutomaticMaskCache(max_entries=8)
        self.automatic_settings = AutomaticSettings()
        self.threaded: bool | None = None  # None: a worker thread when Qt runs
        self.output_layer: Labels | None = None
        self.result = None  # (TextRequest, TextSegmentation) shown in the output layer
        self.job = None
        self._cancel = threading.Event()
        self._generation = 0
        self._image: Image | None = None
        self._relay = ProgressRelay()
        self._relay.changed.connect(self._on_progress)
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_inputs())
        layout.addWidget(self._build_run())
        self.table = QTableWidget(0, len(_COLUMNS))
        self.table.setHorizontalHeaderLabels(list(_COLUMNS))
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        layout.addWidget(self.table, 1)
        layout.addWidget(self._build_accept())
        self.status = QLabel("Type what to segment, e.g. nucleus; press Enter.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        self._connect()
        self._refresh_layers()

    # ----------------------------------------------------------------- build
    def _build_inputs(self) -> QGroupBox:
        box = QGroupBox("Image and CLIP")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.clip_combo = QComboBox()
        for choice in CLIP_CHOICES:
            self.clip_combo.addItem(choice.label, choice)
            self.clip_combo.setItemData(
                self.clip_combo.count() - 1, choice.note, Qt.ItemDataRole.ToolTipRole
            )
        self.clip_combo.addItem(_FOLDER_ITEM, None)
        self.clip_combo.setToolTip("Weights are downloaded on first use (see docs/text-prompts.md)")
        form.addRow("Image", self.image_combo)
        form.addRow("CLIP", self.clip_combo)
        return box

    def _build_run(self) -> QGroupBox:
        box = QGroupBox("Text")
        form = QFormLayout(box)
        self.text_edit = QLineEdit()
        self.text_edit.setPlaceholderText("nucleus; mitotic cell   (Enter runs)")
        self.text_edit.setToolTip("One or several texts separated by ';': one class per text")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.5)
        self.threshold_spin.setToolTip(
            "Minimum score: probability of the text against 'background'"
        )
        self.top_k_spin = QSpinBox()
        self.top_k_spin.setRange(0, 10_000)
        self.top_k_spin.setSpecialValueText("all")
        self.top_k_spin.setToolTip("At most this many objects per text (0: all)")
        self.prompts_check = QCheckBox("Only at SAM points / inside SAM boxes")
        self.prompts_check.setToolTip(
            "Keep the candidates containing a positive point or lying inside a box of the "
            "Segment Anything widget's prompt layers (text + box: the best object in the box)"
        )
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        form.addRow("Text", self.text_edit)
        form.addRow("Threshold", self.threshold_spin)
        form.addRow("Top k", self.top_k_spin)
        form.addRow(self.prompts_check)
        form.addRow(buttons)
        form.addRow(self.progress_bar)
        return box

    def _build_accept(self) -> QGroupBox:
        box = QGroupBox("Accept")
        form = QFormLayout(box)
        self.labels_combo = QComboBox()
        self.accept_button = QPushButton("Accept into labels")
        self.accept_button.setToolTip(
            "Copy the objects into the labels layer: only background pixels are filled, "
            "each object gets a new id (one undo step)"
        )
        self.accept_button.setEnabled(False)
        form.addRow("Labels", self.labels_combo)
        form.addRow(self.accept_button)
        return box

    # --------------------------------------------------------------- connect
    def _connect(self) -> None:
        self.text_edit.returnPressed.connect(self.run)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.accept_button.clicked.connect(self.accept)
        self.image_combo.currentIndexChanged.connect(self._on_image_choice)
        self.clip_combo.activated.connect(self._on_clip_choice)
        self.table.itemSelectionChanged.connect(self._on_row_selected)
        layer_events = self.viewer.layers.events
        pairs = [
            (layer_events.inserted, self._refresh_layers),
            (layer_events.removed, self._on_layer_removed),
            (self.session.events.model, self._on_model_changed),
        ]
        for emitter, callback in pairs:
            emitter.connect(callback)
        _disconnect_on_destroy(self, pairs)
        self.destroyed.connect(lambda *_: self._watch(None))

    def _watch(self, image: Image | None) -> None:
        """Follow ``image``'s data and contrast: a result of old pixels is never shown."""
        if self._image is not None:
            self._image.events.data.disconnect(self._on_invalidated)
            self._image.events.contrast_limits.disconnect(self._on_invalidated)
        self._image = image
        if image is not None:
            image.events.data.connect(self._on_invalidated)
            image.events.contrast_limits.connect(self._on_invalidated)

    # ------------------------------------------------------------------- API
    @property
    def running(self) -> bool:
        """True while a run is in progress."""
        return self.job is not None

    def set_clip(self, clip) -> None:
        """Use an already loaded CLIP model (from :func:`napari_sam.text.load_clip`)."""
        self.clip_slot.set_clip(clip)
        self.clip_combo.setToolTip(f"Using {self.clip_slot.choice.label}")

    def run(self) -> bool:
        """Start a run with the widget's settings; False (and a message) if it cannot."""
        if self.running:
            self._say("A run is in progress: wait or press Cancel.")
            return False
        request = self._request()
        if request is None:
            return False
        try:
            self.clip_slot.prepare()
        except ImportError as exc:
            self._say(str(exc), error=True)
            return False
        self._cancel.clear()
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress_bar.setRange(0, 0)
        self._say(f"Segmenting {', '.join(request.texts)}…")
        threaded = _workers.can_run_async() if self.threaded is None else self.threaded

        def work():
            return run_request(
                request,
                self.session,
                self.clip_slot,
                self.mask_cache,
                self.automatic_settings,
                progress=self._relay.changed.emit,
                cancel=self._cancel.is_set,
            )

        if not threaded:
            self.job = "here"
            try:
                result = work()
            except (Cancelled, *_ERRORS) as exc:
                self._failed(exc)
            else:
                self._done(request, result)
            return True
        self.job = _workers.start_worker(
            work,
            desc="Text prompt",
            on_returned=lambda result: self._done(request, result),
            on_errored=self._failed,
        )
        return True

    def cancel(self) -> None:
        """Ask the running job to stop (it stops at the next batch)."""
        if self.running:
            self._cancel.set()
            self._say("Cancelling…")

    def accept(self):
        """Copy the shown objects into the chosen labels layer (background only, new ids)."""
        if self.result is None:
            self._say("Nothing to accept: run a text prompt first.")
            return None
        request, result = self.result
        if request.image not in self.viewer.layers or request.generation != self._generation:
            self._say("The image changed since this result: run again.")
            return None
        target = self.labels_combo.currentData()
        if target is None:
            target = make_labels_layer(request.image, name=f"{request.image.name} labels")
            self.viewer.add_layer(target)
        try:
            out = accept_result(target, request, result)
        except (ValueError, TypeError, OverflowError) as exc:
            self._say(str(exc), error=True)
            return None
        self._refresh_layers(target=target)
        ids = f"ids {min(out.label_ids)}-{max(out.label_ids)}" if out.label_ids else "no ids"
        self._say(
            f"Accepted {len(out.label_ids)} object(s) into {target.name!r} ({ids}); "
            "existing objects were not touched."
        )
        return out

    # --------------------------------------------------------------- running
    def _request(self) -> TextRequest | None:
        try:
            return make_request(
                self.session,
                self.image_combo.currentData(),
                self.text_edit.text(),
                threshold=self.threshold_spin.value(),
                top_k=self.top_k_spin.value() or None,
                use_prompts=self.prompts_check.isChecked(),
                generation=self._generation,
            )
        except ValueError as exc:
            self._say(str(exc), error=True)
            return None

    def _finish(self) -> None:
        self.job = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress_bar.setRange(0, 1)

    def _done(self, request: TextRequest, result) -> None:
        self._finish()
        if request.image not in self.viewer.layers or request.generation != self._generation:
            self._say("The image, its contrast or the model changed meanwhile: result dropped.")
            return
        previous = self.result[0].plane if self.result is not None else None
        layer = output_layer_for(self.viewer, self.output_layer, request.image)
        if layer is not self.output_layer:
            self.output_layer = layer
            self._refresh_layers()  # not a target for accept
        show_result(self.output_layer, request, result, previous)
        self.result = (request, result)
        self._fill_table(result)
        self.accept_button.setEnabled(bool(result.objects))
        self.progress_bar.setValue(1)
        best = f", best score {result.objects[0].score:.2f}" if result.objects else ""
        self._say(
            f"{len(result.objects)} object(s) of {len(result.candidates)} candidates for "
            f"{'; '.join(result.texts)}{best}."
        )

    def _failed(self, exc: BaseException) -> None:
        self._finish()
        if isinstance(exc, Cancelled):
            self._say("Cancelled; nothing was changed.")
            return
        message = f"Text prompt failed: {exc}"
        self._say(message, error=True)
        if not isinstance(exc, _ERRORS):
            show_error(message)

    def _on_progress(self, done: int, total: int) -> None:
        if self.running and total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(done)

    # ------------------------------------------------------------- callbacks
    def _fill_table(self, result) -> None:
        self.table.setRowCount(len(result.objects))
        for row, obj in enumerate(result.objects):
            values = (str(obj.label), obj.text, f"{obj.score:.3f}", str(obj.area))
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(value))
        self.table.resizeColumnsToContents()

    def _on_row_selected(self) -> None:
        rows = {i.row() for i in self.table.selectedItems()}
        if self.output_layer is not None and len(rows) == 1:
            self.output_layer.selected_label = int(self.table.item(rows.pop(), 0).text())

    def _refresh_layers(self, event=None, *, target: Labels | None = None) -> None:
        own = {id(self.output_layer), id(self.session.preview_layer)}
        images = [la for la in self.viewer.layers if isinstance(la, Image)]
        labels = [la for la in self.viewer.layers if isinstance(la, Labels) and id(la) not in own]
        current = self.image_combo.currentData() or self.session.image_layer
        SamWidget._fill(self.image_combo, images, current if current in images else None)
        target = target or self.labels_combo.currentData() or self.session.labels_layer
        SamWidget._fill(self.labels_combo, labels, target, first=_NEW_LABELS)
        self._on_image_choice()

    def _on_image_choice(self, index=None) -> None:
        image = self.image_combo.currentData()
        if image is not self._image:
            self._watch(image)
            self._on_invalidated()

    def _on_clip_choice(self, index: int) -> None:
        choice = self.clip_combo.itemData(index)
        if choice is None:
            folder = QFileDialog.getExistingDirectory(self, "open_clip folder (config + weights)")
            if not folder:
                return
            choice = folder_choice(folder)
            self.clip_combo.insertItem(index, choice.label, choice)
            self.clip_combo.setCurrentIndex(index)
        self.clip_slot.set_choice(choice)

    def _on_layer_removed(self, event) -> None:
        if event.value is self.output_layer:
            self.output_layer = None
            self.result = None
            self.accept_button.setEnabled(False)
        self._refresh_layers()

    def _on_invalidated(self, event=None) -> None:
        """Pixels, contrast, image or model changed: running and shown results are stale."""
        self._generation += 1
        if self.result is not None:
            self.accept_button.setEnabled(False)

    def _on_model_changed(self, event=None) -> None:
        """Model, device or precision changed: automatic masks of the old one are not reused."""
        self.mask_cache.clear()
        self._on_invalidated()

    def _say(self, message: str, *, error: bool = False) -> None:
        self.status.setStyleSheet("color: #ff8080;" if error else "")
        self.status.setText(message)
