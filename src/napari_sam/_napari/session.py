"""One interactive Segment Anything session per viewer (no Qt widgets here).

The session owns the model (chosen by name or checkpoint file, loaded
lazily, or injected with :meth:`SamSession.set_model`), the embedding cache,
and references to its layers: prompt points, prompt boxes, the preview and
the target labels. Widgets share it through :meth:`SamSession.for_viewer`;
the napari console gets it as ``sam``. Layers are held by reference, never
looked up by name.

Threads: embeddings and model loading run in napari ``thread_worker``s when
a Qt application exists (synchronously otherwise). A result is applied
only if it is still for the image, plane, contrast and model on screen;
anything else is cached under its own key or dropped.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points
from napari.utils.events import EmitterGroup
from napari.utils.notifications import show_error, show_info, show_warning

from . import _keys, _workers
from .cache import EmbeddingKey
from .commit import CommitResult, check_labels_shape, clear_preview, commit_masks, write_preview
from .embeddings import EmbeddingStore
from .layers import (
    NEGATIVE,
    POSITIVE,
    ViewPlane,
    layers_to_prompts,
    spatial_shape,
    view_plane,
    write_prompts,
)
from .models import DEFAULT_MODEL, DEFAULT_PRECISION, ModelSlot, register_local_model
from .own_layers import OwnLayers
from .prefetch import SlicePrefetch
from .segmentation import Segmentation, segment_prompts

_SESSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(viewer):
    """The viewer itself, not napari's per-plugin ``PublicOnlyProxy`` of it.

    Every widget gets its own proxy; the session must be keyed by, and hold
    layers of, the real viewer so that identities (``layer is ...``) hold.
    """
    return getattr(viewer, "__wrapped__", viewer)


EMPTY_MASK_HINT = (
    "the mask is empty. Try another point or a box, "
    "or widen the contrast limits if the image looks dark"
)


class SamSession:
    """Interactive SAM state for one viewer.

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
    model : str or Path
        Model name (``"vit_b"``, ...) or checkpoint file, loaded when needed.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    precision : str
        Precision of the embeddings, one of :data:`napari_sam.precision.PRECISIONS`:
        ``"auto"`` (bf16 where the hardware makes it fast, else fp32),
        ``"exact"`` (fp32, the reference's results), ``"fp32"``, ``"bf16"``, ``"fp16"``.
    cache_bytes : int
        Memory bound of the embedding cache.
    threaded : bool, optional
        Run model loads and embeddings in worker threads; default: when a
        Qt application exists. ``False`` computes in the calling thread.

    Events
    ------
    Each carries ``event.value``: ``status`` and ``error`` (message str),
    ``model`` (source), ``model_list`` (name of a model added to the list),
    ``embedding`` (EmbeddingKey now ready), ``prediction`` (Segmentation or
    None), ``committed`` (CommitResult).

    Attributes
    ----------
    prefetch : bool
        Pre-encode the next slice of a stack in the background (off by
        default; worker threads only, that is in napari).
    """

    def __init__(
        self,
        viewer,
        *,
        model: str | Path = DEFAULT_MODEL,
        device: str = "auto",
        precision: str = DEFAULT_PRECISION,
        cache_bytes: int = 512 * 2**20,
        threaded: bool | None = None,
    ) -> None:
        viewer = _unwrap(viewer)
        self._viewer_ref = weakref.ref(viewer)
        self.events = EmitterGroup(
            source=self,
            status=None,
            model=None,
            model_list=None,
            embedding=None,
            prediction=None,
            committed=None,
            error=None,
        )
        self.commit_mode = "keep"
        self.id_policy = "next_free"
        self.next_sign = POSITIVE
        self.result: Segmentation | None = None
        self._image: Image | None = None
        self.layers = OwnLayers(
            self._viewer_ref, on_prompts_changed=self._on_prompts_changed, setup=self._setup_layer
        )
        self.models = ModelSlot(
            model,
            device,
            precision=precision,
            on_change=self._on_model_changed,
            on_status=self._status,
            on_error=self._error,
        )
        self.embeddings = EmbeddingStore(
            self.models, max_bytes=cache_bytes, on_status=self._status, on_error=self._error
        )
        self._preview_plane: ViewPlane | None = None
        self.slices = SlicePrefetch()
        self._quiet = 0
        self._n_outside = 0
        self.threaded = threaded
        dims = viewer.dims.events
        for emitter in (dims.current_step, dims.order, dims.ndisplay):
            emitter.connect(self._on_view_changed)
        viewer.layers.events.removed.connect(self._on_layer_removed)
        _keys.bind_keys(self, viewer)

    @classmethod
    def for_viewer(cls, viewer, **kwargs: Any) -> SamSession:
        """The viewer's session, created on first use (one model and cache per viewer)."""
        viewer = _unwrap(viewer)
        session = _SESSIONS.get(viewer)
        if session is None:
            session = _SESSIONS[viewer] = cls(viewer, **kwargs)
        return session

    @property
    def viewer(self):
        """The viewer (the session does not keep it alive)."""
        viewer = self._viewer_ref()
        if viewer is None:
            raise RuntimeError("the viewer of this session was closed")
        return viewer

    # ------------------------------------------------------------------ model
    @property
    def model(self):
        """The loaded model, or None (see :meth:`ensure_model`)."""
        return self.models.model

    @property
    def busy(self) -> bool:
        """True while a model load or an embedding runs."""
        return self.models.job is not None or self.embeddings.job is not None

    def set_model(self, model, *, name: str | None = None) -> None:
        """Use an already built model (tests, scripts, fine-tuned weights)."""
        self.models.set_model(model, name=name)

    def add_local_model(self, name: str, path: str | Path) -> str:
        """Offer checkpoint ``path`` as model ``name`` in the model lists (e.g. fine-tuned)."""
        register_local_model(name, path)
        self.events.model_list(value=name)
        return name

    def set_model_source(self, source: str | Path) -> None:
        """Choose a model by name or checkpoint file; it loads when needed."""
        self.models.set_source(source)

    def set_device(self, device: str) -> None:
        """Choose ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``; moves a loaded model."""
        self.models.set_device(device)

    def set_precision(self, precision: str) -> None:
        """Choose the precision of new embeddings; those of the old one are recomputed.

        Parameters
        ----------
        precision : {"auto", "exact", "fp32", "bf16", "fp16"}
            ``"auto"``: bf16 where this CPU or GPU runs it fast, else fp32;
            ``"exact"``: fp32, the reference implementation's results.

        Raises
        ------
        ValueError
            If ``precision`` is not one of those.
        """
        self.models.set_precision(precision)

    @property
    def prefetch(self) -> bool:
        """Whether the next slice is pre-encoded while the person works on this one.

        With it on, once the plane on screen has its embedding the session
        encodes its neighbour (the next slice the way the slider last moved,
        +1 along the innermost slider at first) in a worker. The worker steps
        aside while a preview is computed, is dropped when another slice is
        asked for, and its embedding is shown at once when the person moves
        there. Costs: clicks made while it runs are slower (both share the
        CPU; see docs/performance.md), and one more embedding is cached.
        Needs worker threads (napari); ignored with ``threaded=False``.
        """
        return self.slices.enabled

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        self.slices.enabled = bool(value)
        if self.slices.enabled:
            self.request_embedding()
        else:
            self.embeddings.cancel_prefetch()

    def ensure_model(self):
        """Load the model now (blocking; downloads if needed) and return it."""
        return self.models.ensure()

    def load_model_async(self) -> None:
        """Start loading (downloading) the model in a worker, as the Load button does."""
        self.models.error = None
        self.models.start_load(on_ready=self._on_model_ready)

    def _on_model_changed(self) -> None:
        self.embeddings.clear()
        self._set_result(None)
        self.events.model(value=self.models.source)
        self.request_embedding()

    def _on_model_ready(self) -> None:
        self.events.model(value=self.models.source)
        self.request_embedding()

    # ------------------------------------------------------------------ layers
    @property
    def image_layer(self) -> Image | None:
        """The image being segmented."""
        return self._image

    @property
    def points_layer(self):
        """Prompt points (``sign`` feature: positive / negative)."""
        return self.layers.points

    @property
    def boxes_layer(self):
        """Prompt boxes (Shapes in rectangle mode)."""
        return self.layers.boxes

    @property
    def preview_layer(self) -> Labels | None:
        """The live preview (ids 1..B)."""
        return self.layers.preview

    @property
    def labels_layer(self) -> Labels | None:
        """Where commits go (None: created on the next commit)."""
        return self.layers.labels

    def set_image(self, layer: Image | None) -> None:
        """Segment ``layer``: creates prompt layers aligned with it, starts its embedding."""
        if layer is self._image:
            return
        if layer is not None and not isinstance(layer, Image):
            raise TypeError(f"layer must be a napari Image layer; received {type(layer).__name__}")
        if self._image is not None:
            self._image.events.contrast_limits.disconnect(self._on_contrast)
            self._image.events.data.disconnect(self._on_image_data)
        self.clear_prompts()
        self.layers.remove(self.layers.preview)
        self._preview_plane = None
        self._image = layer
        if layer is None:
            return
        layer.events.contrast_limits.connect(self._on_contrast)
        layer.events.data.connect(self._on_image_data)
        self.layers.ensure_prompts(layer)
        self.layers.points.feature_defaults["sign"] = self.next_sign
        labels = self.layers.labels
        if labels is not None and tuple(np.shape(labels.data)) != spatial_shape(layer):
            self.layers.labels = None
        self.request_embedding()

    def set_labels_layer(self, layer: Labels | None) -> None:
        """Commit into ``layer`` (None: create one on the next commit)."""
        if layer is not None:
            if not isinstance(layer, Labels):
                raise TypeError(f"layer must be a napari Labels layer; received {layer!r}")
            if self._image is not None:
                check_labels_shape(layer, spatial_shape(self._image))
        self.layers.labels = layer

    def _setup_layer(self, layer) -> None:
        _keys.bind_keys(self, layer)
        if isinstance(layer, Points):
            layer.mouse_drag_callbacks.insert(0, _keys.negative_click(self))

    # -------------------------------------------------------------- embedding
    def current_plane(self) -> ViewPlane | None:
        """The plane of the image on screen, or None (no image, 3D view)."""
        viewer = self._viewer_ref()
        if self._image is None or viewer is None:
            return None
        try:
            return view_plane(self._image, viewer.dims)
        except ValueError as exc:
            self._status(str(exc))
            return None

    def embedding_for(self, image: Image | None = None, plane: ViewPlane | None = None):
        """Embedding of ``plane`` of ``image`` (default: on screen), computed here if needed.

        Blocking (loads the model too); the automatic widget calls it from its worker.
        """
        image = image or self._image
        plane = plane or self.current_plane()
        if image is None or plane is None:
            raise ValueError("no image plane to encode: choose an image layer in a 2D view")
        return self.embeddings.compute(image, plane)

    def request_embedding(self, *, download: bool = False) -> bool:
        """Make sure the plane on screen gets an embedding; True if it is ready now.

        Starts a model load if needed (a download only with ``download`` or
        when the weights are local) and an embedding worker; one at a time.
        """
        plane = self.current_plane()
        if plane is None:
            return False
        threaded = _workers.can_run_async() if self.threaded is None else self.threaded
        if self.embeddings.get(self._image, plane) is not None:
            if threaded:
                self._prefetch_after(plane)
            return True
        if self.models.model is None:
            if not (download or self.models.is_local):
                self._status(
                    f"Model {self.models.name} is not downloaded yet: add a prompt "
                    "or press Load to download it"
                )
            elif threaded:
                self.models.start_load(on_ready=self._on_model_ready)
            else:
                self.models.load_here()
            if self.models.model is None:
                return False
        if not threaded:
            done = self.embeddings.compute_here(self._image, plane)
            if done:
                self._status(self._ready_message(self.embeddings.key(self._image, plane)))
            return done
        self.embeddings.cancel_prefetch(keep=self.embeddings.key(self._image, plane))
        self.embeddings.start(self._image, plane, on_done=self._on_embedding_done)
        return False

    def _prefetch_after(self, plane: ViewPlane) -> None:
        """Pre-encode the slice after ``plane`` (which has its embedding) if asked to."""
        target = self.slices.target(self._image, plane)
        if target is not None and self.embeddings.get(self._image, target) is None:
            self.embeddings.start(
                self._image, target, on_done=self._on_embedding_done, prefetch=True
            )

    def _on_embedding_done(self, key: EmbeddingKey) -> None:
        plane = self.current_plane()
        if (
            plane is not None
            and self.embeddings.key(self._image, plane) == key
            and key in self.embeddings.cache
        ):
            self._status(self._ready_message(key))
            self.events.embedding(value=key)
            self.update_preview()
            self._prefetch_after(plane)
        else:  # slice, image, contrast or model changed meanwhile (or a prefetch ended)
            self.request_embedding()

    def _ready_message(self, key: EmbeddingKey) -> str:
        """The ready message, with the precision the embedding was computed in (``bf16``...)."""
        embedding = self.embeddings.cache.get(key)
        precision = "" if embedding is None else f" ({embedding.precision})"
        return f"Embedding ready{precision}: click to add points, draw boxes"

    # ---------------------------------------------------------------- preview
    def update_preview(self, reason: str = "changed") -> Segmentation | None:
        """Recompute the preview from the prompt layers (``reason="added"`` feeds back logits)."""
        plane = self.current_plane()
        if self._quiet or plane is None:
            return None
        prompts = layers_to_prompts(self.points_layer, self.boxes_layer, self._image, plane)
        if prompts.n_outside and prompts.n_outside != self._n_outside:
            show_warning(f"{prompts.n_outside} prompt(s) outside the image are ignored")
        self._n_outside = prompts.n_outside
        if prompts.is_empty:
            return self._set_result(None)
        key = self.embeddings.key(self._image, plane)
        embedding = self.embeddings.cache.get(key)
        if embedding is None or self.models.model is None:
            self._set_result(None)
            self.request_embedding(download=True)
            return None
        previous = self.result
        single = previous is not None and previous.key == key and previous.n_objects == 1
        mask_input = previous.low_res_logits[0] if reason == "added" and single else None
        if len(prompts.boxes_xyxy) > 1:
            mask_input = None
        with self.embeddings.interactive():  # a running prefetch waits
            result = segment_prompts(
                self.models.model, embedding, prompts, key=key, plane=plane, mask_input=mask_input
            )
        return self._set_result(result)

    def _set_result(self, result: Segmentation | None) -> Segmentation | None:
        self.result = result
        if self.preview_layer is not None and result is None:
            clear_preview(self.preview_layer, self._preview_plane)
            self._preview_plane = None
        elif result is not None:
            write_preview(
                self.layers.ensure_preview(self._image),
                result.plane,
                result.masks,
                self._preview_plane,
            )
            self._preview_plane = result.plane
        self.events.prediction(value=result)
        return result

    def cycle_mask(self, step: int = 1) -> Segmentation | None:
        """Show the next (``step=1``) or previous candidate of an ambiguous prompt."""
        result = self.result
        if result is None or result.n_candidates == 1:
            return result
        return self._set_result(result.with_selected(result.selected[0] + step))

    def select_mask(self, index: int) -> Segmentation | None:
        """Show candidate ``index`` of an ambiguous prompt."""
        if self.result is None:
            return None
        return self._set_result(self.result.with_selected(index))

    # -------------------------------------------------------------- scripting
    def segment(self, points_xy=None, point_labels=None, boxes_xyxy=None) -> Segmentation | None:
        """Prompt the plane on screen from code; replaces the prompt layers' content.

        Parameters
        ----------
        points_xy : array-like of shape (N, 2), optional
            ``(x, y)`` = (column, row) pixels of the image plane on screen.
        point_labels : array-like of shape (N,), optional
            1 positive (default), 0 negative.
        boxes_xyxy : array-like of shape (B, 4), optional
            ``(x0, y0, x1, y1)`` pixels; one object per box.

        Returns
        -------
        Segmentation or None
            The preview now shown (None if every prompt was outside the image).
        """
        plane = self.current_plane()
        if plane is None:
            raise ValueError("no image plane on screen: choose an image layer in a 2D view")
        self.embedding_for(self._image, plane)
        with self._quiet_events():
            write_prompts(
                self.points_layer,
                self.boxes_layer,
                self._image,
                plane,
                points_xy=points_xy,
                point_labels=point_labels,
                boxes_xyxy=boxes_xyxy,
            )
        self._set_result(None)
        return self.update_preview()

    # ----------------------------------------------------------------- commit
    def commit(
        self, *, mode: str | None = None, id_policy: str | None = None
    ) -> CommitResult | None:
        """Write the preview into the target labels (one undo step), then clear the prompts.

        Returns None (and says so) when there is nothing to commit: no
        prompts, or only empty masks (no label id is spent on those; the
        prompts stay for another try).
        """
        result = self.result
        plane = self.current_plane()
        if result is None or plane is None or result.key != self.embeddings.key(self._image, plane):
            show_info("Nothing to commit: add points or boxes first")
            return None
        if result.is_empty:
            show_info(f"Nothing to commit: {EMPTY_MASK_HINT}")
            return None
        out = commit_masks(
            self.layers.ensure_labels(self._image),
            result.plane,
            result.masks,
            mode=mode or self.commit_mode,
            id_policy=id_policy or self.id_policy,
        )
        self.clear_prompts()
        ids = ", ".join(str(i) for i in out.label_ids)
        self._status(f"Committed {len(out.label_ids)} object(s) to {out.layer.name!r} (id {ids})")
        self.events.committed(value=out)
        return out

    def commit_from_ui(self) -> CommitResult | None:
        """:meth:`commit`, with errors shown as notifications instead of raised."""
        try:
            return self.commit()
        except (ValueError, TypeError, OverflowError) as exc:
            self._error(str(exc))
            return None

    def clear_prompts(self) -> None:
        """Remove every prompt point and box and the preview, committing nothing."""
        with self._quiet_events():
            self.layers.clear_prompts()
        self._n_outside = 0
        self._set_result(None)

    def toggle_sign(self) -> str:
        """Switch the sign of the next points (positive <-> negative); return the new sign."""
        self.next_sign = NEGATIVE if self.next_sign == POSITIVE else POSITIVE
        if self.points_layer is not None:
            self.points_layer.feature_defaults["sign"] = self.next_sign
        self._status(f"Next points are {self.next_sign}")
        return self.next_sign

    # ----------------------------------------------------------------- events
    @contextlib.contextmanager
    def _quiet_events(self):
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _on_prompts_changed(self, event) -> None:
        action = str(getattr(event, "action", "changed"))
        if self._quiet or action.endswith("ing"):  # adding/removing/changing: wait
            return
        if event.source is self.points_layer:
            event.source.feature_defaults["sign"] = self.next_sign
        self.update_preview("added" if action == "added" else action)

    def _on_view_changed(self, event=None) -> None:
        self.slices.shown(self.current_plane())
        self.update_preview("view")
        self.request_embedding()

    def _on_contrast(self, event=None) -> None:
        self.embeddings.discard_layer(self._image)
        self._on_view_changed()

    def _on_image_data(self, event=None) -> None:
        self._on_contrast()

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if layer is self._image:
            self.embeddings.discard_layer(layer)
            self.set_image(None)
        if layer is self.layers.preview:
            self._preview_plane = None
        self.layers.forget(layer)

    def _status(self, message: str) -> None:
        self.events.status(value=message)

    def _error(self, message: str) -> None:
        show_error(message)
        self.events.error(value=message)

    def close(self) -> None:
        """Disconnect from the viewer and unbind keys (layers stay)."""
        viewer = self._viewer_ref()
        self.set_image(None)
        if viewer is not None:
            dims = viewer.dims.events
            for emitter in (dims.current_step, dims.order, dims.ndisplay):
                emitter.disconnect(self._on_view_changed)
            viewer.layers.events.removed.disconnect(self._on_layer_removed)
            _keys.unbind_keys(viewer)
            _SESSIONS.pop(viewer, None)
