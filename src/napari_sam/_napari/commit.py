"""Write masks into napari Labels layers: the preview and the one-undo-step commit (no Qt).

A commit follows :mod:`napari_sam.labels`: ``keep`` mode (default) only
fills background, ``overwrite`` replaces; the dtype is widened, never
wrapped; the whole commit is ONE undo step (``data_setitem`` inside
``block_history``), so napari's own undo restores what was there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from napari.layers import Labels

from napari_sam.labels import COMMIT_MODES, dtype_for, masks_to_labels, next_free_id

from .layers import ViewPlane

IdPolicy = Literal["next_free", "selected"]
ID_POLICIES: tuple[str, ...] = ("next_free", "selected")


@dataclass(frozen=True)
class CommitResult:
    """What a commit wrote.

    Attributes
    ----------
    label_ids : tuple of int
        Id given to each object, in prompt order (boxes first to last).
    n_pixels : tuple of int
        Pixels actually written per object (keep mode skips labelled pixels).
    layer : napari.layers.Labels
        The layer written to.
    plane : ViewPlane
        The plane written.
    """

    label_ids: tuple[int, ...]
    n_pixels: tuple[int, ...]
    layer: Labels
    plane: ViewPlane


def check_labels_shape(labels: Labels, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``labels`` has spatial shape ``shape``."""
    got = tuple(int(s) for s in np.shape(labels.data))
    if labels.multiscale or got != tuple(shape):
        raise ValueError(
            f"labels layer {labels.name!r} has shape {got}, the image has shape {tuple(shape)}: "
            "choose a labels layer of the image's shape (or none, to create one)"
        )


def _plane_values(labels: Labels, plane: ViewPlane) -> np.ndarray:
    """Current labels of ``plane``, rows and columns as on screen."""
    values = np.asarray(labels.data[plane.data_index()])
    return values.T if plane.row_axis > plane.col_axis else values


def commit_masks(
    labels: Labels,
    plane: ViewPlane,
    masks: Sequence[np.ndarray],
    *,
    mode: str = "keep",
    id_policy: str = "next_free",
) -> CommitResult:
    """Write ``masks`` (one per object) into ``plane`` of ``labels`` as one undo step.

    Parameters
    ----------
    labels : napari.layers.Labels
        Target layer with the image's spatial shape.
    plane : ViewPlane
        The plane the masks belong to.
    masks : sequence of ndarray of shape (H, W), bool
        One mask per object, rows/columns as on screen.
    mode : {"keep", "overwrite"}
        ``keep`` writes only background pixels.
    id_policy : {"next_free", "selected"}
        New ids from :func:`napari_sam.labels.next_free_id` (one per object,
        overlaps: smaller objects on top), or every object gets
        ``labels.selected_label``.

    Returns
    -------
    CommitResult
    """
    if mode not in COMMIT_MODES:
        raise ValueError(f"mode must be one of {COMMIT_MODES}; received {mode!r}")
    if id_policy not in ID_POLICIES:
        raise ValueError(f"id_policy must be one of {ID_POLICIES}; received {id_policy!r}")
    check_labels_shape(labels, plane.shape)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    for i, m in enumerate(masks):
        if m.shape != plane.shape_hw:
            raise ValueError(f"masks[{i}] has shape {m.shape}; expected {plane.shape_hw}")
    if id_policy == "selected":
        start = int(labels.selected_label)
        ids = [start] * len(masks)
        painted = np.where(np.any(masks, axis=0), start, 0) if masks else None
    else:
        start = next_free_id(np.asarray(labels.data))
        ids = [start + i for i in range(len(masks))]
        painted = masks_to_labels(masks, start_id=start, dtype=np.int64) if masks else None
    if painted is None or not ids:
        return CommitResult((), (), labels, plane)
    if mode == "keep":
        painted = np.where(_plane_values(labels, plane) == 0, painted, 0)
    wide = dtype_for(labels.data.dtype, max(ids))
    if wide != labels.data.dtype:
        labels.data = labels.data.astype(wide)
    counts = []
    with labels.block_history():
        for label_id in dict.fromkeys(ids):
            rows, cols = np.nonzero(painted == label_id)
            counts.append(len(rows))
            if len(rows):
                labels.data_setitem(plane.full_indices(rows, cols), label_id)
    per_object = dict(zip(dict.fromkeys(ids), counts, strict=True))
    if id_policy == "next_free":
        labels.selected_label = max(ids) + 1
    return CommitResult(tuple(ids), tuple(per_object[i] for i in ids), labels, plane)


def write_preview(
    preview: Labels, plane: ViewPlane, masks: Sequence[np.ndarray], previous: ViewPlane | None
) -> None:
    """Show ``masks`` (ids 1..B) on ``plane`` of ``preview``; clear ``previous`` first.

    The preview layer is ours: it is written in place, without undo history.
    """
    data = preview.data
    if previous is not None and previous.key != plane.key:
        data[previous.data_index()] = 0
    values = masks_to_labels(masks, shape_hw=plane.shape_hw, dtype=np.int64)
    wide = dtype_for(data.dtype, int(values.max(initial=0)))
    if wide != data.dtype:
        data = data.astype(wide)
    data[plane.data_index()] = values.T if plane.row_axis > plane.col_axis else values
    if data is preview.data:
        preview.refresh()
    else:
        preview.data = data


def clear_preview(preview: Labels, plane: ViewPlane | None) -> None:
    """Erase what :func:`write_preview` drew on ``plane``."""
    if plane is None:
        return
    preview.data[plane.data_index()] = 0
    preview.refresh()
