"""Automatic whole-image segmentation ("segment everything").

:func:`generate_masks` prompts the model with a regular grid of points (on
the whole image and, optionally, on overlapping crops), keeps the confident
and stable masks, removes duplicates by box NMS and returns one
:class:`MaskRecord` per object. Defaults, filters and output order are those
of Segment Anything's ``SamAutomaticMaskGenerator``, so results are
comparable with what users know from it:

1. per crop, per batch of points: three candidate masks per point; keep
   those with predicted IoU ``> pred_iou_thresh`` (skipped when 0) -- decided
   by the decoder's IoU head alone, so a point none of whose masks pass never
   runs the decoder's upscaling stack, and the others' low-resolution logits
   are upsampled only for the masks that pass (this changes nothing but the
   work done); keep stability score ``>= stability_score_thresh``
   (skipped when 0); drop masks touching an inner crop border;
2. per crop: box NMS at ``box_nms_thresh`` by predicted IoU;
3. across crops: box NMS at ``crop_nms_thresh``, preferring smaller crops;
4. optionally fill holes and drop islands smaller than
   ``min_mask_region_area``, then NMS again preferring unchanged masks.

Masks are kept run-length encoded from the moment they are thresholded, so
memory holds at most one chunk of full-resolution logits at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import _amg_ops as ops
from ._amg_candidates import Candidates, clean_small_regions
from ._amg_records import (
    MaskRecord,
    read_coco_rle_json,
    records_to_coco_rle_json,
    records_to_labels,
    write_coco_rle_json,
)
from ._amg_settings import (
    PRESETS,
    AutomaticSettings,
    CancelCallback,
    Cancelled,
    ProgressCallback,
    Steps,
)
from ._rle import RunLengthMask, encode_masks
from .precision import check_precision
from .predict import ImageEmbedding, decode_low_res, encode_image, upscale_logits

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .models.sam import Sam

__all__ = [
    "PRESETS",
    "AutomaticSettings",
    "Cancelled",
    "MaskRecord",
    "RunLengthMask",
    "generate_masks",
    "generate_with_settings",
    "read_coco_rle_json",
    "records_to_coco_rle_json",
    "records_to_labels",
    "write_coco_rle_json",
]


# Upsample at most this many full-resolution logits at once (32 MiB of float32).
_CHUNK_ELEMENTS = 1 << 23
# On CPU the mask decoder is both faster and far lighter with few prompts per
# call (its working set stays in cache): at most this many low-res logit
# pixels per call, i.e. 8 prompts for 1024 px models (256 x 256 logits).
# Measured on ViT-B, 2 cores: 64 prompts in 4 calls of 16 took 0.82x the time
# of one call of 64, and ~0 instead of 1.3-2.2 GiB of transient memory. With
# the factored decoder (models/_shared_image.py) fewer still pay: IoU pass per
# prompt, 2 threads, a training run beside it: fp32 16.2 ms at 8 per call,
# 17.9 at 16, 20.7 at 32. bf16 since its attention through the formed tokens
# (Xeon with AMX, quiet): 6.1 to 6.4 ms at 4, 5.3 at 8, 5.0 to 5.5 at 16, 6.5
# at 32 (it took 4 before: 10.9 ms at 4, 11.3 at 8, 13.1 at 16).
_CPU_DECODE_PIXELS = 1 << 19


def generate_masks(
    model: Sam,
    image_or_embedding: np.ndarray | ImageEmbedding,
    *,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    crop_n_layers: int = 0,
    crop_nms_thresh: float = 0.7,
    crop_overlap_ratio: float = 512 / 1500,
    crop_n_points_downscale_factor: int = 1,
    min_mask_region_area: int = 0,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
    precision: str | None = None,
    decoder_precision: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> list[MaskRecord]:
    """Find every object of a 2D image with a grid of point prompts.

    Parameters
    ----------
    model : Sam
        The model (eval mode).
    image_or_embedding : ndarray of shape (H, W), (H, W, 3) or (H, W, 4), or ImageEmbedding
        The image (any dtype, see :func:`napari_sam.image.prepare_image`) or
        its embedding from :func:`napari_sam.predict.encode_image` (reused,
        not recomputed; only with ``crop_n_layers=0``).
    points_per_side : int
        Grid of ``points_per_side**2`` prompts on the whole image.
    points_per_batch : int
        Prompts per step (decode, filter, progress, cancel). On CPU the decoder
        takes at most 8 of them per call at 1024 px (faster there, and far
        lighter). Results depend on neither.
    pred_iou_thresh : float
        Keep masks whose predicted IoU is above this (0 keeps all).
    stability_score_thresh : float
        Keep masks whose stability score is at least this (0 keeps all).
    stability_score_offset : float
        Logit offset of the stability score's two thresholds.
    box_nms_thresh : float
        Box IoU above which the lower-scoring duplicate is dropped (1 keeps all).
    crop_n_layers : int
        Also run on ``(2**i)**2`` overlapping crops for ``i = 1..crop_n_layers``.
    crop_nms_thresh : float
        Box NMS threshold between crops (smaller crops win).
    crop_overlap_ratio : float
        Overlap of layer-1 crops as a fraction of the short image side.
    crop_n_points_downscale_factor : int
        Layer ``i`` uses ``points_per_side / factor**i`` points per side.
    min_mask_region_area : int
        If > 0, fill holes and drop islands smaller than this many pixels.
    rgb, contrast_limits
        How to read ``image`` (see :func:`napari_sam.image.prepare_image`).
    precision : {"exact", "auto", "fp32", "bf16", "fp16"}, optional
        Precision of the encoder and decoder (see :mod:`napari_sam.precision`).
        Default: ``"exact"`` for an image (fp32, the reference's masks); for
        an embedding, the precision it was computed in.
    decoder_precision : {"exact", "auto", "fp32", "bf16", "fp16"}, optional
        Precision of the mask decoder alone; default: ``precision``.
        ``precision="auto", decoder_precision="exact"`` encodes fast and
        finds the objects an exact decoder finds from that embedding (a
        bf16 decoder misses a few at a threshold: docs/automatic.md).
    progress : callable ``(done, total) -> None``, optional
        Called with 0 first, then after each image encoding, each batch of
        points and the small-region clean-up.
    cancel : callable ``() -> bool``, optional
        Polled between those steps; True stops the run.

    Returns
    -------
    list of MaskRecord
        In the reference's order: by descending predicted IoU within a crop
        (NMS order), smaller crops first when there are several.

    Raises
    ------
    Cancelled
        If ``cancel()`` returned True; nothing is returned then.
    ValueError
        For a parameter out of range, or an embedding with ``crop_n_layers > 0``.
    """
    settings = AutomaticSettings(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset,
        box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_n_layers,
        crop_nms_thresh=crop_nms_thresh,
        crop_overlap_ratio=crop_overlap_ratio,
        crop_n_points_downscale_factor=crop_n_points_downscale_factor,
        min_mask_region_area=min_mask_region_area,
    )
    return generate_with_settings(
        model,
        image_or_embedding,
        settings,
        rgb=rgb,
        contrast_limits=contrast_limits,
        precision=precision,
        decoder_precision=decoder_precision,
        progress=progress,
        cancel=cancel,
    )


def generate_with_settings(
    model: Sam,
    image_or_embedding: np.ndarray | ImageEmbedding,
    settings: AutomaticSettings,
    *,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
    precision: str | None = None,
    decoder_precision: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
) -> list[MaskRecord]:
    """:func:`generate_masks` with its parameters as one :class:`AutomaticSettings`."""
    for name, value in (("precision", precision), ("decoder_precision", decoder_precision)):
        if value is not None:
            check_precision(value, name=name)
    decode = precision if decoder_precision is None else decoder_precision
    if isinstance(image_or_embedding, ImageEmbedding):
        if settings.crop_n_layers > 0:
            raise ValueError(
                "crop_n_layers must be 0 when an ImageEmbedding is given (crops need the "
                f"image itself), got {settings.crop_n_layers}"
            )
        embedding, image = image_or_embedding, None
        shape_hw = embedding.original_hw
    else:
        from .image import prepare_image

        embedding = None
        image = prepare_image(image_or_embedding, rgb=rgb, contrast_limits=contrast_limits)
        shape_hw = (int(image.shape[0]), int(image.shape[1]))
    crops = ops.crop_boxes(shape_hw, settings.crop_n_layers, settings.crop_overlap_ratio)
    sides = settings.grid_sizes
    batches = [-(-(sides[c.layer] ** 2) // settings.points_per_batch) for c in crops]
    total = sum(batches) + (len(crops) if embedding is None else 0)
    steps = Steps(total + (settings.min_mask_region_area > 0), progress, cancel)

    per_crop = []
    for index, crop in enumerate(crops):
        steps.check()
        if embedding is None:
            x0, y0, x1, y1 = crop.box_xyxy
            crop_embedding = encode_image(
                model, image[y0:y1, x0:x1], precision=precision or "exact"
            )
            steps.report()
        else:
            crop_embedding = embedding
        grid = ops.point_grid(sides[crop.layer])
        points_xy = grid * np.array(crop.shape_hw[::-1], dtype=np.float64)[None]
        found = _process_crop(
            model, crop_embedding, crop, points_xy, settings, shape_hw, steps, decode
        )
        per_crop.append(found.with_crop(index))
    found = Candidates.concatenate(per_crop)
    if len(crops) > 1:
        areas = torch.tensor([crops[i].area for i in found.crop_index], dtype=torch.float32)
        found = found.take(ops.box_nms(found.boxes_xyxy, 1.0 / areas, settings.crop_nms_thresh))
    if settings.min_mask_region_area > 0:
        nms_thresh = max(settings.box_nms_thresh, settings.crop_nms_thresh)
        found = clean_small_regions(found, settings.min_mask_region_area, nms_thresh, steps.check)
        steps.report()
    return [_record(found, i, crops) for i in range(len(found))]


def _record(found: Candidates, i: int, crops: list[ops.CropBox]) -> MaskRecord:
    x0, y0, x1, y1 = (int(v) for v in found.boxes_xyxy[i])
    rle = found.rles[i]
    return MaskRecord(
        rle=rle,
        bbox_xywh=(x0, y0, x1 - x0, y1 - y0),
        area=rle.area,
        predicted_iou=float(found.iou[i]),
        stability_score=float(found.stability[i]),
        point_xy=(float(found.points_xy[i, 0]), float(found.points_xy[i, 1])),
        crop_box_xywh=crops[int(found.crop_index[i])].box_xywh,
    )


def _process_crop(
    model: Sam,
    embedding: ImageEmbedding,
    crop: ops.CropBox,
    points_xy: np.ndarray,
    settings: AutomaticSettings,
    image_hw: tuple[int, int],
    steps: Steps,
    precision: str | None,
) -> Candidates:
    """All filtered masks of one crop after the within-crop NMS, in image coordinates."""
    batch = settings.points_per_batch
    found = []
    for start in range(0, len(points_xy), batch):
        steps.check()
        found.append(
            _process_batch(
                model,
                embedding,
                crop,
                points_xy[start : start + batch],
                settings,
                image_hw,
                precision,
            )
        )
        steps.report()
    crop_found = Candidates.concatenate(found)
    crop_found = crop_found.take(
        ops.box_nms(crop_found.boxes_xyxy, crop_found.iou, settings.box_nms_thresh)
    )
    return crop_found.shifted(crop.box_xyxy[0], crop.box_xyxy[1])


def _process_batch(
    model: Sam,
    embedding: ImageEmbedding,
    crop: ops.CropBox,
    points_xy: np.ndarray,
    settings: AutomaticSettings,
    image_hw: tuple[int, int],
    precision: str | None,
) -> Candidates:
    """Decode one batch of points; filter; encode the survivors (crop frame boxes/points)."""
    thresh = settings.pred_iou_thresh if settings.pred_iou_thresh > 0.0 else None
    logits, iou, index = _decode(
        model, embedding, points_xy, thresh, precision
    )  # S x M x 4h x 4w, B x M
    n_out = iou.shape[1]
    iou = iou.float()
    if thresh is None:
        keep = torch.arange(iou.numel(), device=iou.device)  # point-major, all masks
        chosen = logits.flatten(0, 1)
    else:
        passed = iou[index] > thresh  # S x M: the prompts that have masks, which of them pass
        rows, cols = torch.nonzero(passed, as_tuple=True)
        keep = index[rows] * n_out + cols  # point-major flat index of each kept mask
        chosen = logits[rows, cols]
    iou = iou.flatten()
    points = np.repeat(points_xy, n_out, axis=0)
    out = _score_and_encode(model, embedding, chosen, settings, crop, image_hw)
    kept = keep.cpu().numpy()[out.index]
    return Candidates(
        rles=out.rles,
        boxes_xyxy=out.boxes_xyxy,
        iou=iou[torch.from_numpy(kept).to(iou.device)].cpu(),
        stability=out.stability,
        points_xy=points[kept],
        crop_index=np.zeros(len(kept), dtype=np.int64),
    )


def _decode(
    model: Sam,
    embedding: ImageEmbedding,
    points_xy: np.ndarray,
    iou_above: float | None,
    precision: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-res logits and IoU of one positive point each.

    Returns the logits ``(S, M, 4h, 4w)`` of the S points with a mask whose
    predicted IoU is above ``iou_above`` (every point when None; the other
    points' masks are never upscaled), the IoU ``(B, M)`` of every point, and
    the S point indices. On CPU the points go through the decoder
    :data:`_CPU_DECODE_PIXELS` at a time (results do not depend on it).
    """
    step = len(points_xy)
    if model.device.type == "cpu":
        h4, w4 = embedding.mask_input_hw
        step = max(1, min(step, _CPU_DECODE_PIXELS // (h4 * w4)))
    logits, iou, index = [], [], []
    for start in range(0, len(points_xy), step):
        coords = torch.from_numpy(points_xy[start : start + step])[:, None, :]  # b x 1 x 2
        low = decode_low_res(
            model,
            embedding,
            points_xy=coords,
            point_labels=torch.ones((len(coords), 1), dtype=torch.int64),
            boxes_xyxy=None,
            mask_input=None,
            multimask=True,
            precision=precision,
            iou_above=iou_above,
        )
        logits.append(low.logits)
        iou.append(low.iou_scores)
        chosen = torch.arange(len(coords)) if low.index is None else low.index.cpu()
        index.append(start + chosen)
    return torch.cat(logits), torch.cat(iou), torch.cat(index).to(model.device)


@dataclass(frozen=True)
class _Encoded:
    """Masks that passed the full-resolution filters (``index`` into the input)."""

    index: np.ndarray
    rles: list[RunLengthMask]
    boxes_xyxy: torch.Tensor
    stability: torch.Tensor


def _score_and_encode(
    model: Sam,
    embedding: ImageEmbedding,
    logits: torch.Tensor,
    settings: AutomaticSettings,
    crop: ops.CropBox,
    image_hw: tuple[int, int],
) -> _Encoded:
    """Upsample low-res logits chunk by chunk; stability, binarise, box, edge filter, RLE.

    Parameters
    ----------
    logits : Tensor of shape (K, 4h, 4w)
        Low-resolution logits of the masks that passed the IoU filter.
    """
    crop_hw = embedding.original_hw
    pixels = max(crop_hw[0] * crop_hw[1], embedding.img_size**2)
    chunk = max(1, _CHUNK_ELEMENTS // pixels)
    threshold = model.mask_threshold
    parts: list[_Encoded] = []
    for start in range(0, len(logits), chunk):
        full = upscale_logits(logits[start : start + chunk, None], embedding)[:, 0]  # k x H x W
        stability = ops.stability_scores(full, threshold, settings.stability_score_offset)
        keep = torch.arange(len(full), device=full.device)
        if settings.stability_score_thresh > 0.0:
            keep = keep[stability >= settings.stability_score_thresh]
        if len(keep) < len(full):
            full = full[keep]
        masks = full > threshold
        del full
        boxes = ops.mask_boxes_xyxy(masks)
        inside = ~ops.near_crop_edge(boxes.cpu(), crop.box_xyxy, image_hw).to(keep.device)
        if not bool(inside.all()):
            keep, masks, boxes = keep[inside], masks[inside], boxes[inside]
        rles = encode_masks(masks, offset_xy=crop.box_xyxy[:2], shape_hw=image_hw)
        parts.append(_Encoded(start + keep.cpu().numpy(), rles, boxes.cpu(), stability[keep].cpu()))
    if not parts:
        return _Encoded(
            np.zeros(0, np.int64), [], torch.zeros((0, 4), dtype=torch.int64), torch.zeros(0)
        )
    return _Encoded(
        np.concatenate([p.index for p in parts]),
        [r for p in parts for r in p.rles],
        torch.cat([p.boxes_xyxy for p in parts]),
        torch.cat([p.stability for p in parts]),
    )
