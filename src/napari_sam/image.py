"""Turn any napari image into what SAM sees, and map coordinates both ways.

Two frames are involved:

- the **original frame**: pixel coordinates of the image the user sees
  (``points_xy`` with x = column, y = row; integer = pixel centre);
- the **input frame**: the image resized so its longest side is the model's
  ``img_size`` (shape ``input_hw``), then padded bottom/right to a square.

The arithmetic (target size, bilinear resize of the uint8 image, coordinate
scaling) reproduces ``segment_anything``'s ``ResizeLongestSide`` and
``Sam.preprocess`` exactly, so embeddings match the reference bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------- #
# Any napari image -> RGB uint8
# --------------------------------------------------------------------------- #
def prepare_image(
    image: np.ndarray,
    *,
    rgb: bool | None = None,
    contrast_limits: Sequence[float] | None = None,
) -> np.ndarray:
    """Convert a 2D grayscale, RGB or RGBA image to the RGB uint8 image SAM sees.

    Parameters
    ----------
    image : array-like of shape (H, W), (H, W, 3) or (H, W, 4)
        Any real dtype: uint8, uint16, signed int, float or bool. An alpha
        channel is dropped (not composited).
    rgb : bool, optional
        Whether the last axis holds colour channels. ``None`` (default) guesses
        like napari: RGB when ``image.ndim == 3`` and the last axis is 3 or 4.
    contrast_limits : (float, float), optional
        napari's ``(low, high)`` display range: ``low`` maps to 0 and ``high``
        to 255, linearly, with clipping (so SAM sees what the user sees). The
        same limits apply to every channel. Without limits: uint8 is used as
        is, bool becomes 0/255, any other dtype is stretched from its finite
        minimum to its finite maximum (a constant image becomes zeros).
        NaN pixels become 0 in both cases.

    Returns
    -------
    ndarray of shape (H, W, 3), uint8
        A new array (never a view of ``image``).

    Raises
    ------
    TypeError
        For complex, object, string or other non-numeric dtypes.
    ValueError
        For an empty image, a shape that is not one 2D (colour) image (the
        message names the shape received), or invalid ``contrast_limits``.
    """
    image = np.asarray(image)
    _check_dtype(image.dtype)
    if image.size == 0:
        raise ValueError(f"image is empty: shape {image.shape}; expected (H, W) or (H, W, 3|4)")
    image = _to_channels_last_rgb(image, rgb)
    if contrast_limits is not None:
        low, high = _check_contrast_limits(contrast_limits)
        return rescale_to_uint8(image, low, high)
    if image.dtype == np.uint8:
        return np.array(image, dtype=np.uint8, copy=True)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * np.uint8(255)
    low, high = finite_range(image)
    if not high > low:  # constant (or all-NaN) image
        return np.zeros(image.shape, dtype=np.uint8)
    return rescale_to_uint8(image, low, high)


def _check_dtype(dtype: np.dtype) -> None:
    if np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"image has complex dtype {dtype}; pass a real image, e.g. np.abs(image)")
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
        raise TypeError(f"image dtype must be bool, integer or float; received {dtype}")


def _to_channels_last_rgb(image: np.ndarray, rgb: bool | None) -> np.ndarray:
    """Validate the shape and return an (H, W, 3) view (grayscale repeated, alpha dropped)."""
    shape = image.shape
    if rgb is None:
        rgb = image.ndim == 3 and shape[-1] in (3, 4)
    if rgb:
        if image.ndim != 3 or shape[-1] not in (3, 4):
            hint = " (pass one 2D slice)" if image.ndim > 3 else ""
            raise ValueError(
                f"an RGB(A) image must have shape (H, W, 3) or (H, W, 4); "
                f"received shape {shape}{hint}"
            )
        return image[..., :3]
    if image.ndim != 2:
        hint = (
            "; this looks like a stack or multichannel image: pass a 2D slice, e.g. image[z]"
            if image.ndim > 2
            else ""
        )
        raise ValueError(f"a grayscale image must have shape (H, W); received shape {shape}{hint}")
    return np.broadcast_to(image[..., None], (*shape, 3))


def _check_contrast_limits(contrast_limits: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in contrast_limits)
    except (TypeError, ValueError):
        raise ValueError(
            f"contrast_limits must be two numbers (low, high); received {contrast_limits!r}"
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise ValueError(
            f"contrast_limits must be finite with low < high; received ({low}, {high})"
        )
    return low, high


def finite_range(image: np.ndarray) -> tuple[float, float]:
    """Minimum and maximum of the finite values of ``image``.

    Parameters
    ----------
    image : ndarray of any shape, real dtype

    Returns
    -------
    (float, float)
        ``(min, max)``; ``(0.0, 0.0)`` when no value is finite.
    """
    if np.issubdtype(image.dtype, np.floating):
        finite = image[np.isfinite(image)]
        if finite.size == 0:
            return 0.0, 0.0
        return float(finite.min()), float(finite.max())
    return float(image.min()), float(image.max())


def rescale_to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` -> 0 and ``high`` -> 255 linearly, clip, round to uint8.

    Parameters
    ----------
    image : ndarray of any shape, real dtype
    low, high : float
        Intensity range, ``low < high``.

    Returns
    -------
    ndarray of the same shape, uint8
        NaN becomes 0, +inf 255, -inf 0.
    """
    small = image.dtype.itemsize <= 2 or image.dtype == np.float32
    work = np.asarray(image, dtype=np.float32 if small else np.float64)
    scaled = (work - low) * (255.0 / (high - low))
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


