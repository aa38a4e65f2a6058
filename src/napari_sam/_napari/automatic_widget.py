"""The "Automatic segmentation" dock widget: Qt controls over :class:`AutomaticSegmentation`.

Image layer, the viewer's shared model, every parameter of
:func:`napari_sam.generate_masks` with tooltips and microscopy presets, a
run on the current slice or the whole stack in a worker thread (progress
bar, Cancel), then curation (drop objects under score or size thresholds)
and acceptance into the user's labels.
"""

from __future__ import annotations

import functools
import threading

import torch
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sam.automatic import PRESETS, AutomaticSettings, Cancelled
from napari_sam.precision import resolve_precision

from . import _workers
from ._forms import ProgressRelay
from .automatic_run import AutomaticResult, AutomaticSegmentation, stack_planes
from .layers import view_plane
from .models import describe_source, model_entries, resolve_device
from .session import SamSession

#: name -> (label, decimals (0: integer), minimum, maximum, tooltip)
PARAMETERS: dict[str, tuple[str, int, float, float, str]] = {
    "points_per_side": ("Points per side", 0, 1, 256, "Prompt grid of n x n points per image"),
    "points_per_batch": ("Points per batch", 0, 1, 1024, "Memory vs speed; results unchanged"),
    "pred_iou_thresh": ("Min predicted IoU", 2, 0, 1, "Keep masks the model rates above this"),
    "stability_score_thresh": ("Min stability", 2, 0, 1, "Keep masks stable under +-offset"),
    "stability_score_offset": ("Stability offset", 2, 0, 10, "Logit shift of the stability test"),
    "box_nms_thresh": ("Duplicate box IoU", 2, 0, 1, "Drop the weaker of two boxes above this"),
    "crop_n_layers": ("Crop layers", 0, 0, 3, "Also run on 4, 16, ... crops (small objects)"),
    "crop_nms_thresh": ("Crop duplicate IoU", 2, 0, 1, "Box NMS threshold between crops"),
    "crop_overlap_ratio": ("Crop overlap", 3, 0, 0.99, "Overlap of layer-1 crops (short side)"),
    "crop_n_points_downscale_factor": ("Crop grid thinning", 0, 1, 8, "Grid / factor**layer"),
    "min_mask_region_area": ("Min region (px)", 0, 0, 1e6, "Fill holes, drop islands under it"),
}


