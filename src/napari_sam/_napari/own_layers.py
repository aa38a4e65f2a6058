"""The layers a session creates and holds by reference, aligned with the image (no Qt).

Prompt points (``sign`` feature, green/red), prompt boxes (rectangle mode),
the preview and the target labels; none is ever looked up by name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from napari.layers import Image, Labels, Points, Shapes

from .layers import NEGATIVE, POSITIVE, spatial_shape

SIGN_COLORS = {POSITIVE: "lime", NEGATIVE: "red"}


def copy_transform(source: Image) -> dict:
    """Keyword arguments giving a new layer the same data-to-world transform as ``source``."""
    return {
        "scale": tuple(source.scale),
        "translate": tuple(source.translate),
        "rotate": np.array(source.rotate),
        "shear": np.array(source.shear),
        "affine": source.affine.affine_matrix,
    }


def make_points_layer(image: Image, *, name: str = "SAM points") -> Points:
    """An empty prompt Points layer aligned with ``image``: ``sign`` feature, green/red."""
    return Points(
        np.zeros((0, image.ndim)),
        ndim=image.ndim,
        name=name,
        features={"sign": np.array([], dtype=object)},
        feature_defaults={"sign": POSITIVE},
        face_color="sign",
        face_color_cycle={"colormap": SIGN_COLORS, "fallback_color": "lime"},
        border_color="white",
        size=max(3.0, 0.015 * max(spatial_shape(image)[-2:])),
        **copy_transform(image),
    )


def make_shapes_layer(image: Image, *, name: str = "SAM boxes") -> Shapes:
    """An empty prompt Shapes layer aligned with ``image``, in rectangle mode."""
    layer = Shapes(
        ndim=image.ndim,
        name=name,
        edge_color="yellow",
        face_color="transparent",
        edge_width=max(1.0, 0.004 * max(spatial_shape(image)[-2:])),
        **copy_transform(image),
    )
    layer.mode = "add_rectangle"
    return layer


def make_labels_layer(image: Image, *, name: str, dtype=np.uint32, **kwargs) -> Labels:
    """An empty Labels layer with ``image``'s spatial shape (nD) and transform."""
    data = np.zeros(spatial_shape(image), dtype=dtype)
    return Labels(data, name=name, **copy_transform(image), **kwargs)


class OwnLayers:
    """References to the session's layers, created on demand in ``viewer``.

    Parameters
    ----------
    viewer : callable
        Returns the viewer (the session holds it weakly).
    on_prompts_changed : callable
        Connected to the ``data`` events of the prompt layers.
    setup : callable
        Called with each new layer (key bindings, mouse callbacks).
    """

    def __init__(
        self,
        viewer: Callable[[], object],
        *,
        on_prompts_changed: Callable,
        setup: Callable[[object], None],
    ) -> None:
        self._viewer = viewer
        self._on_prompts_changed = on_prompts_changed
        self._setup = setup
        self.points: Points | None = None
        self.boxes: Shapes | None = None
        self.preview: Labels | None = None
        self.labels: Labels | None = None

    def ensure_prompts(self, image: Image) -> None:
        """Prompt layers for ``image`` (new if its ndim differs); points active, in add mode."""
        viewer = self._viewer()
        for attr in ("points", "boxes"):
            layer = getattr(self, attr)
            if layer is not None and (layer.ndim != image.ndim or layer not in viewer.layers):
                self.remove(layer)
        if self.boxes is None:
            self.boxes = viewer.add_layer(make_shapes_layer(image))
            self.boxes.events.data.connect(self._on_prompts_changed)
            self._setup(self.boxes)
        if self.points is None:
            self.points = viewer.add_layer(make_points_layer(image))
            self.points.events.data.connect(self._on_prompts_changed)
            self._setup(self.points)
        self.points.mode = "add"
        viewer.layers.selection.active = self.points

    def ensure_preview(self, image: Image) -> Labels:
        """The preview layer (created below the prompt layers)."""
        if self.preview is None:
            layer = make_labels_layer(image, name="SAM preview", dtype=np.uint8, opacity=0.6)
            self.insert_below(layer, self.boxes)
            self._setup(layer)
            self.preview = layer
        return self.preview

    def ensure_labels(self, image: Image) -> Labels:
        """The target labels layer (created below the preview on first use)."""
        if self.labels is None or self.labels not in self._viewer().layers:
            layer = make_labels_layer(image, name=f"{image.name} labels", dtype=np.uint8)
            self.insert_below(layer, self.preview or self.boxes)
            self.labels = layer
        return self.labels

    def insert_below(self, layer, anchor) -> None:
        """Add ``layer`` just below ``anchor``, keeping the active layer."""
        layers = self._viewer().layers
        active = layers.selection.active
        layers.insert(layers.index(anchor) if anchor in layers else len(layers), layer)
        if active is not None and active in layers:
            layers.selection.active = active

    def remove(self, layer) -> None:
        """Remove one of our layers from the viewer and forget it."""
        layers = self._viewer().layers
        if layer is not None and layer in layers:
            layers.remove(layer)
        self.forget(layer)

    def forget(self, layer) -> None:
        """Drop our reference to ``layer`` (it was removed by the user)."""
        for attr in ("points", "boxes", "preview", "labels"):
            if getattr(self, attr) is layer:
                setattr(self, attr, None)

    def clear_prompts(self) -> None:
        """Remove every point and box."""
        if self.points is not None and len(self.points.data):
            self.points.data = np.zeros((0, self.points.ndim))
        if self.boxes is not None and self.boxes.nshapes:
            self.boxes.data = []
