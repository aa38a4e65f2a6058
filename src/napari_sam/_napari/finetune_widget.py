"""The "Fine-tune" dock widget: train the session's model on curated labels.

Pairs of an image layer and the labels curated on it (2D images, or every
labelled slice of a stack), steps, learning rate and batch size; training
runs in a worker thread (progress bar, Cancel) with a live plot of the loss
and, when a slice is held out, of the validation IoU. The result is saved
as a checkpoint (official SAM layout), offered in the model list of the
other widgets, and can be made the session's model with "Use in session".
The session's own model is never changed by training (a copy is trained),
and the labels layers are only read.
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_sam.training import TrainingRecord, TrainingResult
from napari_sam.weights import CheckpointError

from . import _workers
from ._finetune_job import (
    TrainingRequest,
    default_checkpoint_path,
    default_name,
    describe_record,
    labelled_planes,
    make_request,
    parse_lr,
    prepare_torch,
    train_in_session,
)
from ._forms import ProgressRelay, form_group, form_row, spin_box
from ._loss_plot import LossPlot
from .session import SamSession
from .widget import SamWidget, _connect_while_alive

_ERRORS = (CheckpointError, ValueError, TypeError, RuntimeError, OSError)


class _Relay(ProgressRelay):
    """Also carries ``log(record)`` from the worker to the main thread."""

    record = Signal(object)


class FinetuneWidget(QWidget):
    """Fine-tune the viewer's SAM model on image/labels pairs.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer whose session (model) is fine-tuned; napari passes it.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.session = SamSession.for_viewer(napari_viewer)
        self.viewer = self.session.viewer
        self.pairs: list[tuple[Image, Labels]] = []
        self.records: list[TrainingRecord] = []
        self.result: TrainingResult | None = None
        self.trained: tuple[str, object] | None = None  # (name, model) of the last run
        self.job = None
        self._cancel = threading.Event()
        self._auto_name = ""
        self._relay = _Relay()
        self._relay.changed.connect(self._on_progress)
        self._relay.record.connect(self._on_record)
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_data())
        layout.addWidget(self._build_training())
        layout.addWidget(self._build_run())
        self.status = QLabel("Add image/labels pairs, then press Train.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._show_model()
        self._connect()
        self._refresh_layers()

    # ----------------------------------------------------------------- build
    def _build_data(self) -> QGroupBox:
        self.image_combo, self.labels_combo = QComboBox(), QComboBox()
        self.add_button = QPushButton("Add pair")
        self.add_button.setToolTip(
            "Train on this image with these labels: a 2D image, or every slice of a "
            "stack that has objects (over the last two axes)"
        )
        self.remove_button = QPushButton("Remove pair")
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(90)
        self.hold_out_check = QCheckBox("Hold out the last labelled slice for validation")
        self.hold_out_check.setToolTip(
            "Not trained on; its one-click and box IoU are plotted during training"
        )
        rows = [
            ("Image", self.image_combo),
            ("Labels", self.labels_combo),
            (None, form_row(self.add_button, self.remove_button)),
            (None, self.pair_list),
            (None, self.hold_out_check),
        ]
        return form_group("Curated data", rows)

    def _build_training(self) -> QGroupBox:
        self.model_label = QLabel()
        self.model_label.setToolTip(
            "Training starts from the session's model (choose it in the Segment Anything "
            "widget); a copy is trained, the session keeps its model"
        )
        self.steps_spin = spin_box(1, 1_000_000, 200, "Optimiser steps (each on a batch of slices)")
        self.lr_edit = QLineEdit("1e-4")
        self.lr_edit.setToolTip("Peak AdamW learning rate (1e-5 to 1e-4 for SAM's weights)")
        self.batch_spin = spin_box(1, 64, 4, "Slices per step (drawn at random, with repetition)")
        self.encoder_check = QCheckBox("Train the image encoder too")
        self.encoder_check.setToolTip(
            "Slower and needs more memory (a GPU for vit_b and larger); off: only the "
            "prompt encoder and mask decoder learn, embeddings are computed once"
        )
        self.name_edit = QLineEdit()
        self.name_edit.setToolTip("Name of the fine-tuned model in the model lists")
        self.path_edit = QLineEdit()
        self.path_edit.setToolTip("Checkpoint file (empty: the cache folder, listed at start-up)")
        self.browse_button = QPushButton("…")
        rows = [
            ("Base model", self.model_label),
            ("Steps", self.steps_spin),
            ("Learning rate", self.lr_edit),
            ("Batch size", self.batch_spin),
            (None, self.encoder_check),
            ("Name", self.name_edit),
            ("Checkpoint", form_row(self.path_edit, self.browse_button)),
        ]
        return form_group("Training", rows)

    def _build_run(self) -> QGroupBox:
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.use_button = QPushButton("Use in session")
        self.use_button.setToolTip("Make the fine-tuned model the model of every widget")
        buttons = QHBoxLayout()
        for button in (self.train_button, self.cancel_button, self.use_button):
            button.setEnabled(button is self.train_button)
            buttons.addWidget(button)
        box = QGroupBox("Run")
        vbox = QVBoxLayout(box)
        vbox.addLayout(buttons)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        vbox.addWidget(self.progress_bar)
        self.plot = LossPlot()
        vbox.addWidget(self.plot)
        return box

    # --------------------------------------------------------------- connect
    def _connect(self) -> None:
        for button, slot in (
            (self.add_button, self.add_pair),
            (self.remove_button, self.remove_pair),
            (self.train_button, self.train),
            (self.cancel_button, self.cancel),
            (self.use_button, self.use_in_session),
            (self.browse_button, self._browse),
        ):
            button.clicked.connect(lambda *_, slot=slot: slot())  # not clicked's bool
        self.name_edit.textChanged.connect(self._show_default_path)
        self.destroyed.connect(lambda *_, cancel=self._cancel: cancel.set())  # closed: stop
        events = self.viewer.layers.events
        _connect_while_alive(
            self,
            [
                (events.inserted, self._refresh_layers),
                (events.removed, self._on_layer_removed),
                (self.session.events.model, self._show_model),
            ],
        )

    # ------------------------------------------------------------------- API
    @property
    def running(self) -> bool:
        """True while a training run is in progress."""
        return self.job is not None

    def add_pair(self, image: Image | None = None, labels: Labels | None = None) -> bool:
        """Add an image/labels pair (default: the combos' choice); False (and why) if invalid."""
        image = image or self.image_combo.currentData()
        labels = labels or self.labels_combo.currentData()
        try:
            planes = labelled_planes(image, labels)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return False
        if any(image is i and labels is la for i, la in self.pairs):
            self._say(f"{image.name!r} with {labels.name!r} is in the list already.")
            return False
        self.pairs.append((image, labels))
        self._fill_pair_list()
        self._say(f"Added {len(planes)} labelled slice(s); press Train when ready.")
        return True

    def remove_pair(self) -> None:
        """Remove the selected pair (the last one if none is selected)."""
        row = self.pair_list.currentRow()
        if self.pairs:
            self.pairs.pop(row if row >= 0 else -1)
            self._fill_pair_list()

    def train(self) -> bool:
        """Start training in a worker thread; False (and a message) if it cannot start."""
        request = self._request()
        if request is None:
            return False
        prepare_torch()
        self.records.clear()
        self.plot.clear(request.steps)
        self._cancel.clear()
        self.progress_bar.setRange(0, request.steps)
        self.progress_bar.setValue(0)
        n = len(request.train)
        self._say(f"Fine-tuning {self.session.models.name} on {n} slice(s)…")
        callbacks = {
            "progress": self._relay.changed.emit,
            "cancel": self._cancel,
            "log": self._relay.record.emit,
        }
        work = partial(train_in_session, request, self.session, **callbacks)
        done = partial(self._done, request)
        self._set_job(
            _workers.start_worker(
                work, desc="Fine-tuning", on_returned=done, on_errored=self._failed
            )
        )
        return True

    def use_in_session(self) -> bool:
        """Make the last fine-tuned model the session's model (all widgets use it)."""
        if self.trained is None:
            self._say("Nothing trained yet: press Train first.")
            return False
        name, model = self.trained
        self.session.set_model(model, name=name)
        self._say(f"The session now uses {name!r}.")
        return True

    def cancel(self) -> None:
        """Ask the running training to stop before its next step (no checkpoint is written)."""
        if not self.running:
            return
        self._cancel.set()
        self._say("Cancelling: training stops before its next step…")

    # --------------------------------------------------------------- running
    def _request(self) -> TrainingRequest | None:
        models = self.session.models
        try:
            if self.running:
                raise ValueError("Training is in progress: wait or press Cancel.")
            if not models.is_local:
                raise ValueError(
                    f"Model {models.name} is not downloaded yet: press Load in the Segment "
                    "Anything widget first (or choose another model there)"
                )
            return make_request(
                self.pairs,
                name=self.name_edit.text().strip(),
                checkpoint_path=self.path_edit.text().strip() or None,
                steps=self.steps_spin.value(),
                batch_size=self.batch_spin.value(),
                lr=parse_lr(self.lr_edit.text().strip()),
                train_encoder=self.encoder_check.isChecked(),
                hold_out=self.hold_out_check.isChecked(),
            )
        except ValueError as exc:
            self._say(str(exc), error=True)
            return None

    def _set_job(self, job) -> None:
        """The running worker (None when idle); the buttons follow."""
        self.job = job
        self.train_button.setEnabled(job is None)
        self.cancel_button.setEnabled(job is not None)

    def _done(self, request: TrainingRequest, result: TrainingResult) -> None:
        self._set_job(None)
        self.result = result
        if result.cancelled or result.checkpoint_path is None:
            self._say(
                f"Cancelled after {result.steps_done} of {request.steps} steps: "
                "no checkpoint was written."
            )
            return
        try:
            self.session.add_local_model(request.name, result.checkpoint_path)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        self.trained = (request.name, result.model)
        self.use_button.setEnabled(True)
        self.progress_bar.setValue(request.steps)
        self._say(
            f"Trained {result.steps_done} steps in {result.seconds:.0f} s; saved "
            f"{result.checkpoint_path} as model {request.name!r} (now in the model lists). "
            "Press Use in session to segment with it."
        )
        self._new_name()

    def _failed(self, exc: BaseException) -> None:
        self._set_job(None)
        message = f"Fine-tuning failed: {exc}"
        self._say(message, error=True)
        if not isinstance(exc, _ERRORS):
            show_error(message)

    def _on_progress(self, done: int, total: int) -> None:
        if self.running:
            self.progress_bar.setRange(0, max(total, 1))
            self.progress_bar.setValue(done)

    def _on_record(self, record: TrainingRecord) -> None:
        self.records.append(record)
        self.plot.add_record(record)
        if self.running and not self._cancel.is_set():
            self._say(describe_record(record, self.plot.total_steps))

    # ------------------------------------------------------------- callbacks
    def _refresh_layers(self, event=None) -> None:
        own = {id(self.session.preview_layer)}
        images = [la for la in self.viewer.layers if isinstance(la, Image)]
        labels = [la for la in self.viewer.layers if isinstance(la, Labels) and id(la) not in own]
        image = self.image_combo.currentData() or self.session.image_layer
        SamWidget._fill(
            self.image_combo, images, image if image in images else (images or [None])[-1]
        )
        target = self.labels_combo.currentData() or self.session.labels_layer
        SamWidget._fill(
            self.labels_combo, labels, target if target in labels else (labels or [None])[-1]
        )

    def _on_layer_removed(self, event) -> None:
        gone = event.value
        self.pairs = [(i, la) for i, la in self.pairs if gone is not i and gone is not la]
        self._fill_pair_list()
        self._refresh_layers()

    def _fill_pair_list(self) -> None:
        self.pair_list.clear()
        for image, labels in self.pairs:
            try:
                count = f"{len(labelled_planes(image, labels))} slice(s)"
            except ValueError:
                count = "no objects now"
            self.pair_list.addItem(f"{image.name}  +  {labels.name}  ({count})")

    def _show_model(self, event=None) -> None:
        self.model_label.setText(self.session.models.name)
        if self.name_edit.text() in ("", self._auto_name):
            self._new_name()

    def _new_name(self) -> None:
        self._auto_name = default_name(self.session.models.name)
        self.name_edit.setText(self._auto_name)

    def _show_default_path(self, name: str) -> None:
        self.path_edit.setPlaceholderText(str(default_checkpoint_path(name.strip() or "model")))

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the fine-tuned checkpoint", "", "Checkpoints (*.pt *.pth);;All (*)"
        )
        if path:
            self.path_edit.setText(str(Path(path)))

    def _say(self, message: str, *, error: bool = False) -> None:
        self.status.setStyleSheet("color: #ff8080;" if error else "")
        self.status.setText(message)
