"""Validate user prompts and batch them into one array per kind (numpy only).

Conventions (all coordinates in ORIGINAL image pixels, x = column, y = row,
integer = pixel centre, so the image covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``):

- ``points_xy``: ``(N, 2)`` shared by every object, or ``(B, N, 2)`` per object.
  ``point_labels``: 1 foreground, 0 background, -1 padding (ignored; lets the
  objects of a ``(B, N, 2)`` batch have different numbers of points; the
  reference accepts -1 with the same meaning). Bool labels are accepted.
- A point labelled 0 or 1 must lie on the image. A click off the image is
  almost always a bug (a wrong layer transform, a stale slice), so it is an
  error, not a silent meaningless mask; filter interactively placed points
  with :func:`points_inside_image` first.
- ``boxes_xyxy``: ``(4,)`` or ``(B, 4)`` with ``x0 <= x1`` and ``y0 <= y1``; one
  object per box. A box may reach past the border but must overlap the image.
- ``mask_input``: low-res logits of a previous prediction, one mask per
  object: ``(4h, 4w)``, ``(B or 1, 4h, 4w)`` or ``(B or 1, 1, 4h, 4w)``.
- Every batched prompt describes 1 or B objects; one object is broadcast.
  An empty point set (N = 0) or box set counts as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """Validated prompts for B objects, broadcast to a common batch size.

    Attributes
    ----------
    batch_size : int
        B, the number of objects.
    points_xy : ndarray of shape (B, N, 2), float32, or None
    point_labels : ndarray of shape (B, N), int32, or None
    boxes_xyxy : ndarray of shape (B, 4), float32, or None
    mask_input : ndarray of shape (B, 1, 4h, 4w), float32, or None
    """

    batch_size: int
    points_xy: np.ndarray | None
    point_labels: np.ndarray | None
    boxes_xyxy: np.ndarray | None
    mask_input: np.ndarray | None


def points_inside_image(points_xy: Any, shape_hw: tuple[int, int]) -> np.ndarray:
    """Which points lie on an image of shape ``shape_hw`` (border included).

    Parameters
    ----------
    points_xy : array-like of shape (..., 2)
        ``(x, y)`` pixel coordinates, integer = pixel centre.
    shape_hw : (int, int)

    Returns
    -------
    ndarray of shape (...), bool
        True where ``-0.5 <= x <= W - 0.5`` and ``-0.5 <= y <= H - 0.5``.
    """
    pts = np.asarray(points_xy, dtype=np.float64)
    h, w = shape_hw
    x, y = pts[..., 0], pts[..., 1]
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def validate_prompts(
    *,
    points_xy: Any,
    point_labels: Any,
    boxes_xyxy: Any,
    mask_input: Any,
    shape_hw: tuple[int, int],
    mask_input_hw: tuple[int, int],
) -> PromptBatch:
    """Check prompts against the conventions above and batch them.

    Parameters
    ----------
    points_xy, point_labels, boxes_xyxy, mask_input : array-like or None
        As in :func:`napari_sam.predict.predict_masks` (torch tensors work too).
    shape_hw : (int, int)
        ``(H, W)`` of the original image.
    mask_input_hw : (int, int)
        ``(4h, 4w)``, the low-res logits' size.

    Returns
    -------
    PromptBatch

    Raises
    ------
    ValueError
        Naming the argument: labels without points (or the reverse), shapes
        or batch sizes that disagree, labels outside {-1, 0, 1}, NaN or
        infinite values, a box with ``x1 < x0`` or ``y1 < y0``, a point off
        the image, a box that misses the image, or no prompt at all.
    TypeError
        For non-numeric input.
    """
    coords, labels = _validate_points(points_xy, point_labels, shape_hw)
    boxes = _validate_boxes(boxes_xyxy, shape_hw)
    masks = _validate_mask_input(mask_input, mask_input_hw)
    if coords is None and boxes is None and masks is None:
        raise ValueError("no prompt given: pass points_xy, boxes_xyxy or mask_input")
    sizes = {
        name: len(a)
        for name, a in (("points_xy", coords), ("boxes_xyxy", boxes), ("mask_input", masks))
        if a is not None and (name != "points_xy" or a.ndim == 3)
    }
    batch = max(sizes.values(), default=1)
    if any(n not in (1, batch) for n in sizes.values()):
        raise ValueError(
            f"every prompt must describe 1 or B objects (B = {batch}); received {sizes}"
        )

    def broadcast(a: np.ndarray | None, ndim: int) -> np.ndarray | None:
        if a is None:
            return None
        a = a if a.ndim == ndim else a[None]
        return np.broadcast_to(a, (batch, *a.shape[1:])).copy()  # writable, contiguous

    return PromptBatch(
        batch_size=batch,
        points_xy=broadcast(coords, 3),
        point_labels=broadcast(labels, 2),
        boxes_xyxy=broadcast(boxes, 2),
        mask_input=broadcast(masks, 4),
    )


def _as_float_array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly on a GPU
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numeric; received {value!r}") from None
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or infinite values (first at index {tuple(bad)})")
    return arr


def _validate_points(
    points_xy: Any, point_labels: Any, shape_hw: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Return ``(N, 2)`` or ``(B, N, 2)`` float32 coords and int32 labels, or ``(None, None)``."""
    if points_xy is None:
        if point_labels is not None:
            raise ValueError("point_labels was given without points_xy")
        return None, None
    if point_labels is None:
        raise ValueError("points_xy needs point_labels (1 = foreground, 0 = background)")
    coords = _as_float_array(points_xy, "points_xy")
    if coords.ndim not in (2, 3) or coords.shape[-1] != 2:
        raise ValueError(f"points_xy must have shape (N, 2) or (B, N, 2); received {coords.shape}")
    labels = _as_float_array(point_labels, "point_labels")
    if labels.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels must have shape {coords.shape[:-1]} to match points_xy of shape "
            f"{coords.shape}; received {labels.shape}"
        )
    if coords.shape[-2] == 0:
        return None, None
    if not np.all(np.isin(labels, (-1, 0, 1))):
        bad = sorted({f"{v:g}" for v in np.unique(labels) if v not in (-1, 0, 1)})
        raise ValueError(
            "point_labels must be 1 (foreground), 0 (background) or -1 (padding); "
            f"received {', '.join(bad)}"
        )
    outside = (labels != -1) & ~points_inside_image(coords, shape_hw)
    if outside.any():
        idx = tuple(int(i) for i in np.argwhere(outside)[0])
        x, y = coords[idx]
        h, w = shape_hw
        raise ValueError(
            f"points_xy{list(idx)} = ({x:g}, {y:g}) lies outside the image of shape "
            f"(H, W) = {shape_hw}; x must be in [-0.5, {w - 0.5:g}], y in [-0.5, {h - 0.5:g}]"
        )
    return coords.astype(np.float32), labels.astype(np.int32)


