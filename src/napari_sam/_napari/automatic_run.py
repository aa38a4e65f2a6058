"""Automatic segmentation of napari image layers, slice by slice (no Qt).

:class:`AutomaticSegmentation` runs :func:`napari_sam.generate_masks` with
the viewer's :class:`~napari_sam._napari.session.SamSession` (one model and
one embedding cache per viewer, shared with the interactive widget), writes
the objects into a Labels layer it owns (re-running a slice replaces that
slice's objects; a user's layer is never written) with the per-object
scores as layer features, drops objects under score or size thresholds, and
accepts the rest into the user's labels: new ids, background pixels only,
one undo step. A result is applied only while the image, its contrast
limits and the model are those it was computed with.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from napari.layers import Image, Labels

from napari_sam.automatic import AutomaticSettings, Cancelled, MaskRecord, generate_masks
from napari_sam.automatic import records_to_labels as paint_records
from napari_sam.labels import dtype_for, next_free_id

from .layers import ViewPlane, plane_image, spatial_shape
from .own_layers import make_labels_layer
from .session import SamSession

FEATURES = ("index", "predicted_iou", "stability_score", "area", "plane")


@dataclass(frozen=True, eq=False)
class PlaneResult:
    """The objects found on one plane (``records`` in the plane's row/column frame)."""

    plane: ViewPlane
    records: list[MaskRecord]


@dataclass(frozen=True, eq=False)
class AutomaticResult:
    """One run: which image, model generation and contrast it was computed for."""

    image: Image
    model_token: int
    contrast_limits: tuple[float, float]
    planes: list[PlaneResult]


def stack_planes(image: Image, plane: ViewPlane) -> list[ViewPlane]:
    """Every plane of ``image`` parallel to ``plane`` (the plane itself for 2D)."""
    others = [axis for axis, index in enumerate(plane.indices) if index is not None]
    planes = []
    for combo in itertools.product(*(range(plane.shape[axis]) for axis in others)):
        indices = list(plane.indices)
        for axis, index in zip(others, combo, strict=True):
            indices[axis] = index
        planes.append(dataclasses.replace(plane, indices=tuple(indices)))
    return planes


class AutomaticSegmentation:
    """Automatic segmentation for one viewer's session (no Qt; scriptable).

    Parameters
    ----------
    session : SamSession
        Gives the model and the embedding cache.
    """

    def __init__(self, session: SamSession) -> None:
        self.session = session
        self.output: Labels | None = None
        self.objects: dict[int, tuple[tuple, MaskRecord]] = {}  # id -> (plane key, record)

    def compute(
        self,
        image: Image,
        planes: list[ViewPlane],
        settings: AutomaticSettings,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        exact_decoder: bool = False,
    ) -> AutomaticResult:
        """Find the objects of ``planes`` (blocking; safe in a worker thread).

        ``progress(done, total)`` counts steps over all planes (embedding,
        batches of points); ``cancel()`` raises :class:`Cancelled` between them.
        Encoding uses the session's precision, and so does decoding unless
        ``exact_decoder`` (fp32 decoding: the objects an exact decoder finds
        from these embeddings, for about 1.7x the decoding time in bf16).
        """
        store = self.session.embeddings
        model = self.session.models.ensure()
        token, precision = self.session.models.token, self.session.models.precision
        limits = tuple(float(v) for v in image.contrast_limits)
        per_plane = 100
        results = []
        for k, plane in enumerate(planes):
            if cancel is not None and cancel():
                raise Cancelled("automatic segmentation was cancelled")

            def step(done: int, total: int, k: int = k) -> None:
                if progress is not None:
                    progress(k * per_plane + (per_plane * done) // max(total, 1), len(planes) * 100)

            if settings.crop_n_layers == 0:
                source = store.compute(image, plane)  # cached, shared with the interactive widget
            else:
                source = plane_image(image, plane)
            kwargs = dataclasses.asdict(settings)
            records = generate_masks(
                model,
                source,
                rgb=image.rgb,
                contrast_limits=limits,
                precision=precision,  # crops are encoded here, not through the cache
                decoder_precision="exact" if exact_decoder else None,
                progress=step,
                cancel=cancel,
                **kwargs,
            )
            results.append(PlaneResult(plane, records))
        return AutomaticResult(image, token, limits, results)

    def is_current(self, result: AutomaticResult) -> bool:
        """Whether ``result`` still fits the image, its contrast and the model."""
        image = result.image
        return (
            image in self.session.viewer.layers
            and result.model_token == self.session.models.token
            and tuple(float(v) for v in image.contrast_limits) == result.contrast_limits
        )

    def apply(self, result: AutomaticResult) -> Labels:
        """Write ``result`` into the output layer (created if needed), replacing those planes."""
        if not self.is_current(result):
            raise ValueError(
                "the image, its contrast limits or the model changed during the run: "
                "the result was not applied; run again"
            )
        output = self._ensure_output(result.image)
        data = output.data
        for found in result.planes:
            self._clear_plane(found.plane)
            start = max(self.objects, default=0) + 1
            values = paint_records(found.records, shape_hw=found.plane.shape_hw, start_id=start)
            wide = dtype_for(data.dtype, int(values.max(initial=0)))
            if wide != data.dtype:
                data = data.astype(wide)
            data[found.plane.data_index()] = _on_screen(values, found.plane)
            for i, record in enumerate(found.records):
                self.objects[start + i] = (found.plane.key, record)
        output.data = data
        self._update_features()
        return output

    def drop(self, *, min_iou: float = 0.0, min_stability: float = 0.0, min_area: int = 0) -> int:
        """Remove objects under a predicted IoU, stability or area threshold; return how many."""
        gone = [
            label
            for label, (_, r) in self.objects.items()
            if r.predicted_iou < min_iou
            or (min_stability > 0 and not r.stability_score >= min_stability)
            or r.area < min_area
        ]
        if gone and self.output is not None:
            data = self.output.data
            data[np.isin(data, gone)] = 0
            self.output.refresh()
        for label in gone:
            del self.objects[label]
        self._update_features()
        return len(gone)

    def accept(self, target: Labels) -> int:
        """Copy the objects into ``target``: new ids, background pixels only, one undo step.

        Returns
        -------
        int
            Number of objects that got at least one pixel.
        """
        if self.output is None or not self.objects:
            return 0
        if target is self.output or target is self.session.preview_layer:
            raise ValueError("choose a labels layer of your own to accept into")
        shape = tuple(np.shape(self.output.data))
        if tuple(np.shape(target.data)) != shape:
            raise ValueError(
                f"labels layer {target.name!r} has shape {np.shape(target.data)}, the "
                f"automatic result has shape {shape}: choose a layer of the image's shape"
            )
        ours = np.asarray(self.output.data)
        index = np.nonzero((ours > 0) & (np.asarray(target.data) == 0))
        values = ours[index]
        old_ids, inverse = np.unique(values, return_inverse=True)
        start = next_free_id(np.asarray(target.data))
        wide = dtype_for(target.data.dtype, start + len(old_ids))
        if wide != target.data.dtype:
            target.data = target.data.astype(wide)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(old_ids) + 1))
        with target.block_history():
            for k in range(len(old_ids)):
                rows = order[bounds[k] : bounds[k + 1]]
                target.data_setitem(tuple(axis[rows] for axis in index), start + k)
        target.selected_label = start + len(old_ids)
        return len(old_ids)

    # ------------------------------------------------------------- internals
    def _ensure_output(self, image: Image) -> Labels:
        viewer = self.session.viewer
        output = self.output
        if (
            output is None
            or output not in viewer.layers
            or output.data.shape != spatial_shape(image)
        ):
            if output is not None and output in viewer.layers:
                viewer.layers.remove(output)
            output = make_labels_layer(image, name=f"{image.name} automatic", dtype=np.uint32)
            viewer.add_layer(output)
            self.output, self.objects = output, {}
        return output

    def _clear_plane(self, plane: ViewPlane) -> None:
        self.output.data[plane.data_index()] = 0
        for label in [k for k, (key, _) in self.objects.items() if key == plane.key]:
            del self.objects[label]

    def _update_features(self) -> None:
        if self.output is None:
            return
        labels = sorted(self.objects)
        records = [self.objects[k][1] for k in labels]
        self.output.features = {
            "index": np.array(labels, dtype=np.int64),
            "predicted_iou": np.array([r.predicted_iou for r in records]),
            "stability_score": np.array([r.stability_score for r in records]),
            "area": np.array([r.area for r in records], dtype=np.int64),
            "plane": np.array([str(self.objects[k][0][2]) for k in labels], dtype=object),
        }


def _on_screen(values: np.ndarray, plane: ViewPlane) -> np.ndarray:
    """A plane-frame (rows, columns as on screen) array in the layer's axis order."""
    return values.T if plane.row_axis > plane.col_axis else values
