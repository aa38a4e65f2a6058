"""Results of :mod:`napari_sam.predict`: frozen dataclasses, importable from there.

:class:`ImageEmbedding` (encoder output and what produced it),
:class:`LowResPrediction` (decoder output, torch) and :class:`MaskPrediction`
(masks at the original resolution, numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .precision import precision_name

__all__ = ["ImageEmbedding", "LowResPrediction", "MaskPrediction"]


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
        dtype of ``features``: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    """

    features: torch.Tensor
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    img_size: int
    model_name: str
    dtype: str

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"fp16"``: the precision the encoder ran in."""
        return precision_name(self.features.dtype)

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
    logits : Tensor of shape (B, M, 4h, 4w) or (S, M, 4h, 4w)
        Mask logits in the padded model-input frame at 1/4 resolution; only
        of the objects in ``index`` when that is set.
    iou_scores : Tensor of shape (B, M)
        Predicted IoU of each mask (of every object).
    index : Tensor of shape (S,), int64, or None
        Which objects ``logits`` belong to, when the decoder was asked for
        confident masks only (``decode_low_res(..., iou_above=...)``); None
        when ``logits`` has every object.
    """

    logits: torch.Tensor
    iou_scores: torch.Tensor
    index: torch.Tensor | None = None


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
