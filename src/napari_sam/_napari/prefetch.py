"""Which plane of a stack to pre-encode next (no Qt, no threads here).

When a person curates a stack or a time series, the next slice they look
at is almost always the neighbour of the one on screen, in the direction
they last moved. :class:`SlicePrefetch` follows the planes shown and names
that neighbour; the session encodes it in the background (see
:mod:`napari_sam._napari.embeddings`) so that moving there shows a
preview at once instead of after a full encoding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from napari.layers import Image

from .layers import ViewPlane


def neighbour_plane(image: Image, plane: ViewPlane, axis: int, step: int) -> ViewPlane | None:
    """The plane ``step`` slices from ``plane`` along data ``axis``; None past either end.

    Parameters
    ----------
    image : napari.layers.Image
        The layer ``plane`` belongs to (for the world position of the neighbour).
    plane : ViewPlane
    axis : int
        A data axis of ``image`` that is not on screen.
    step : int
        Slices to move (negative: backwards).

    Returns
    -------
    ViewPlane or None
        Same displayed axes, ``indices[axis]`` moved by ``step``, and the
        world point of the neighbour's position.

    Raises
    ------
    ValueError
        If ``axis`` is one of the displayed axes or not an axis of the plane.
    """
    if not 0 <= axis < plane.ndim or plane.indices[axis] is None:
        raise ValueError(
            f"axis must be a data axis not on screen, one of "
            f"{[a for a, i in enumerate(plane.indices) if i is not None]}; got {axis}"
        )
    index = plane.indices[axis] + step
    if not 0 <= index < plane.shape[axis]:
        return None
    indices = list(plane.indices)
    indices[axis] = index
    world = np.asarray(plane.world_point, dtype=float)
    offset = len(world) - plane.ndim
    if offset >= 0:
        data_point = np.asarray(image.world_to_data(world[offset:]), dtype=float)
        data_point[axis] = index
        world[offset:] = image.data_to_world(data_point)
    return dataclasses.replace(plane, indices=tuple(indices), world_point=tuple(world.tolist()))


def single_step(old: ViewPlane, new: ViewPlane) -> tuple[int, int] | None:
    """``(axis, +1 or -1)`` if ``new`` is ``old`` moved along exactly one slider axis, else None."""
    if (old.ndim, old.row_axis, old.col_axis) != (new.ndim, new.row_axis, new.col_axis):
        return None
    moved = [
        (axis, 1 if b > a else -1)
        for axis, (a, b) in enumerate(zip(old.indices, new.indices, strict=True))
        if a is not None and b is not None and a != b
    ]
    return moved[0] if len(moved) == 1 else None


class SlicePrefetch:
    """The plane to pre-encode: one slice on from the one shown, the way the user last moved.

    Before any move, "on" is +1 along the slider axis nearest the displayed
    axes (z of a ``(z, y, x)`` stack, z of ``(t, z, y, x)``).

    Attributes
    ----------
    enabled : bool
        Whether the session pre-encodes at all (off by default).
    """

    def __init__(self) -> None:
        self.enabled = False
        self._last: ViewPlane | None = None
        self._step: tuple[int, int] | None = None

    def shown(self, plane: ViewPlane | None) -> None:
        """Note that ``plane`` is now on screen (remembers the direction of a one-axis move)."""
        if plane is None:
            return
        if self._last is not None:
            step = single_step(self._last, plane)
            if step is not None:
                self._step = step
        self._last = plane

    def target(self, image: Image, plane: ViewPlane) -> ViewPlane | None:
        """The plane to pre-encode after ``plane``, or None (off, 2D image, at the end)."""
        free = [axis for axis, index in enumerate(plane.indices) if index is not None]
        if not self.enabled or not free:
            return None
        axis, step = self._step if self._step and self._step[0] in free else (max(free), 1)
        return neighbour_plane(image, plane, axis, step)