def _validate_boxes(boxes_xyxy: Any, shape_hw: tuple[int, int]) -> np.ndarray | None:
    """Return ``(B, 4)`` float32 boxes or ``None``."""
    if boxes_xyxy is None:
        return None
    boxes = _as_float_array(boxes_xyxy, "boxes_xyxy")
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes_xyxy must have shape (4,) or (B, 4) as (x0, y0, x1, y1); "
            f"received {np.shape(boxes_xyxy)}"
        )
    if len(boxes) == 0:
        return None
    x0, y0, x1, y1 = boxes.T
    for i in np.flatnonzero((x1 < x0) | (y1 < y0))[:1]:
        raise ValueError(
            f"boxes_xyxy[{i}] = {tuple(boxes[i].tolist())} must have x0 <= x1 and y0 <= y1"
        )
    h, w = shape_hw
    for i in np.flatnonzero((x1 < -0.5) | (x0 > w - 0.5) | (y1 < -0.5) | (y0 > h - 0.5))[:1]:
        raise ValueError(
            f"boxes_xyxy[{i}] = {tuple(boxes[i].tolist())} does not overlap the image of "
            f"shape (H, W) = {shape_hw}"
        )
    return boxes.astype(np.float32)


def _validate_mask_input(mask_input: Any, mask_hw: tuple[int, int]) -> np.ndarray | None:
    """Return ``(B or 1, 1, 4h, 4w)`` float32 logits or ``None``."""
    if mask_input is None:
        return None
    masks = _as_float_array(mask_input, "mask_input")
    received = masks.shape
    if masks.ndim == 2:
        masks = masks[None, None]
    elif masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[2:] != tuple(mask_hw):
        hint = (
            "; pass one mask per object, e.g. prediction.best().low_res_logits"
            if masks.ndim == 4 and masks.shape[2:] == tuple(mask_hw)
            else ""
        )
        raise ValueError(
            f"mask_input must have shape {tuple(mask_hw)}, (B or 1, *{tuple(mask_hw)}) or "
            f"(B or 1, 1, *{tuple(mask_hw)}); received {received}{hint}"
        )
    return masks.astype(np.float32)
