"""Masks to label images: commit rules, next free id, dtype widening (numpy only).

The rules every writer of labels follows:

- ``mode="keep"`` (the default) writes a new object only into background
  pixels (value 0): objects already there are never touched.
- ``mode="overwrite"`` writes the whole mask, replacing what was there.
- A label image whose dtype cannot hold the new id is widened, never
  wrapped around.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

CommitMode = Literal["keep", "overwrite"]
COMMIT_MODES: tuple[str, ...] = ("keep", "overwrite")

_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)
_SIGNED = (np.int8, np.int16, np.int32, np.int64)


def next_free_id(labels: np.ndarray) -> int:
    """Smallest id above every id present (1 for an empty image).

    Parameters
    ----------
    labels : ndarray of int
        Label image of any shape.

    Returns
    -------
    int
        ``labels.max() + 1`` (at least 1).
    """
    if labels.size == 0:
        return 1
    return max(int(labels.max()), 0) + 1


def dtype_for(dtype: np.dtype, max_id: int) -> np.dtype:
    """The narrowest dtype of the same signedness at least as wide as ``dtype`` holding ``max_id``.

    Parameters
    ----------
    dtype : numpy dtype
        Current integer dtype of a label image (bool counts as uint8).
    max_id : int
        Largest id the image must hold.

    Returns
    -------
    numpy dtype
        ``dtype`` itself when it suffices, else a wider integer dtype.
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {dtype}")
    family = _UNSIGNED if np.issubdtype(dtype, np.unsignedinteger) else _SIGNED
    for candidate in family:
        candidate = np.dtype(candidate)
        if candidate.itemsize >= dtype.itemsize and np.iinfo(candidate).max >= max_id:
            return candidate
    raise OverflowError(f"label id {max_id} does not fit in any {family[-1].__name__} dtype")


def mask_pixels(
    labels: np.ndarray, mask: np.ndarray, *, mode: CommitMode = "keep"
) -> tuple[np.ndarray, ...]:
    """Indices of the pixels a commit of ``mask`` may write.

    Parameters
    ----------
    labels : ndarray of int, shape S
        Current label image (or slice of it).
    mask : ndarray of bool, shape S
        The object to write.
    mode : {"keep", "overwrite"}
        ``"keep"`` leaves pixels that already carry a label untouched.

    Returns
    -------
    tuple of ndarray
        ``np.nonzero``-style indices into ``labels``.
    """
    if mode not in COMMIT_MODES:
        raise ValueError(f"mode must be one of {COMMIT_MODES}, got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} does not match labels shape {labels.shape}")
    if mode == "keep":
        mask = mask & (labels == 0)
    return np.nonzero(mask)


def masks_to_labels(
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    shape_hw: tuple[int, int] | None = None,
    min_area: int = 0,
    start_id: int = 1,
    dtype: np.dtype | type = np.uint32,
) -> np.ndarray:
    """Paint a set of (possibly overlapping) masks into one label image.

    Overlap rule: masks are painted largest first, so where two overlap the
    smaller one wins (a nucleus inside a cell stays visible). Ids follow
    the input order: mask ``i`` gets ``start_id + i``, whatever its area,
    so ids stay stable whatever is filtered; a mask whose visible area falls
    below ``min_area`` is dropped and its id is not used.

    Parameters
    ----------
    masks : sequence of ndarray of bool, shape (H, W), or ndarray (N, H, W)
        The objects.
    shape_hw : tuple of int, optional
        Output shape when ``masks`` is empty.
    min_area : int
        Masks with fewer visible pixels than this are left out.
    start_id : int
        Id of the first mask.
    dtype : numpy dtype
        Output dtype (widened if the ids need it).

    Returns
    -------
    ndarray of shape (H, W)
        0 is background.
    """
    masks = [np.asarray(m, dtype=bool) for m in masks]
    return paint_largest_first(
        [m.shape for m in masks],
        [int(m.sum()) for m in masks],
        masks.__getitem__,
        name="masks",
        shape_hw=shape_hw,
        min_area=min_area,
        start_id=start_id,
        dtype=dtype,
    )


def paint_largest_first(
    shapes: Sequence[tuple[int, ...]],
    areas: Sequence[int],
    mask_of: Callable[[int], np.ndarray],
    *,
    name: str,
    shape_hw: tuple[int, ...] | None = None,
    min_area: int = 0,
    start_id: int = 1,
    dtype: np.dtype | type = np.uint32,
) -> np.ndarray:
    """Paint objects into a label image: larger first, smaller on top.

    The overlap rule of :func:`masks_to_labels` for any source of masks:
    ``mask_of(i)`` is asked for one mask at a time (so masks stored
    compactly are decoded one by one), in descending ``areas[i]`` (ties in
    input order), and painted with id ``start_id + i``.

    Parameters
    ----------
    shapes : sequence of tuple of int
        Shape of each object's mask; all must agree.
    areas : sequence of int
        Pixel count of each object.
    mask_of : callable ``(i) -> ndarray of shape shapes[i], bool``
    name : str
        The caller's parameter holding the objects, for error messages.
    shape_hw, min_area, start_id, dtype
        As in :func:`masks_to_labels` (``shape_hw`` is required only when
        there are no objects; objects with fewer visible pixels than
        ``min_area`` are removed after painting).

    Returns
    -------
    ndarray, 0 for background

    Raises
    ------
    ValueError
        With no objects and no ``shape_hw``, or for objects of different shapes.
    """
    if not shapes:
        if shape_hw is None:
            raise ValueError(f"shape_hw is required when {name} is empty")
        return np.zeros(shape_hw, dtype=dtype)
    shape = shapes[0]
    for i, other in enumerate(shapes):
        if other != shape:
            raise ValueError(f"{name}[{i}] has shape {other}, expected {shape}")
    out = np.zeros(shape, dtype=dtype_for(np.dtype(dtype), start_id + len(areas) - 1))
    for i in np.argsort(-np.asarray(areas), kind="stable"):
        out[mask_of(int(i))] = start_id + i
    if min_area > 0:
        ids, counts = np.unique(out[out > 0], return_counts=True)
        small = ids[counts < min_area]
        if small.size:
            out[np.isin(out, small)] = 0
    return out
