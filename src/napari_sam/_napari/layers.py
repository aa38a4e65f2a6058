"""napari layers <-> SAM prompts and masks (no Qt, no viewer needed).

This module is the ONLY place where napari's ``(row, col)`` order becomes
SAM's ``(x, y)``: ``x`` is the column, ``y`` the row, in pixel units of the
image plane on screen (integer = pixel centre, as napari and
segment_anything agree). Every prompt goes through world coordinates, so
prompt layers and the image may have different ``scale``/``translate``.

A :class:`ViewPlane` says which 2D plane of an image layer is on screen:
the two data axes shown as rows and columns, and the index of every other
axis. It is computed from a ``Dims`` model, so it works with a full viewer
or with a bare ``ViewerModel`` in a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from napari.components import Dims
from napari.layers import Image, Points, Shapes

#: Feature values of the ``sign`` column of a prompt Points layer.
POSITIVE = "positive"
NEGATIVE = "negative"


@dataclass(frozen=True)
class ViewPlane:
    """The 2D plane of an image layer that is on screen.

    Attributes
    ----------
    ndim : int
        Spatial dimensions of the image layer (``layer.ndim``; an RGB
        channel axis is not counted).
    shape : tuple of int
        Spatial shape of the image layer (length ``ndim``).
    row_axis, col_axis : int
        Data axes of the image shown vertically and horizontally.
    indices : tuple of int or None
        Index of each data axis in the plane; ``None`` for the two shown axes.
    world_point : tuple of float
        The viewer's current world position (``dims.point``); fills in the
        axes a lower-dimensional prompt layer lacks.
    """

    ndim: int
    shape: tuple[int, ...]
    row_axis: int
    col_axis: int
    indices: tuple[int | None, ...]
    world_point: tuple[float, ...]

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the plane on screen."""
        return (self.shape[self.row_axis], self.shape[self.col_axis])

    @property
    def key(self) -> tuple:
        """Hashable identity of the plane (cache key part)."""
        return (self.row_axis, self.col_axis, self.indices)

    def data_index(self) -> tuple[int | slice, ...]:
        """Index into the layer's (spatial) data selecting this plane."""
        return tuple(slice(None) if i is None else i for i in self.indices)

    def full_indices(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
        """nD ``np.nonzero``-style indices of plane pixels ``(rows, cols)``."""
        out = []
        for axis, index in enumerate(self.indices):
            if axis == self.row_axis:
                out.append(np.asarray(rows))
            elif axis == self.col_axis:
                out.append(np.asarray(cols))
            else:
                out.append(np.full(len(rows), index, dtype=np.intp))
        return tuple(out)


@dataclass(frozen=True)
class Prompts:
    """SAM prompts read from napari layers for one :class:`ViewPlane`.

    Attributes
    ----------
    points_xy : ndarray of shape (N, 2), float64
        ``(x, y)`` = (column, row) in image-plane pixels.
    point_labels : ndarray of shape (N,), int64
        1 for positive, 0 for negative points.
    boxes_xyxy : ndarray of shape (B, 4), float64
        ``(x0, y0, x1, y1)`` in image-plane pixels, clipped to the image.
    n_off_plane : int
        Prompts lying on another slice (ignored, silently).
    n_outside : int
        Prompts on this slice but outside the image (ignored; warn the user).
    """

    points_xy: np.ndarray
    point_labels: np.ndarray
    boxes_xyxy: np.ndarray
    n_off_plane: int = 0
    n_outside: int = 0

    @property
    def is_empty(self) -> bool:
        """True when there is neither a point nor a box."""
        return len(self.points_xy) == 0 and len(self.boxes_xyxy) == 0


def view_plane(image: Image, dims: Dims) -> ViewPlane:
    """The plane of ``image`` shown by ``dims`` (a 2D view is required).

    Parameters
    ----------
    image : napari.layers.Image
        Any image layer (grayscale or RGB, 2D or nD).
    dims : napari.components.Dims
        ``viewer.dims``.

    Returns
    -------
    ViewPlane

    Raises
    ------
    ValueError
        For a 3D view, or when the axes on screen are not axes of ``image``.
    """
    if dims.ndisplay != 2:
        raise ValueError(
            f"Segment Anything works on a 2D view; dims.ndisplay is {dims.ndisplay} "
            "(switch the viewer to 2D)"
        )
    offset = dims.ndim - image.ndim
    row_axis, col_axis = (axis - offset for axis in dims.order[-2:])
    if min(row_axis, col_axis) < 0:
        raise ValueError(
            f"the axes on screen {tuple(dims.order[-2:])} are not axes of the image "
            f"layer {image.name!r} (ndim={image.ndim})"
        )
    shape = tuple(int(s) for s in spatial_shape(image))
    data_point = np.asarray(image.world_to_data(np.asarray(dims.point)), dtype=float)
    indices: list[int | None] = []
    for axis in range(image.ndim):
        if axis in (row_axis, col_axis):
            indices.append(None)
        else:
            indices.append(int(np.clip(np.round(data_point[axis]), 0, shape[axis] - 1)))
    return ViewPlane(
        ndim=image.ndim,
        shape=shape,
        row_axis=row_axis,
        col_axis=col_axis,
        indices=tuple(indices),
        world_point=tuple(float(p) for p in dims.point),
    )


def spatial_shape(image: Image) -> tuple[int, ...]:
    """Shape of ``image`` without its RGB(A) channel axis."""
    data = image.data[0] if image.multiscale else image.data
    shape = tuple(int(s) for s in data.shape)
    return shape[:-1] if image.rgb else shape


def plane_image(image: Image, plane: ViewPlane) -> np.ndarray:
    """The pixels of ``plane``, rows and columns as on screen.

    Parameters
    ----------
    image : napari.layers.Image
    plane : ViewPlane

    Returns
    -------
    ndarray of shape (H, W) or (H, W, C)
        A NumPy array (dask/zarr data are computed), layer dtype.
    """
    if image.multiscale:
        raise ValueError(
            f"multiscale image layer {image.name!r} is not supported; "
            "add its full-resolution level as a plain image layer"
        )
    data = image.data
    index = plane.data_index()
    plane_data = np.asarray(data[index + ((slice(None),) if image.rgb else ())])
    if plane.row_axis > plane.col_axis:  # transposed view
        plane_data = np.swapaxes(plane_data, 0, 1)
    return plane_data


def _world_full(layer_world: np.ndarray, plane: ViewPlane) -> np.ndarray:
    """Pad ``layer_world`` (last axes of the world) with the current world point."""
    full = np.array(plane.world_point, dtype=float)
    n = min(len(layer_world), len(full))
    if n:
        full[-n:] = layer_world[-n:]
    return full


def _to_image_data(layer, coords: np.ndarray, image: Image, plane: ViewPlane) -> np.ndarray:
    """Map layer data coordinates (K, layer.ndim) to image data coordinates (K, image.ndim)."""
    out = np.empty((len(coords), image.ndim), dtype=float)
    for k, c in enumerate(coords):
        world = _world_full(np.asarray(layer.data_to_world(c), dtype=float), plane)
        out[k] = image.world_to_data(world)
    return out


def _on_plane(data_coords: np.ndarray, plane: ViewPlane) -> np.ndarray:
    """Boolean (K,): every non-displayed coordinate rounds to the plane's index."""
    keep = np.ones(len(data_coords), dtype=bool)
    for axis, index in enumerate(plane.indices):
        if index is not None:
            keep &= np.round(data_coords[:, axis]) == index
    return keep


def _inside(rows: np.ndarray, cols: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    h, w = shape_hw
    return (rows >= -0.5) & (rows < h - 0.5) & (cols >= -0.5) & (cols < w - 0.5)


def _overlaps(rows: np.ndarray, cols: np.ndarray, h: int, w: int) -> bool:
    """Whether the bounding box of the vertices overlaps the image."""
    return bool(
        rows.max() >= -0.5 and rows.min() < h - 0.5 and cols.max() >= -0.5 and cols.min() < w - 0.5
    )


def points_to_prompts(
    points: Points | None, image: Image, plane: ViewPlane
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Points on ``plane`` as SAM ``points_xy`` and ``point_labels``.

    The sign of each point comes from the ``sign`` feature (``"negative"``
    -> label 0, anything else -> 1).

    Returns
    -------
    points_xy : ndarray of shape (N, 2), float64
    point_labels : ndarray of shape (N,), int64
    n_off_plane, n_outside : int
    """
    empty = (np.zeros((0, 2)), np.zeros(0, dtype=np.int64), 0, 0)
    if points is None or len(points.data) == 0:
        return empty
    coords = _to_image_data(points, np.asarray(points.data, dtype=float), image, plane)
    on_plane = _on_plane(coords, plane)
    rows, cols = coords[:, plane.row_axis], coords[:, plane.col_axis]
    inside = _inside(rows, cols, plane.shape_hw)
    keep = on_plane & inside
    if "sign" in points.features:
        negative = np.asarray(points.features["sign"] == NEGATIVE, dtype=bool)
    else:
        negative = np.zeros(len(coords), dtype=bool)
    points_xy = np.stack([cols[keep], rows[keep]], axis=1)
    labels = np.where(negative[keep], 0, 1).astype(np.int64)
    return points_xy, labels, int((~on_plane).sum()), int((on_plane & ~inside).sum())


def shapes_to_boxes(
    shapes: Shapes | None, image: Image, plane: ViewPlane
) -> tuple[np.ndarray, int, int]:
    """Bounding boxes of the shapes on ``plane`` as SAM ``boxes_xyxy``.

    Every shape counts by its bounding box in the image plane (a rectangle
    drawn in napari is 4 vertices). A box is clipped to the image; one with
    no overlap is dropped as outside, one of zero width or height silently.

    Returns
    -------
    boxes_xyxy : ndarray of shape (B, 4), float64
    n_off_plane, n_outside : int
    """
    if shapes is None or shapes.nshapes == 0:
        return np.zeros((0, 4)), 0, 0
    h, w = plane.shape_hw
    boxes, off_plane, outside = [], 0, 0
    for vertices in shapes.data:
        coords = _to_image_data(shapes, np.asarray(vertices, dtype=float), image, plane)
        if not _on_plane(coords, plane).all():
            off_plane += 1
            continue
        rows, cols = coords[:, plane.row_axis], coords[:, plane.col_axis]
        if not _overlaps(rows, cols, h, w):
            outside += 1
            continue
        x0, x1 = np.clip([cols.min(), cols.max()], 0, w - 1)
        y0, y1 = np.clip([rows.min(), rows.max()], 0, h - 1)
        if x1 <= x0 or y1 <= y0:  # a click without a drag: no box yet
            continue
        boxes.append((x0, y0, x1, y1))
    return np.array(boxes, dtype=float).reshape(-1, 4), off_plane, outside


def layers_to_prompts(
    points: Points | None, shapes: Shapes | None, image: Image, plane: ViewPlane
) -> Prompts:
    """All prompts of ``points`` and ``shapes`` that lie on ``plane``.

    Parameters
    ----------
    points : napari.layers.Points, optional
        Prompt points with a ``sign`` feature.
    shapes : napari.layers.Shapes, optional
        Prompt boxes.
    image : napari.layers.Image
        The image the prompts refer to.
    plane : ViewPlane
        The plane on screen (:func:`view_plane`).

    Returns
    -------
    Prompts
    """
    points_xy, labels, p_off, p_out = points_to_prompts(points, image, plane)
    boxes, b_off, b_out = shapes_to_boxes(shapes, image, plane)
    return Prompts(points_xy, labels, boxes, n_off_plane=p_off + b_off, n_outside=p_out + b_out)


def image_xy_to_world(
    image: Image, plane: ViewPlane, points_xy: Sequence[Sequence[float]] | np.ndarray
) -> np.ndarray:
    """World coordinates of image-plane points ``(x, y)`` (inverse of the prompt mapping).

    Parameters
    ----------
    image : napari.layers.Image
    plane : ViewPlane
    points_xy : array-like of shape (N, 2)
        ``(x, y)`` = (column, row) in image-plane pixels.

    Returns
    -------
    ndarray of shape (N, image.ndim), float64
        World coordinates of the image's axes.
    """
    points_xy = np.asarray(points_xy, dtype=float).reshape(-1, 2)
    out = np.empty((len(points_xy), image.ndim))
    for k, (x, y) in enumerate(points_xy):
        data = np.array([0.0 if i is None else float(i) for i in plane.indices])
        data[plane.row_axis], data[plane.col_axis] = y, x
        out[k] = image.data_to_world(data)
    return out


def world_to_layer_data(layer, world: np.ndarray) -> np.ndarray:
    """World coordinates (N, D) to ``layer`` data coordinates (N, layer.ndim)."""
    world = np.atleast_2d(np.asarray(world, dtype=float))
    return np.array([layer.world_to_data(w) for w in world]).reshape(-1, layer.ndim)


def write_prompts(
    points: Points,
    shapes: Shapes,
    image: Image,
    plane: ViewPlane,
    *,
    points_xy=None,
    point_labels=None,
    boxes_xyxy=None,
) -> None:
    """Replace the content of the prompt layers by image-plane prompts (for scripts).

    Parameters
    ----------
    points, shapes : napari.layers.Points, napari.layers.Shapes
        Prompt layers (any transform).
    image : napari.layers.Image
    plane : ViewPlane
    points_xy : array-like of shape (N, 2), optional
        ``(x, y)`` pixels of the plane.
    point_labels : array-like of shape (N,), optional
        1 positive (default), 0 negative.
    boxes_xyxy : array-like of shape (B, 4), optional
        ``(x0, y0, x1, y1)`` pixels of the plane.
    """
    points_xy = np.asarray([] if points_xy is None else points_xy, float).reshape(-1, 2)
    if point_labels is None:
        point_labels = np.ones(len(points_xy), dtype=int)
    point_labels = np.asarray(point_labels).reshape(-1)
    if point_labels.shape != (len(points_xy),):
        raise ValueError(
            f"point_labels must have shape ({len(points_xy)},) to match points_xy; "
            f"received {point_labels.shape}"
        )
    if not np.isin(point_labels, (0, 1)).all():
        raise ValueError(f"point_labels must be 1 or 0; received {np.unique(point_labels)}")
    points.data = np.zeros((0, points.ndim))
    if shapes.nshapes:
        shapes.data = []
    default = points.feature_defaults["sign"].iloc[0] if "sign" in points.feature_defaults else None
    world = image_xy_to_world(image, plane, points_xy)
    for coords, label in zip(world_to_layer_data(points, world), point_labels, strict=True):
        points.feature_defaults["sign"] = POSITIVE if label == 1 else NEGATIVE
        points.add(coords)
    if default is not None:
        points.feature_defaults["sign"] = default
    boxes = np.asarray([] if boxes_xyxy is None else boxes_xyxy, dtype=float).reshape(-1, 4)
    for x0, y0, x1, y1 in boxes:
        corners = image_xy_to_world(image, plane, [[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        shapes.add_rectangles(world_to_layer_data(shapes, corners))