# --------------------------------------------------------------------------- #
# RGB uint8 -> model input (resize longest side, normalise, pad)
# --------------------------------------------------------------------------- #
def input_shape_hw(original_hw: tuple[int, int], img_size: int) -> tuple[int, int]:
    """Size of the image after resizing its longest side to ``img_size``.

    Parameters
    ----------
    original_hw : (int, int)
        ``(H, W)`` of the original image.
    img_size : int
        Side of the square model input.

    Returns
    -------
    (int, int)
        ``(h, w)`` with ``max(h, w) == img_size``, rounded half up
        (``int(x * scale + 0.5)``, as the reference).
    """
    old_h, old_w = original_hw
    scale = img_size * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def resize_longest_side(image_rgb: np.ndarray, img_size: int) -> np.ndarray:
    """Bilinearly resize an RGB uint8 image so its longest side is ``img_size``.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
    img_size : int

    Returns
    -------
    ndarray of shape (h, w, 3), uint8
        ``(h, w) = input_shape_hw((H, W), img_size)``; Pillow's bilinear filter
        (with its antialiasing when shrinking), as the reference.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[-1] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(
            f"image_rgb must be an (H, W, 3) uint8 array; received shape {image_rgb.shape} "
            f"and dtype {image_rgb.dtype} (use prepare_image first)"
        )
    new_h, new_w = input_shape_hw(image_rgb.shape[:2], img_size)
    if (new_h, new_w) == image_rgb.shape[:2]:
        return np.array(image_rgb, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(image_rgb))
    return np.array(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))


def normalize_and_pad(
    image_rgb: np.ndarray,
    *,
    img_size: int,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
) -> torch.Tensor:
    """Normalise a resized RGB uint8 image and zero-pad it bottom/right to a square.

    Parameters
    ----------
    image_rgb : ndarray of shape (h, w, 3), uint8
        Output of :func:`resize_longest_side`, ``max(h, w) <= img_size``.
    img_size : int
        Side of the square output.
    pixel_mean, pixel_std : Tensor of shape (3, 1, 1), float
        Per-channel normalisation (``model.pixel_mean``, ``model.pixel_std``);
        the output lives on their device, in their dtype.

    Returns
    -------
    Tensor of shape (1, 3, img_size, img_size)
        ``(x - mean) / std``, zeros in the padding.
    """
    h, w = image_rgb.shape[:2]
    if max(h, w) > img_size:
        raise ValueError(f"image_rgb of shape {image_rgb.shape} is larger than img_size={img_size}")
    x = torch.as_tensor(np.ascontiguousarray(image_rgb), device=pixel_mean.device)
    x = x.permute(2, 0, 1)[None]  # 1 x 3 x h x w, uint8
    x = (x - pixel_mean) / pixel_std
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def to_model_input(
    image_rgb: np.ndarray,
    *,
    img_size: int,
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
) -> torch.Tensor:
    """Resize, normalise and pad an RGB uint8 image for the image encoder.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
        Output of :func:`prepare_image`.
    img_size : int
        Side of the square model input (``model.img_size``).
    pixel_mean, pixel_std : Tensor of shape (3, 1, 1), float

    Returns
    -------
    Tensor of shape (1, 3, img_size, img_size)
        The valid region is ``input_shape_hw((H, W), img_size)`` at the top left.
    """
    resized = resize_longest_side(image_rgb, img_size)
    return normalize_and_pad(resized, img_size=img_size, pixel_mean=pixel_mean, pixel_std=pixel_std)


# --------------------------------------------------------------------------- #
# Coordinates: original frame <-> input frame
# --------------------------------------------------------------------------- #
def _scale_xy(
    coords: ArrayOrTensor, original_hw: tuple[int, int], input_hw: tuple[int, int], inverse: bool
) -> ArrayOrTensor:
    """Multiply x by ``w_in / W`` and y by ``h_in / H`` (or divide, if ``inverse``)."""
    sx = input_hw[1] / original_hw[1]
    sy = input_hw[0] / original_hw[0]
    if isinstance(coords, torch.Tensor):
        out = coords.to(coords.dtype if coords.is_floating_point() else torch.float32).clone()
    else:
        out = np.array(coords, dtype=np.float64)
    if out.shape[-1:] != (2,):
        raise ValueError(f"coordinates must have 2 values (x, y) last; received shape {out.shape}")
    if inverse:
        out[..., 0] = out[..., 0] / sx
        out[..., 1] = out[..., 1] / sy
    else:
        out[..., 0] = out[..., 0] * sx
        out[..., 1] = out[..., 1] * sy
    return out


def _box_corners(boxes_xyxy: ArrayOrTensor) -> ArrayOrTensor:
    """``(..., 4)`` boxes as ``(..., 2, 2)`` corners ``[[x0, y0], [x1, y1]]``."""
    if tuple(boxes_xyxy.shape[-1:]) != (4,):
        raise ValueError(
            f"boxes must have 4 values (x0, y0, x1, y1) last; received shape "
            f"{tuple(boxes_xyxy.shape)}"
        )
    return boxes_xyxy.reshape(*boxes_xyxy.shape[:-1], 2, 2)


def points_to_input_frame(
    points_xy: ArrayOrTensor, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> ArrayOrTensor:
    """Map points from the original image to the resized model input.

    Parameters
    ----------
    points_xy : ndarray or Tensor of shape (..., 2)
        ``(x, y)`` in original pixels.
    original_hw, input_hw : (int, int)
        ``(H, W)`` of the original image and ``(h, w)`` of the resized one.

    Returns
    -------
    ndarray (float64) or Tensor (float) of shape (..., 2)
        A new array: ``x * w / W``, ``y * h / H``.
    """
    return _scale_xy(points_xy, original_hw, input_hw, inverse=False)


def points_to_original_frame(
    points_xy: ArrayOrTensor, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> ArrayOrTensor:
    """Inverse of :func:`points_to_input_frame`.

    Parameters
    ----------
    points_xy : ndarray or Tensor of shape (..., 2)
        ``(x, y)`` in model-input pixels.
    original_hw, input_hw : (int, int)

    Returns
    -------
    ndarray (float64) or Tensor (float) of shape (..., 2)
    """
    return _scale_xy(points_xy, original_hw, input_hw, inverse=True)


def boxes_to_input_frame(
    boxes_xyxy: ArrayOrTensor, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> ArrayOrTensor:
    """Map ``(x0, y0, x1, y1)`` boxes from the original image to the model input.

    Parameters
    ----------
    boxes_xyxy : ndarray or Tensor of shape (..., 4)
    original_hw, input_hw : (int, int)

    Returns
    -------
    ndarray (float64) or Tensor (float) of shape (..., 4)
    """
    corners = _box_corners(boxes_xyxy)
    return _scale_xy(corners, original_hw, input_hw, inverse=False).reshape(boxes_xyxy.shape)


def boxes_to_original_frame(
    boxes_xyxy: ArrayOrTensor, original_hw: tuple[int, int], input_hw: tuple[int, int]
) -> ArrayOrTensor:
    """Inverse of :func:`boxes_to_input_frame`.

    Parameters
    ----------
    boxes_xyxy : ndarray or Tensor of shape (..., 4)
    original_hw, input_hw : (int, int)

    Returns
    -------
    ndarray (float64) or Tensor (float) of shape (..., 4)
    """
    corners = _box_corners(boxes_xyxy)
    return _scale_xy(corners, original_hw, input_hw, inverse=True).reshape(boxes_xyxy.shape)
