"""Pure helpers of automatic mask generation: grids, crops, scores, boxes, NMS.

Everything here is plain numpy / torch (no model, no torchvision, no OpenCV)
and reproduces the arithmetic of Segment Anything's automatic mask generator
exactly, so that our masks, scores and order match the reference:

- point grids are cell centres of a regular grid in ``[0, 1]``, x fastest;
- crop layer ``i >= 1`` tiles the image with ``2**i x 2**i`` overlapping crops;
- the stability score is ``count(logits > t + offset) / count(logits > t - offset)``;
- boxes are ``(x0, y0, x1, y1)`` with *inclusive* pixel indices (a one-pixel
  mask has a zero-area box), as in the reference;
- NMS is greedy in float32, by descending score, ties broken by index, and a
  box is dropped when its IoU with a kept box is strictly above the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ._rle import count_per_mask

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class CropBox:
    """One region of the image on which the model is run.

    Attributes
    ----------
    box_xyxy : tuple of int
        ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive, in image pixels.
    layer : int
        Crop layer: 0 is the whole image, layer ``i`` has ``(2**i)**2`` crops.
    """

    box_xyxy: tuple[int, int, int, int]
    layer: int

    @property
    def box_xywh(self) -> tuple[int, int, int, int]:
        """``(x0, y0, width, height)``."""
        x0, y0, x1, y1 = self.box_xyxy
        return (x0, y0, x1 - x0, y1 - y0)

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the crop."""
        x0, y0, x1, y1 = self.box_xyxy
        return (y1 - y0, x1 - x0)

    @property
    def area(self) -> int:
        """Pixels in the crop."""
        height, width = self.shape_hw
        return height * width


def point_grid(n_per_side: int) -> np.ndarray:
    """Centres of an ``n x n`` grid of cells covering the unit square.

    Parameters
    ----------
    n_per_side : int
        Points along each side (>= 1).

    Returns
    -------
    ndarray of shape (n_per_side**2, 2), float64
        ``(x, y)`` in ``[0, 1]``; x varies fastest (row by row).
    """
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    half_cell = 1.0 / (2 * n_per_side)
    centres = np.linspace(half_cell, 1.0 - half_cell, n_per_side)
    grid_x, grid_y = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)


def layer_points_per_side(n_per_side: int, n_layers: int, downscale: int) -> list[int]:
    """Grid size of each crop layer: ``int(n_per_side / downscale**layer)``.

    Parameters
    ----------
    n_per_side : int
        Points per side on layer 0.
    n_layers : int
        Number of crop layers after the whole image.
    downscale : int
        Factor by which each layer's grid is thinned.

    Returns
    -------
    list of int
        ``n_layers + 1`` grid sizes.
    """
    return [int(n_per_side / (downscale**layer)) for layer in range(n_layers + 1)]


def _crop_length(image_length: int, n_crops: int, overlap: int) -> int:
    """Side of each of ``n_crops`` crops overlapping by ``overlap`` pixels."""
    return math.ceil((overlap * (n_crops - 1) + image_length) / n_crops)


def crop_boxes(shape_hw: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[CropBox]:
    """The whole image, then ``(2**i)**2`` overlapping crops for each layer ``i``.

    Parameters
    ----------
    shape_hw : tuple of int
        ``(height, width)`` of the image.
    n_layers : int
        Crop layers after the whole image (0: the whole image only).
    overlap_ratio : float
        Overlap of neighbouring crops in layer 1 as a fraction of the image's
        short side; layer ``i`` uses ``overlap_ratio * 2 / 2**i``.

    Returns
    -------
    list of CropBox
        Layer by layer; within a layer by crop column, then crop row.
    """
    height, width = shape_hw
    short_side = min(height, width)
    boxes = [CropBox((0, 0, width, height), 0)]
    for layer in range(1, n_layers + 1):
        n_crops = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_crops))
        crop_w = _crop_length(width, n_crops, overlap)
        crop_h = _crop_length(height, n_crops, overlap)
        starts_x = [int((crop_w - overlap) * i) for i in range(n_crops)]
        starts_y = [int((crop_h - overlap) * i) for i in range(n_crops)]
        for x0 in starts_x:
            for y0 in starts_y:
                box = (x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height))
                boxes.append(CropBox(box, layer))
    return boxes


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold +- offset``.

    The high-threshold mask lies inside the low-threshold one, so the IoU is
    a ratio of pixel counts. An empty low-threshold mask gives NaN (0 / 0),
    as in the reference.

    Parameters
    ----------
    logits : Tensor of shape (B, H, W), float
        Mask logits at image resolution.
    mask_threshold : float
        Binarisation threshold of the model (0 for SAM).
    offset : float
        Half-width of the threshold band.

    Returns
    -------
    Tensor of shape (B,), float32
    """
    inner = _count_above(logits, mask_threshold + offset)
    outer = _count_above(logits, mask_threshold - offset)
    return inner.to(torch.float32) / outer.to(torch.float32)


def _count_above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels above ``threshold`` per mask, ``Tensor (B,)`` of int32."""
    return count_per_mask(logits > threshold)


