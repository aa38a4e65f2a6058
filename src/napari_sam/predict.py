"""Encode an image once, then predict masks from prompts, with no hidden state.

``encode_image`` runs the image encoder and returns an :class:`ImageEmbedding`
that remembers what produced it; ``predict_masks`` turns point and box prompts
(in the ORIGINAL image's pixel coordinates) into a :class:`MaskPrediction`.
:class:`Predictor` wraps both for people used to ``segment_anything``.

Prompts (points, labels, boxes, mask logits) follow the conventions of
:mod:`napari_sam.prompts`: original-image pixels, one object per box, labels
1 / 0 / -1 (padding), points off the image refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from .image import (
    boxes_to_input_frame,
    input_shape_hw,
    points_to_input_frame,
    prepare_image,
    to_model_input,
)
from .prompts import validate_prompts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .models.sam import Sam


@dataclass(frozen=True, eq=False)
class ImageEmbedding:
    """Image-encoder output for one image, and what produced it.

    Attributes
    ----------
    features : Tensor of shape (1, C, h, w)
        Image embedding on the model's device.
    original_hw : (int, int)
        ``(H, W)`` of the image the prompts refer to.
    input_hw : (int, int)
        ``(h, w)`` of the resized image inside the padded model input.
    img_size : int
        Side of the square model input.
    model_name : str
        Registry name of the model that produced ``features``.
    dtype : str
        dtype of ``features``, e.g. ``"float32"``.
    """

    features: torch.Tensor
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    img_size: int
    model_name: str
    dtype: str

    @property
    def mask_input_hw(self) -> tuple[int, int]:
        """``(4h, 4w)``: size of low-res logits and of ``mask_input``."""
        h, w = self.features.shape[-2:]
        return (4 * h, 4 * w)


@dataclass(frozen=True, eq=False)
class LowResPrediction:
    """Decoder output before upscaling (torch, on the model's device).

    Attributes
    ----------
    logits : Tensor of shape (B, M, 4h, 4w)
        Mask logits in the padded model-input frame at 1/4 resolution.
    iou_scores : Tensor of shape (B, M)
        Predicted IoU of each mask.
    """

    logits: torch.Tensor
    iou_scores: torch.Tensor


@dataclass(frozen=True, eq=False)
class MaskPrediction:
    """Masks for B objects, M candidates each (M = 3 with ``multimask``, else 1).

    Attributes
    ----------
    masks : ndarray of shape (B, M, H, W), bool
        Masks at the original image resolution.
    iou_scores : ndarray of shape (B, M), float32
        Predicted IoU of each mask.
    low_res_logits : ndarray of shape (B, M, 4h, 4w), float32
        Logits to feed back as ``mask_input`` (one mask per object, e.g.
        ``pred.best().low_res_logits``).
    """

    masks: np.ndarray
    iou_scores: np.ndarray
    low_res_logits: np.ndarray

    @property
    def best_index(self) -> np.ndarray:
        """ndarray of shape (B,), int64: index of the highest-scoring mask per object."""
        return np.argmax(self.iou_scores, axis=1)

    def best(self) -> MaskPrediction:
        """The highest-scoring candidate of each object, as a prediction with M = 1.

        Returns
        -------
        MaskPrediction
            ``masks`` (B, 1, H, W), ``iou_scores`` (B, 1), ``low_res_logits``
            (B, 1, 4h, 4w); ``best().masks[:, 0]`` is one mask per object.
        """
        idx = self.best_index[:, None]
        return MaskPrediction(
            masks=np.take_along_axis(self.masks, idx[:, :, None, None], axis=1),
            iou_scores=np.take_along_axis(self.iou_scores, idx, axis=1),
            low_res_logits=np.take_along_axis(self.low_res_logits, idx[:, :, None, None], axis=1),
        )


# --------------------------------------------------------------------------- #
# Torch-level functions (reused by automatic.py)
# --------------------------------------------------------------------------- #
def encode_image(
    model: Sam,
    image: np.ndarray,
    *,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
) -> ImageEmbedding:
    """Run the image encoder on one 2D image.

    Parameters
    ----------
    model : Sam
        The model (eval mode).
    image : array-like of shape (H, W), (H, W, 3) or (H, W, 4)
        Any real dtype; see :func:`napari_sam.image.prepare_image`.
    rgb : bool, optional
        Whether the last axis is colour; guessed when ``None``.
    contrast_limits : (float, float), optional
        napari's display range, mapped to 0..255.

    Returns
    -------
    ImageEmbedding
    """
    rgb_image = prepare_image(image, rgb=rgb, contrast_limits=contrast_limits)
    original_hw = (int(rgb_image.shape[0]), int(rgb_image.shape[1]))
    x = to_model_input(
        rgb_image, img_size=model.img_size, pixel_mean=model.pixel_mean, pixel_std=model.pixel_std
    )
    with torch.inference_mode():
        features = model.image_encoder(x)
    return ImageEmbedding(
        features=features,
        original_hw=original_hw,
        input_hw=input_shape_hw(original_hw, model.img_size),
        img_size=model.img_size,
        model_name=model.config.name,
        dtype=str(features.dtype).removeprefix("torch."),
    )


def check_embedding(model: Sam, embedding: ImageEmbedding) -> None:
    """Raise ValueError if ``embedding`` was not produced by a model like ``model``.

    Compares the model name, input size and embedding shape (weights are not
    compared: two checkpoints of one architecture are indistinguishable here).
    """
    config = model.config
    got = (embedding.model_name, embedding.img_size, tuple(embedding.features.shape[1:]))
    expected = (config.name, model.img_size, (config.prompt_embed_dim, *config.embedding_hw))
    if got != expected:
        raise ValueError(
            "embedding was produced by a different model: embedding has "
            f"(model_name, img_size, features C x h x w) = {got}, model has {expected}; "
            "run encode_image with this model"
        )


def decode_low_res(
    model: Sam,
    embedding: ImageEmbedding,
    *,
    points_xy: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes_xyxy: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    multimask: bool,
) -> LowResPrediction:
    """Run the prompt encoder and mask decoder for a batch of B objects.

    Parameters
    ----------
    model : Sam
    embedding : ImageEmbedding
        From :func:`encode_image` with this model.
    points_xy : Tensor of shape (B, N, 2), float, optional
        Original-frame ``(x, y)``; requires ``point_labels``.
    point_labels : Tensor of shape (B, N), int, optional
        1 foreground, 0 background, -1 padding.
    boxes_xyxy : Tensor of shape (B, 4), float, optional
        Original-frame ``(x0, y0, x1, y1)``.
    mask_input : Tensor of shape (B, 1, 4h, 4w), float, optional
        Low-res logits from a previous prediction.
    multimask : bool
        Three candidates per object (True) or one (False).

    Returns
    -------
    LowResPrediction
        ``logits`` (B, M, 4h, 4w) and ``iou_scores`` (B, M), M = 3 or 1.
    """
    check_embedding(model, embedding)
    _check_batch_shapes(points_xy, point_labels, boxes_xyxy, mask_input, embedding.mask_input_hw)
    device = model.device
    points = None
    if points_xy is not None:
        coords = points_to_input_frame(
            points_xy.to(device, torch.float32), embedding.original_hw, embedding.input_hw
        )
        points = (coords, point_labels.to(device, torch.int))
    boxes = None
    if boxes_xyxy is not None:
        boxes = boxes_to_input_frame(
            boxes_xyxy.to(device, torch.float32), embedding.original_hw, embedding.input_hw
        )
    features = embedding.features.to(device)
    if mask_input is not None:
        mask_input = mask_input.to(device, features.dtype)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        logits, iou_scores = model.mask_decoder(
            image_embeddings=features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    return LowResPrediction(logits=logits, iou_scores=iou_scores)


def _check_batch_shapes(
    points_xy: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes_xyxy: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    mask_hw: tuple[int, int],
) -> None:
    """Shape checks of :func:`decode_low_res` (its inputs are already batched)."""
    if (points_xy is None) != (point_labels is None):
        raise ValueError("points_xy and point_labels must be given together")
    h4, w4 = mask_hw
    given = {
        name: (tensor, pattern, tail)
        for name, tensor, pattern, tail in (
            ("points_xy", points_xy, "(B, N, 2)", (None, 2)),
            ("point_labels", point_labels, "(B, N)", (None,)),
            ("boxes_xyxy", boxes_xyxy, "(B, 4)", (4,)),
            ("mask_input", mask_input, f"(B, 1, {h4}, {w4})", (1, h4, w4)),
        )
        if tensor is not None
    }
    for name, (tensor, pattern, tail) in given.items():
        shape = tuple(tensor.shape)
        ok = len(shape) == 1 + len(tail) and all(
            t in (None, s) for t, s in zip(tail, shape[1:], strict=True)
        )
        if not ok:
            raise ValueError(f"{name} must have shape {pattern}; received {shape}")
    if points_xy is not None and point_labels.shape != points_xy.shape[:2]:
        raise ValueError(
            f"point_labels must have shape {tuple(points_xy.shape[:2])} (B, N of points_xy); "
            f"received {tuple(point_labels.shape)}"
        )
    sizes = {name: tensor.shape[0] for name, (tensor, _, _) in given.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes (first axis) must agree; received {sizes}")


def upscale_logits(low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
    """Upscale low-res logits to the original image (the reference's postprocess).

    Parameters
    ----------
    low_res_logits : Tensor of shape (B, M, 4h, 4w)
    embedding : ImageEmbedding
        Gives ``img_size``, ``input_hw`` and ``original_hw``.

    Returns
    -------
    Tensor of shape (B, M, H, W)
        Bilinear (``align_corners=False``) to ``img_size``, cropped to
        ``input_hw``, bilinear to ``original_hw``.
    """
    size = embedding.img_size
    h, w = embedding.input_hw
    with torch.inference_mode():
        x = F.interpolate(low_res_logits, (size, size), mode="bilinear", align_corners=False)
        x = x[..., :h, :w]
        return F.interpolate(x, embedding.original_hw, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- #
# numpy-level API
# --------------------------------------------------------------------------- #
def predict_masks(
    model: Sam,
    embedding: ImageEmbedding,
    *,
    points_xy: Any = None,
    point_labels: Any = None,
    boxes_xyxy: Any = None,
    mask_input: Any = None,
    multimask: bool = True,
) -> MaskPrediction:
    """Predict masks for one or several objects from point, box and mask prompts.

    Parameters
    ----------
    model : Sam
    embedding : ImageEmbedding
        From :func:`encode_image` with this model.
    points_xy : array-like of shape (N, 2) or (B, N, 2), optional
        ``(x, y)`` in original pixels. ``(N, 2)`` applies to every object.
    point_labels : array-like of shape (N,) or (B, N), optional
        1 foreground, 0 background, -1 padding (ignored).
    boxes_xyxy : array-like of shape (4,) or (B, 4), optional
        ``(x0, y0, x1, y1)`` with ``x0 <= x1`` and ``y0 <= y1``; one object per box.
    mask_input : array-like of shape (4h, 4w), (B or 1, 4h, 4w) or (B or 1, 1, 4h, 4w)
        Low-res logits of a previous prediction, one mask per object.
    multimask : bool
        Return three candidates per object (default) or one.

    Returns
    -------
    MaskPrediction
        B = number of objects (boxes, per-object point sets or masks; 1 otherwise).

    Raises
    ------
    ValueError
        Naming the argument: labels without points (or the reverse), shapes
        or batch sizes that disagree, labels outside {-1, 0, 1}, NaN or
        infinite values, a box with ``x1 < x0`` or ``y1 < y0``, a point off
        the image, a box that misses the image, no prompt at all, or an
        embedding from another model.
    """
    check_embedding(model, embedding)
    prompts = validate_prompts(
        points_xy=points_xy,
        point_labels=point_labels,
        boxes_xyxy=boxes_xyxy,
        mask_input=mask_input,
        shape_hw=embedding.original_hw,
        mask_input_hw=embedding.mask_input_hw,
    )

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)

    low = decode_low_res(
        model,
        embedding,
        points_xy=tensor(prompts.points_xy),
        point_labels=tensor(prompts.point_labels),
        boxes_xyxy=tensor(prompts.boxes_xyxy),
        mask_input=tensor(prompts.mask_input),
        multimask=multimask,
    )
    masks = upscale_logits(low.logits, embedding) > model.mask_threshold
    return MaskPrediction(
        masks=masks.cpu().numpy(),
        iou_scores=low.iou_scores.float().cpu().numpy(),
        low_res_logits=low.logits.float().cpu().numpy(),
    )


# --------------------------------------------------------------------------- #
# segment_anything-style convenience
# --------------------------------------------------------------------------- #
class Predictor:
    """Stateful wrapper for people coming from ``segment_anything.SamPredictor``.

    Parameters
    ----------
    model : Sam

    Examples
    --------
    >>> predictor = Predictor(model)  # doctest: +SKIP
    >>> predictor.set_image(image)  # doctest: +SKIP
    >>> pred = predictor.predict(points_xy=[[120, 80]], point_labels=[1])  # doctest: +SKIP
    >>> mask = pred.best().masks[0, 0]  # doctest: +SKIP
    """

    def __init__(self, model: Sam) -> None:
        self.model = model
        self._embedding: ImageEmbedding | None = None

    def set_image(
        self,
        image: np.ndarray,
        *,
        rgb: bool | None = None,
        contrast_limits: Sequence[float] | None = None,
    ) -> ImageEmbedding:
        """Encode ``image`` (see :func:`encode_image`) and keep its embedding."""
        self._embedding = encode_image(self.model, image, rgb=rgb, contrast_limits=contrast_limits)
        return self._embedding

    def reset_image(self) -> None:
        """Forget the current image."""
        self._embedding = None

    @property
    def embedding(self) -> ImageEmbedding:
        """The current image's embedding; RuntimeError before :meth:`set_image`."""
        if self._embedding is None:
            raise RuntimeError("no image set: call Predictor.set_image(image) before predict")
        return self._embedding

    def predict(
        self,
        points_xy: Any = None,
        point_labels: Any = None,
        boxes_xyxy: Any = None,
        mask_input: Any = None,
        multimask: bool = True,
    ) -> MaskPrediction:
        """Predict masks for the current image (see :func:`predict_masks`)."""
        return predict_masks(
            self.model,
            self.embedding,
            points_xy=points_xy,
            point_labels=point_labels,
            boxes_xyxy=boxes_xyxy,
            mask_input=mask_input,
            multimask=multimask,
        )


__all__ = [
    "ImageEmbedding",
    "LowResPrediction",
    "MaskPrediction",
    "Predictor",
    "check_embedding",
    "decode_low_res",
    "encode_image",
    "predict_masks",
    "upscale_logits",
]
