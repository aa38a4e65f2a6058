"""Columnar store of candidate masks during automatic generation, and its clean-up.

Kept apart from :mod:`napari_sam.automatic` so that module reads as the
pipeline; everything here is model-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import _amg_ops as ops
from ._rle import RunLengthMask


@dataclass(frozen=True, eq=False)
class Candidates:
    """N candidate masks, one entry per mask in every field.

    Attributes
    ----------
    rles : list of RunLengthMask
        Masks at full image resolution.
    boxes_xyxy : Tensor of shape (N, 4), int64
        Inclusive boxes (crop frame until :meth:`shifted`).
    iou : Tensor of shape (N,), float32
        Predicted IoU.
    stability : Tensor of shape (N,), float32
        Stability score.
    points_xy : ndarray of shape (N, 2), float64
        Prompt points (crop frame until :meth:`shifted`).
    crop_index : ndarray of shape (N,), int64
        Index of the crop each mask came from.
    """

    rles: list[RunLengthMask]
    boxes_xyxy: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points_xy: np.ndarray
    crop_index: np.ndarray

    def __len__(self) -> int:
        return len(self.rles)

    @classmethod
    def empty(cls) -> Candidates:
        """No candidates."""
        return cls(
            [],
            torch.zeros((0, 4), dtype=torch.int64),
            torch.zeros(0),
            torch.zeros(0),
            np.zeros((0, 2)),
            np.zeros(0, dtype=np.int64),
        )

    @classmethod
    def concatenate(cls, parts: Sequence[Candidates]) -> Candidates:
        """All candidates of ``parts``, in order."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            [r for p in parts for r in p.rles],
            torch.cat([p.boxes_xyxy for p in parts]),
            torch.cat([p.iou for p in parts]),
            torch.cat([p.stability for p in parts]),
            np.concatenate([p.points_xy for p in parts]),
            np.concatenate([p.crop_index for p in parts]),
        )

    def take(self, index: torch.Tensor) -> Candidates:
        """The candidates at ``index`` (Tensor (K,) of int64), in that order."""
        idx = index.cpu().numpy()
        return Candidates(
            [self.rles[i] for i in idx],
            self.boxes_xyxy[index],
            self.iou[index],
            self.stability[index],
            self.points_xy[idx],
            self.crop_index[idx],
        )

    def shifted(self, dx: int, dy: int) -> Candidates:
        """Boxes and points moved by ``(dx, dy)`` (crop frame -> image frame)."""
        offset = torch.tensor([dx, dy, dx, dy], dtype=torch.int64)
        return Candidates(
            self.rles,
            self.boxes_xyxy + offset,
            self.iou,
            self.stability,
            self.points_xy + np.array([dx, dy], dtype=np.float64),
            self.crop_index,
        )

    def with_crop(self, crop_index: int) -> Candidates:
        """The same candidates, all labelled as coming from crop ``crop_index``."""
        return Candidates(
            self.rles,
            self.boxes_xyxy,
            self.iou,
            self.stability,
            self.points_xy,
            np.full(len(self), crop_index, dtype=np.int64),
        )


def clean_small_regions(
    found: Candidates,
    min_area: int,
    nms_thresh: float,
    check: Callable[[], None] | None = None,
) -> Candidates:
    """Fill small holes, drop small islands, then NMS preferring untouched masks.

    Each mask first gets its background regions smaller than ``min_area``
    filled, then its foreground regions smaller than ``min_area`` removed
    (see :func:`napari_sam._amg_ops.remove_small_regions`). Boxes are
    recomputed and box NMS at ``nms_thresh`` runs with score 1 for masks
    left unchanged and 0 for changed ones (ties keep the current order).
    Scores other than boxes, masks and areas are kept.

    Parameters
    ----------
    found : Candidates
        Masks in image coordinates.
    min_area : int
        Region size threshold in pixels.
    nms_thresh : float
        Box IoU threshold.
    check : callable, optional
        Called before each mask (raises to cancel).

    Returns
    -------
    Candidates
        The kept masks, NMS order.
    """
    if len(found) == 0:
        return found
    rles, boxes, unchanged = [], [], []
    for rle, box in zip(found.rles, found.boxes_xyxy, strict=True):
        if check is not None:
            check()
        mask = rle.decode()
        mask, filled = ops.remove_small_regions(mask, min_area, mode="holes")
        mask, removed = ops.remove_small_regions(mask, min_area, mode="islands")
        if filled or removed:
            rle = RunLengthMask.from_mask(mask)
            box = ops.mask_boxes_xyxy(torch.from_numpy(mask)[None])[0]
        rles.append(rle)
        boxes.append(box)
        unchanged.append(not (filled or removed))
    boxes_xyxy = torch.stack(boxes)
    scores = torch.tensor(unchanged, dtype=torch.float32)
    keep = ops.box_nms(boxes_xyxy, scores, nms_thresh)
    cleaned = Candidates(
        rles, boxes_xyxy, found.iou, found.stability, found.points_xy, found.crop_index
    )
    return cleaned.take(keep)
