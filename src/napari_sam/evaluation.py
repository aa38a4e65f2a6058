"""Interactive-segmentation metrics: one click, a box, and corrective clicks.

For every labelled object of held-out images:

- **one click**: a positive point at the object's centre (the pixel farthest
  from its boundary); multimask output, the mask with the highest predicted
  IoU is kept;
- **box**: the tight bounding box; single-mask output;
- **corrective clicks**: starting from the one-click result, a click at the
  centre of the error region (positive where the object was missed, negative
  where the mask spills over), with the previous low-res logits as the mask
  prompt; single-mask output, ``corrective_clicks`` rounds.

IoUs are measured in the model-input frame (the image resized so its longest
side is ``img_size``): for images of that size, the original pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage as ndi
from torch.nn import functional as F

from ._interactive import MIN_OBJECT_PIXELS, Prompts, decode, prepare_pairs, tight_boxes

SMALL_OBJECT_PIXELS = 400  # about a 22-pixel disc at 256 px


@dataclass(frozen=True)
class Metrics:
    """Mean IoUs over a set of objects (NaN when the set is empty).

    Attributes
    ----------
    n_objects : int
    one_click_iou : float
    box_iou : float
    corrective_iou : tuple of float
        Mean IoU after 1, 2, ... corrective clicks (following the first click).
    """

    n_objects: int
    one_click_iou: float
    box_iou: float
    corrective_iou: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Per-object IoUs of an interactive evaluation.

    Attributes
    ----------
    areas : ndarray of shape (n,), int64
        Object areas in model-input pixels.
    one_click : ndarray of shape (n,), float64
    box : ndarray of shape (n,), float64
    clicks : ndarray of shape (n, c), float64
        IoU after each of ``c`` corrective clicks.
    """

    areas: np.ndarray
    one_click: np.ndarray
    box: np.ndarray
    clicks: np.ndarray

    def summary(self, *, min_area: int = 0, max_area: float = math.inf) -> Metrics:
        """Mean IoUs of the objects with ``min_area <= area < max_area``."""
        keep = (self.areas >= min_area) & (self.areas < max_area)

        def mean(values: np.ndarray) -> float:
            return float(values[keep].mean()) if keep.any() else math.nan

        corrective = tuple(mean(self.clicks[:, i]) for i in range(self.clicks.shape[1]))
        return Metrics(int(keep.sum()), mean(self.one_click), mean(self.box), corrective)

    @property
    def overall(self) -> Metrics:
        """Metrics of all objects."""
        return self.summary()

    @property
    def small(self) -> Metrics:
        """Metrics of objects under :data:`SMALL_OBJECT_PIXELS` pixels."""
        return self.summary(max_area=SMALL_OBJECT_PIXELS)

    @property
    def large(self) -> Metrics:
        """Metrics of objects of at least :data:`SMALL_OBJECT_PIXELS` pixels."""
        return self.summary(min_area=SMALL_OBJECT_PIXELS)


def inner_points(masks: np.ndarray) -> np.ndarray:
    """``(x, y)`` of the pixel farthest from the boundary of each mask.

    Parameters
    ----------
    masks : ndarray of shape (K, H, W), bool
        The image border counts as boundary. An empty mask gives ``(-1, -1)``.

    Returns
    -------
    ndarray of shape (K, 2), int64
    """
    out = np.full((len(masks), 2), -1, dtype=np.int64)
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        y0, x0 = ys.min(), xs.min()
        crop = np.pad(mask[y0 : ys.max() + 1, x0 : xs.max() + 1], 1)
        dist = ndi.distance_transform_edt(crop)
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out[i] = (x - 1 + x0, y - 1 + y0)
    return out


