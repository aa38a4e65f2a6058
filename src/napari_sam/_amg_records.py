"""Automatic-segmentation results: :class:`MaskRecord`, label images, SA-1B JSON.

The JSON written by :func:`write_coco_rle_json` is one SA-1B image file::

    {"image": {"image_id": 0, "width": W, "height": H, "file_name": "..."},
     "annotations": [{"id": 1, "segmentation": {"size": [H, W], "counts": "..."},
                      "bbox": [x, y, w, h], "area": 123, "predicted_iou": 0.93,
                      "stability_score": 0.97, "point_coords": [[x, y]],
                      "crop_box": [x, y, w, h]}, ...]}

``segmentation`` is COCO compressed RLE, so ``pycocotools.mask.decode``
reads it directly (pycocotools is not needed to write or read it here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._rle import RunLengthMask
from .labels import paint_largest_first


@dataclass(frozen=True, eq=False)
class MaskRecord:
    """One automatically found object (an SA-1B annotation).

    Attributes
    ----------
    rle : RunLengthMask
        The mask, COCO uncompressed RLE at image resolution.
    bbox_xywh : tuple of int
        ``(x0, y0, x1 - x0, y1 - y0)`` with ``x1``/``y1`` the last column/row
        of the mask (so a one-pixel mask has width 0, as in the reference).
    area : int
        Foreground pixels.
    predicted_iou : float
        The model's own estimate of the mask's quality.
    stability_score : float
        IoU of the mask thresholded at ``+-stability_score_offset`` (NaN when
        even the low threshold gives an empty mask).
    point_xy : tuple of float
        The prompt point, image pixels.
    crop_box_xywh : tuple of int
        The crop the mask was found in.
    """

    rle: RunLengthMask
    bbox_xywh: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point_xy: tuple[float, float]
    crop_box_xywh: tuple[int, int, int, int]

    @property
    def segmentation(self) -> np.ndarray:
        """The mask, ``ndarray (H, W)`` of bool (decoded on each access)."""
        return self.rle.decode()

    @property
    def shape_hw(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return self.rle.shape_hw


def records_to_labels(
    records: Sequence[MaskRecord],
    *,
    shape_hw: tuple[int, int] | None = None,
    min_area: int = 0,
    start_id: int = 1,
    dtype: np.dtype | type = np.uint32,
) -> np.ndarray:
    """Paint records into one label image, decoding one mask at a time.

    Same rule as :func:`napari_sam.labels.masks_to_labels`: largest first,
    so a smaller object lying on a larger one stays visible; record ``i``
    gets id ``start_id + i``; an object left with fewer than ``min_area``
    visible pixels is removed (its id stays unused).

    Parameters
    ----------
    records : sequence of MaskRecord
        All of the same image.
    shape_hw : tuple of int, optional
        Required when ``records`` is empty.
    min_area : int
        Minimum visible pixels per object.
    start_id : int
        Id of the first record.
    dtype : numpy dtype
        Output dtype (widened if the ids need it).

    Returns
    -------
    ndarray of shape (H, W)
        0 is background.
    """
    return paint_largest_first(
        [r.shape_hw for r in records],
        [r.area for r in records],
        lambda i: records[i].segmentation,
        name="records",
        shape_hw=shape_hw,
        min_area=min_area,
        start_id=start_id,
        dtype=dtype,
    )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def records_to_coco_rle_json(
    records: Sequence[MaskRecord],
    *,
    shape_hw: tuple[int, int] | None = None,
    image_id: int = 0,
    file_name: str = "",
) -> dict[str, Any]:
    """The records as one SA-1B image dictionary (JSON-serialisable).

    Parameters
    ----------
    records : sequence of MaskRecord
    shape_hw : tuple of int, optional
        Image shape; required when ``records`` is empty.
    image_id : int
        Written to ``image.image_id``.
    file_name : str
        Written to ``image.file_name``.

    Returns
    -------
    dict
        ``{"image": {...}, "annotations": [...]}``; annotation ids start at 1;
        a NaN stability score is written as ``null``.
    """
    if shape_hw is None:
        if not records:
            raise ValueError("shape_hw is required when records is empty")
        shape_hw = records[0].shape_hw
    height, width = shape_hw
    annotations = [
        {
            "id": i + 1,
            "segmentation": r.rle.to_coco_string(),
            "bbox": list(r.bbox_xywh),
            "area": r.area,
            "predicted_iou": _json_float(r.predicted_iou),
            "stability_score": _json_float(r.stability_score),
            "point_coords": [list(r.point_xy)],
            "crop_box": list(r.crop_box_xywh),
        }
        for i, r in enumerate(records)
    ]
    image = {"image_id": image_id, "width": width, "height": height, "file_name": file_name}
    return {"image": image, "annotations": annotations}


def write_coco_rle_json(records: Sequence[MaskRecord], path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`records_to_coco_rle_json` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(records_to_coco_rle_json(records, **kwargs), allow_nan=False))
    return path


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


def read_coco_rle_json(source: str | Path | dict[str, Any]) -> list[MaskRecord]:
    """Records from an SA-1B image JSON (a path, or the parsed dictionary).

    Parameters
    ----------
    source : path or dict
        As written by :func:`write_coco_rle_json` (or an SA-1B file).

    Returns
    -------
    list of MaskRecord
    """
    data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    records = []
    for ann in data["annotations"]:
        rle = RunLengthMask.from_coco(ann["segmentation"])
        point = ann.get("point_coords") or [[math.nan, math.nan]]
        records.append(
            MaskRecord(
                rle=rle,
                bbox_xywh=tuple(round(v) for v in ann["bbox"]),
                area=int(ann.get("area", rle.area)),
                predicted_iou=_nan_if_none(ann.get("predicted_iou")),
                stability_score=_nan_if_none(ann.get("stability_score")),
                point_xy=(float(point[0][0]), float(point[0][1])),
                crop_box_xywh=tuple(int(v) for v in ann.get("crop_box", (0, 0, 0, 0))),
            )
        )
    return records