class AutomaticWidget(QWidget):
    """Dock widget: image, shared model, parameters and presets, run, curate, accept.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        Passed by napari when the widget is opened from the Plugins menu.
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.session = SamSession.for_viewer(napari_viewer)
        self.viewer = self.session.viewer
        self.engine = AutomaticSegmentation(self.session)
        self.worker = None
        self._preset = PRESETS["SAM defaults"]
        self._cancel = threading.Event()
        self._relay = ProgressRelay()
        self._relay.changed.connect(self._on_progress)
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_setup())
        layout.addWidget(self._build_parameters())
        layout.addWidget(self._build_run())
        layout.addWidget(self._build_curate())
        layout.addStretch(1)
        events = self.viewer.layers.events
        pairs = [
            (events.inserted, self._refresh_layers),
            (events.removed, self._refresh_layers),
            (self.session.events.model, self._show_model),
            (self.session.events.model, self._show_precision),
            (self.session.events.model_list, self._show_model),
        ]
        for emitter, callback in pairs:
            emitter.connect(callback)
        self.destroyed.connect(lambda *_: [emitter.disconnect(cb) for emitter, cb in pairs])
        self._refresh_layers()
        self._show_precision()
        self.apply_preset("SAM defaults")

    # ----------------------------------------------------------------- build
    def _build_setup(self) -> QGroupBox:
        box = QGroupBox("Image and model")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.setToolTip(
            "The model of this viewer's Segment Anything session, shared with the other "
            "widgets (one model, one embedding cache); a checkpoint file can be chosen "
            "in the 'Segment Anything' widget"
        )
        self.model_combo.activated.connect(self._on_model_choice)
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        self._show_model()
        return box

    def _build_parameters(self) -> QGroupBox:
        box = QGroupBox("Parameters")
        form = QFormLayout(box)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(PRESETS))
        self.preset_combo.setToolTip("Starting points; every value below can be changed")
        self.preset_combo.activated.connect(
            lambda i: self.apply_preset(self.preset_combo.itemText(i))
        )
        form.addRow("Preset", self.preset_combo)
        self.spins: dict[str, QSpinBox | QDoubleSpinBox] = {}
        for name, (label, decimals, low, high, tip) in PARAMETERS.items():
            spin = QSpinBox() if decimals == 0 else QDoubleSpinBox()
            if decimals:
                spin.setDecimals(decimals)
                spin.setSingleStep(10.0**-decimals * 5 if decimals < 3 else 0.01)
            spin.setRange(int(low) if decimals == 0 else low, int(high) if decimals == 0 else high)
            spin.setToolTip(f"{tip} ({name})")
            form.addRow(label, spin)
            self.spins[name] = spin
        return box

    def _build_run(self) -> QGroupBox:
        box = QGroupBox("Run")
        vbox = QVBoxLayout(box)
        row = QHBoxLayout()
        self.slice_radio = QRadioButton("Current slice")
        self.stack_radio = QRadioButton("Whole stack")
        self.slice_radio.setChecked(True)
        self.stack_radio.setToolTip("Every slice parallel to the one on screen, one by one")
        row.addWidget(self.slice_radio)
        row.addWidget(self.stack_radio)
        vbox.addLayout(row)
        self.exact_decoder = QCheckBox("Decode in exact precision")
        self.exact_decoder.setToolTip(
            "Keep the fast (bf16) image encoding of the 'auto' precision but decode in fp32: "
            "finds the objects an exact decoder finds, where bf16 decoding misses a few at "
            "the thresholds (demo model, SAM defaults: 55 of 55 against 52 of 55), for about "
            "1.7x the decoding time. Greyed out when the session already decodes in fp32."
        )
        vbox.addWidget(self.exact_decoder)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        vbox.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        vbox.addWidget(self.progress)
        self.status = QLabel("Choose an image layer and press Run.")
        self.status.setWordWrap(True)
        vbox.addWidget(self.status)
        return box

    def _build_curate(self) -> QGroupBox:
        box = QGroupBox("Curate and accept")
        form = QFormLayout(box)
        self.min_iou = QDoubleSpinBox()
        self.min_stability = QDoubleSpinBox()
        for spin in (self.min_iou, self.min_stability):
            spin.setRange(0.0, 1.0)
            spin.setSingleStep(0.05)
        self.min_area = QSpinBox()
        self.min_area.setRange(0, 10**8)
        self.drop_button = QPushButton("Drop objects below these")
        self.drop_button.setToolTip("Remove them from the automatic layer (not undoable)")
        self.drop_button.clicked.connect(self.drop)
        self.target_combo = QComboBox()
        self.accept_button = QPushButton("Accept into labels")
        self.accept_button.setToolTip(
            "Copy the automatic objects into the chosen layer: new ids, only background "
            "pixels are written, existing objects are never touched; one undo step"
        )
        self.accept_button.clicked.connect(self.accept)
        form.addRow("Min predicted IoU", self.min_iou)
        form.addRow("Min stability", self.min_stability)
        form.addRow("Min area (px)", self.min_area)
        form.addRow(self.drop_button)
        form.addRow("Into", self.target_combo)
        form.addRow(self.accept_button)
        return box

    # -------------------------------------------------------------- controls
    def apply_preset(self, name: str) -> None:
        """Fill the parameter boxes from ``PRESETS[name]``."""
        settings = PRESETS[name]
        self.preset_combo.setCurrentText(name)
        self._preset = settings
        for key, spin in self.spins.items():
            spin.setValue(getattr(settings, key))

    def settings(self) -> AutomaticSettings:
        """The parameters as shown (ValueError if a combination is invalid).

        A value still showing the preset's (rounded to the box's decimals, like
        512/1500) keeps the preset's exact value.
        """
        values = {}
        for key, spin in self.spins.items():
            exact = getattr(self._preset, key)
            shown = round(exact, spin.decimals()) if isinstance(spin, QDoubleSpinBox) else exact
            values[key] = exact if spin.value() == shown else spin.value()
        return AutomaticSettings(**values)

    def _refresh_layers(self, event=None) -> None:
        ours = {id(self.engine.output), id(self.session.preview_layer)}
        images = [la for la in self.viewer.layers if isinstance(la, Image)]
        labels = [la for la in self.viewer.layers if isinstance(la, Labels) and id(la) not in ours]
        for combo, layers, first in (
            (self.image_combo, images, None),
            (self.target_combo, labels, "New layer"),
        ):
            current = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            if first is not None:
                combo.addItem(first, None)
            for layer in layers:
                combo.addItem(layer.name, layer)
            index = next((i for i in range(combo.count()) if combo.itemData(i) is current), -1)
            combo.setCurrentIndex(
                index if index >= 0 else (combo.count() - 1 if first is None else 0)
            )
            combo.blockSignals(False)

    def _show_model(self, event=None) -> None:
        combo, source = self.model_combo, self.session.models.source
        combo.blockSignals(True)
        combo.clear()
        for entry in model_entries():
            combo.addItem(entry.label, entry.name)
        if combo.findData(source) < 0:
            combo.addItem(describe_source(source), source)
        combo.setCurrentIndex(combo.findData(source))
        combo.blockSignals(False)

    def _show_precision(self, event=None) -> None:
        """Offer exact decoding only where the session decodes in half precision."""
        models = self.session.models
        dtype = resolve_precision(models.precision, resolve_device(models.device))
        self.exact_decoder.setEnabled(dtype != torch.float32)

    def _on_model_choice(self, index: int) -> None:
        source = self.model_combo.itemData(index)
        if source != self.session.models.source:
            self.session.set_model_source(source)

    def _say(self, message: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #ff8080;" if error else "")
        self.status.setText(message)

    # ------------------------------------------------------------------- run
    def run(self) -> None:
        """Start a run on the current slice or the whole stack (in a worker thread)."""
        if self.worker is not None:
            return
        image = self.image_combo.currentData()
        try:
            if image is None:
                raise ValueError("choose an image layer first")
            settings = self.settings()
            plane = view_plane(image, self.viewer.dims)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        planes = stack_planes(image, plane) if self.stack_radio.isChecked() else [plane]
        self._cancel.clear()
        from napari.qt.threading import create_worker

        job = functools.partial(
            self.engine.compute,
            image,
            planes,
            settings,
            progress=self._relay.changed.emit,  # a Qt signal: safe from any thread
            cancel=self._cancel.is_set,
            exact_decoder=self.exact_decoder.isChecked(),
        )
        # The run's torch work happens in a thread that ends with it, not in
        # Qt's pool thread (kept alive 30 s): clicks right after a run stay fast.
        self.worker = create_worker(
            _workers.in_short_lived_thread(job),
            _start_thread=False,
            _connect={  # an "errored" handler here: errors are ours to report
                "returned": self._on_done,
                "errored": self._on_failed,
                "finished": self._on_finished,
            },
        )
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setValue(0)
        self._say(f"Segmenting {len(planes)} slice(s) of {image.name!r}…")
        self.worker.start()

    def cancel(self) -> None:
        """Ask the running worker to stop (it stops between batches of points)."""
        self._cancel.set()
        self._say("Cancelling…")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setValue(int(100 * done / max(total, 1)))

    def _on_done(self, result: AutomaticResult) -> None:
        try:
            self.engine.apply(result)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return
        n = sum(len(p.records) for p in result.planes)
        self.progress.setValue(100)
        self._say(f"{n} object(s) on {len(result.planes)} slice(s); scores are layer features")
        self._refresh_layers()

    def _on_failed(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self._say("Cancelled: nothing was changed.")
        else:
            self._say(f"Automatic segmentation failed: {exc}", error=True)

    def _on_finished(self) -> None:
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    # ---------------------------------------------------------------- curate
    def drop(self) -> int:
        """Drop the objects under the curation thresholds."""
        n = self.engine.drop(
            min_iou=self.min_iou.value(),
            min_stability=self.min_stability.value(),
            min_area=self.min_area.value(),
        )
        self._say(f"Dropped {n} object(s); {len(self.engine.objects)} left")
        return n

    def accept(self) -> int:
        """Accept the automatic objects into the chosen (or a new) labels layer."""
        image = self.image_combo.currentData()
        target = self.target_combo.currentData()
        try:
            if target is None:
                if image is None:
                    raise ValueError("choose an image layer first")
                target = self.session.layers.ensure_labels(image)
            n = self.engine.accept(target)
        except ValueError as exc:
            self._say(str(exc), error=True)
            return 0
        self._refresh_layers()
        self.target_combo.setCurrentIndex(self.target_combo.findData(target))
        self._say(f"Accepted {n} object(s) into {target.name!r} (undo with Ctrl+Z there)")
        return n