def _iou(pred: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    inter = (pred & gt).flatten(1).sum(1).double()
    union = (pred | gt).flatten(1).sum(1).double()
    return (inter / union.clamp(min=1)).cpu().numpy()


def _full_res(logits: torch.Tensor, size: int, hw: tuple[int, int]) -> torch.Tensor:
    """Binary masks ``K x h x w`` of low-res logits ``K x 1 x L x L``."""
    up = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
    return up[:, 0, : hw[0], : hw[1]] > 0


def _evaluate_image(
    model: torch.nn.Module, emb: torch.Tensor, gt: torch.Tensor, hw: tuple[int, int], clicks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-click, box and corrective-click IoUs for the objects ``gt`` (``K x S x S``)."""
    size = gt.shape[-1]
    gt_hw = gt[:, : hw[0], : hw[1]]
    k = gt.shape[0]
    centre = torch.as_tensor(inner_points(gt_hw.cpu().numpy()), device=gt.device).float()
    prompts = Prompts(centre[:, None], gt.new_ones(k, 1, dtype=torch.long), None)
    logits, iou_pred = decode(model, emb, prompts, multimask=True)
    best = iou_pred.argmax(1)
    chosen = logits[torch.arange(k), best][:, None]
    one = _iou(_full_res(chosen, size, hw), gt_hw)

    box_logits, _ = decode(model, emb, Prompts(None, None, tight_boxes(gt)), multimask=False)
    box = _iou(_full_res(box_logits, size, hw), gt_hw)

    after = []
    for _ in range(clicks):
        pred = _full_res(chosen, size, hw)
        err = (pred ^ gt_hw).cpu().numpy()
        pts = inner_points(err)
        has = pts[:, 0] >= 0
        xy = torch.as_tensor(np.where(has[:, None], pts, 0), device=gt.device)
        lab = gt_hw[torch.arange(k), xy[:, 1], xy[:, 0]].long()
        lab = torch.where(torch.as_tensor(has, device=gt.device), lab, -1)
        prompts = prompts.add_points((xy[:, None].float(), lab[:, None])).with_mask(chosen)
        chosen, _ = decode(model, emb, prompts, multimask=False)
        after.append(_iou(_full_res(chosen, size, hw), gt_hw))
    return one, box, np.stack(after, 1) if after else np.zeros((k, 0))


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    corrective_clicks: int = 3,
    max_objects: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Measure interactive segmentation quality on labelled images.

    Parameters
    ----------
    model : Sam
    images : sequence of ndarray of shape (H, W) or (H, W, 3)
    labels : sequence of ndarray of shape (H, W), integer
        Instance labels; objects under 4 pixels (after resizing) are skipped.
    corrective_clicks : int
        Rounds of corrective clicks after the first click.
    max_objects : int, optional
        Evaluate at most this many objects per image, evenly spaced in id
        order (ids follow placement order, so this spans all sizes).
    progress : callable ``(done, total)``, optional
        Called after every image.

    Returns
    -------
    Evaluation
    """
    if corrective_clicks < 0:
        raise ValueError(f"corrective_clicks must be >= 0, got {corrective_clicks!r}")
    was_training = model.training
    model.eval()
    data = prepare_pairs(images, labels, img_size=model.img_size, device=model.device)
    parts: list[tuple[np.ndarray, ...]] = []
    for i in range(len(data)):
        lab = data.labels[i]
        ids, areas = torch.unique(lab, return_counts=True)
        keep = (ids != 0) & (areas >= MIN_OBJECT_PIXELS)
        ids, areas = ids[keep], areas[keep]
        if max_objects is not None and len(ids) > max_objects:
            pick = torch.linspace(0, len(ids) - 1, max_objects).round().long().to(ids.device)
            ids, areas = ids[pick], areas[pick]
        if len(ids):
            images_b, _ = data.batch([i], model, augment=False, gen=torch.Generator())
            emb = model.image_encoder(images_b)
            gt = lab[None] == ids[:, None, None]
            hw = tuple(data.images[i].shape[:2])
            parts.append(
                (areas.cpu().numpy(), *_evaluate_image(model, emb, gt, hw, corrective_clicks))
            )
        if progress is not None:
            progress(i + 1, len(data))
    model.train(was_training)
    if not parts:
        empty = np.zeros(0)
        return Evaluation(empty.astype(np.int64), empty, empty, np.zeros((0, corrective_clicks)))
    return Evaluation(*(np.concatenate(col) for col in zip(*parts, strict=True)))