def mask_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes around masks, inclusive pixel indices; zeros for an empty mask.

    Parameters
    ----------
    masks : Tensor of shape (B, H, W), bool

    Returns
    -------
    Tensor of shape (B, 4), int64
        ``(x0, y0, x1, y1)`` with ``x1``/``y1`` the last column/row of the mask.
    """
    n_masks, height, width = masks.shape
    if n_masks == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    rows = masks.any(dim=2)  # B x H
    cols = masks.any(dim=1)  # B x W
    y0 = rows.to(torch.uint8).argmax(dim=1)
    y1 = height - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x0 = cols.to(torch.uint8).argmax(dim=1)
    x1 = width - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)
    return boxes * rows.any(dim=1, keepdim=True)


def near_crop_edge(
    boxes_xyxy: torch.Tensor,
    crop_box_xyxy: tuple[int, int, int, int],
    image_hw: tuple[int, int],
    *,
    tolerance: float = 20.0,
) -> torch.Tensor:
    """Boxes touching a crop border that is not also an image border.

    Parameters
    ----------
    boxes_xyxy : Tensor of shape (B, 4)
        Boxes in the crop's frame (inclusive indices, as from :func:`mask_boxes_xyxy`).
    crop_box_xyxy : tuple of int
        The crop in image pixels.
    image_hw : tuple of int
        ``(height, width)`` of the whole image.
    tolerance : float
        A side within this many pixels of a border touches it.

    Returns
    -------
    Tensor of shape (B,), bool
    """
    x0, y0, _, _ = crop_box_xyxy
    offset = torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
    crop = torch.tensor(crop_box_xyxy, dtype=torch.float32)
    image = torch.tensor([0, 0, image_hw[1], image_hw[0]], dtype=torch.float32)
    boxes = boxes_xyxy.to(torch.float32) + offset
    at_crop = (boxes - crop).abs() <= tolerance
    at_image = (boxes - image).abs() <= tolerance
    return (at_crop & ~at_image).any(dim=1)


def _iou_with(
    boxes: np.ndarray, areas: np.ndarray, box: np.ndarray, area: np.float32
) -> np.ndarray:
    """float32 IoU of one box with many, in torchvision's order of operations."""
    inter_w = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0)
    inter_h = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0)
    inter = inter_w * inter_h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area + areas - inter)


def box_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (same results as ``torchvision.ops.nms``).

    Boxes are visited by descending score (ties: lower index first); a box is
    kept unless its IoU with an already kept box is above ``iou_threshold``.
    IoUs are computed in float32; a NaN IoU (two empty boxes) suppresses nothing.

    Parameters
    ----------
    boxes_xyxy : Tensor of shape (N, 4)
        Boxes ``(x0, y0, x1, y1)``.
    scores : Tensor of shape (N,)
        Higher is better.
    iou_threshold : float
        Suppression threshold.

    Returns
    -------
    Tensor of shape (K,), int64
        Indices of the kept boxes, by descending score.
    """
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    boxes = boxes_xyxy.detach().cpu().to(torch.float32)[order].numpy()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(boxes), dtype=bool)
    threshold = np.float64(iou_threshold)  # float32 IoU vs double threshold, as torchvision
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        iou = _iou_with(boxes[i + 1 :], areas[i + 1 :], boxes[i], areas[i])
        alive[i + 1 :] &= ~(iou > threshold)
    return order[torch.from_numpy(np.flatnonzero(alive))]


def remove_small_regions(mask: np.ndarray, min_area: int, *, mode: str) -> tuple[np.ndarray, bool]:
    """Fill small holes or drop small islands of a mask.

    Regions are 8-connected in both modes (background regions too), as with
    OpenCV's ``connectedComponentsWithStats(..., 8)`` in the reference.

    - ``mode="holes"``: every background region with fewer than ``min_area``
      pixels becomes foreground (also one touching the image border).
    - ``mode="islands"``: foreground regions with fewer than ``min_area``
      pixels are removed; if all are that small, the largest one is kept
      (the first in raster order among equals).

    Parameters
    ----------
    mask : ndarray of shape (H, W), bool
    min_area : int
        Regions strictly smaller than this are changed.
    mode : {"holes", "islands"}

    Returns
    -------
    mask : ndarray of shape (H, W), bool
        The cleaned mask (the input itself when nothing changed).
    changed : bool
        Whether any region was small enough to be changed.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    working = ~mask if mode == "holes" else mask
    regions, n_regions = ndimage.label(working, structure=_EIGHT_CONNECTED)
    if n_regions == 0:
        return mask, False
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)[1:]
    small = sizes < min_area
    if not small.any():
        return mask, False
    if mode == "holes":
        fill = np.concatenate([[False], small])  # region 0 is the mask itself
        return mask | fill[regions], True
    keep = ~small
    if not keep.any():
        keep[int(np.argmax(sizes))] = True
    return np.concatenate([[False], keep])[regions], True
