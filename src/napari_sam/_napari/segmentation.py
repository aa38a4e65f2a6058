"""From prompts and an embedding to masks, per object, with candidate selection (no Qt).

The rules the interactive widget follows:

- One point and nothing else is ambiguous: three candidates (whole, part,
  subpart) with their predicted IoU; the best is shown first and the user
  may cycle. Any other prompt gives one mask per object.
- No box: every point prompts one object. One box: the box and all points
  prompt one object. Several boxes: one object per box, each refined by the
  points inside it (points in no box are unused, and counted).
- ``mask_input`` (the previous low-res logits of the same object) refines
  a single object, as SAM's iterative correction does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from napari_sam.predict import ImageEmbedding, MaskPrediction, predict_masks

from .cache import EmbeddingKey
from .layers import Prompts, ViewPlane


@dataclass(frozen=True, eq=False)
class Segmentation:
    """A prediction for the prompts of one plane, and the candidate chosen per object.

    Attributes
    ----------
    key : EmbeddingKey
        Embedding it was computed from (layer, plane, contrast, model).
    plane : ViewPlane
        The plane its masks belong to.
    prompts : Prompts
        The prompts used (image-plane ``(x, y)``).
    prediction : MaskPrediction
        ``masks`` (B, M, H, W); M = 3 for a single ambiguous prompt.
    selected : tuple of int
        Candidate index per object (length B).
    n_unassigned : int
        Points left unused (several boxes, point in none).
    """

    key: EmbeddingKey
    plane: ViewPlane
    prompts: Prompts
    prediction: MaskPrediction
    selected: tuple[int, ...]
    n_unassigned: int = 0

    @property
    def n_objects(self) -> int:
        """B: number of objects."""
        return int(self.prediction.masks.shape[0])

    @property
    def n_candidates(self) -> int:
        """M: candidates per object (3 or 1)."""
        return int(self.prediction.masks.shape[1])

    @property
    def masks(self) -> list[np.ndarray]:
        """The chosen mask of each object: B arrays of shape (H, W), bool."""
        return [self.prediction.masks[b, m] for b, m in enumerate(self.selected)]

    @property
    def is_empty(self) -> bool:
        """Whether every chosen mask is empty (nothing to show or commit)."""
        return not any(mask.any() for mask in self.masks)

    @property
    def iou_scores(self) -> np.ndarray:
        """ndarray of shape (B, M), float32: predicted IoU of every candidate."""
        return self.prediction.iou_scores

    @property
    def low_res_logits(self) -> np.ndarray:
        """ndarray of shape (B, 4h, 4w), float32: chosen logits, for ``mask_input``."""
        logits = self.prediction.low_res_logits
        return np.stack([logits[b, m] for b, m in enumerate(self.selected)])

    def with_selected(self, index: int) -> Segmentation:
        """The same prediction showing candidate ``index`` (modulo M) of every object."""
        m = self.n_candidates
        return dataclasses.replace(self, selected=tuple([int(index) % m] * self.n_objects))


def _inside_box(points_xy: np.ndarray, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    x, y = points_xy[:, 0], points_xy[:, 1]
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _concat(preds: list[MaskPrediction]) -> MaskPrediction:
    return MaskPrediction(
        masks=np.concatenate([p.masks for p in preds]),
        iou_scores=np.concatenate([p.iou_scores for p in preds]),
        low_res_logits=np.concatenate([p.low_res_logits for p in preds]),
    )


def segment_prompts(
    model,
    embedding: ImageEmbedding,
    prompts: Prompts,
    *,
    key: EmbeddingKey,
    plane: ViewPlane,
    mask_input: np.ndarray | None = None,
    multimask: bool | None = None,
) -> Segmentation:
    """Predict the objects described by ``prompts`` (rules in the module docstring).

    Parameters
    ----------
    model : Sam
    embedding : ImageEmbedding
        Embedding of ``plane``.
    prompts : Prompts
        Non-empty prompts in image-plane coordinates.
    key : EmbeddingKey
        Identity of ``embedding`` (kept in the result).
    plane : ViewPlane
    mask_input : ndarray of shape (4h, 4w), optional
        Previous logits of the single object (ignored for several objects).
    multimask : bool, optional
        Force three candidates (True) or one (False); default: the rule above.

    Returns
    -------
    Segmentation
    """
    if prompts.is_empty:
        raise ValueError("prompts is empty: add a point or a box first")
    points, labels, boxes = prompts.points_xy, prompts.point_labels, prompts.boxes_xyxy
    n_unassigned = 0
    if len(boxes) <= 1:
        if multimask is None:
            multimask = len(boxes) == 0 and len(points) == 1
        has_points = len(points) > 0
        pred = predict_masks(
            model,
            embedding,
            points_xy=points if has_points else None,
            point_labels=labels if has_points else None,
            boxes_xyxy=boxes if len(boxes) else None,
            mask_input=mask_input,
            multimask=multimask,
        )
    else:
        preds, used = [], np.zeros(len(points), dtype=bool)
        for box in boxes:
            inside = _inside_box(points, box)
            used |= inside
            preds.append(
                predict_masks(
                    model,
                    embedding,
                    points_xy=points[inside] if inside.any() else None,
                    point_labels=labels[inside] if inside.any() else None,
                    boxes_xyxy=box,
                    multimask=bool(multimask),
                )
            )
        pred = _concat(preds)
        n_unassigned = int((~used).sum())
    return Segmentation(
        key=key,
        plane=plane,
        prompts=prompts,
        prediction=pred,
        selected=tuple(int(i) for i in pred.best_index),
        n_unassigned=n_unassigned,
    )
