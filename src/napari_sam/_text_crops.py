"""Candidate masks -> the square, normalised crops that CLIP embeds.

Each candidate is cut out on a square around its box, enlarged by a margin
(part of the image outside it is padded), resized to CLIP's input side with
antialiasing, and everything outside the mask is suppressed:

- ``"grey"``: replaced by CLIP's mean colour (zero after normalisation),
  so the embedding sees the object alone;
- ``"blur"``: replaced by a Gaussian-blurred copy of the crop, so coarse
  context stays and neighbouring objects turn into smudges;
- ``"none"``: the plain crop (the margin's context in full).

The mask itself is resized as a soft alpha, so the object's edge is
blended, not jagged. ``docs/text-prompts.md`` explains the default
(``"grey"``) and the measurement behind it
(``benchmarks/measure_suppression.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

SUPPRESS_MODES: tuple[str, ...] = ("grey", "blur", "none")


@dataclass(frozen=True)
class CropSettings:
    """How a candidate mask becomes a CLIP input.

    Attributes
    ----------
    margin : float
        Context added on each side, as a fraction of the object's longer
        box side (0.25: the crop side is 1.5 times the object's).
    suppress : {"grey", "blur", "none"}
        What happens to the pixels outside the mask (see the module notes).
    blur_sigma : float
        Gaussian sigma of ``"blur"``, as a fraction of CLIP's input side.
    min_side_px : int
        Smallest crop side in image pixels (tiny objects get more context).
    """

    margin: float = 0.25
    suppress: str = "grey"
    blur_sigma: float = 0.05
    min_side_px: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.margin, int | float) and 0.0 <= self.margin <= 4.0):
            raise ValueError(f"margin must be a number in [0, 4], got {self.margin!r}")
        if self.suppress not in SUPPRESS_MODES:
            raise ValueError(f"suppress must be one of {SUPPRESS_MODES}, got {self.suppress!r}")
        if not (isinstance(self.blur_sigma, int | float) and 0.0 < self.blur_sigma <= 1.0):
            raise ValueError(f"blur_sigma must be in (0, 1], got {self.blur_sigma!r}")
        if isinstance(self.min_side_px, bool) or not (
            isinstance(self.min_side_px, int | np.integer) and self.min_side_px >= 1
        ):
            raise ValueError(f"min_side_px must be an integer >= 1, got {self.min_side_px!r}")


def square_box_xyxy(
    bbox_xywh: Sequence[int], *, margin: float, min_side_px: int
) -> tuple[int, int, int, int]:
    """The square crop around a box, in image pixels (may extend past the image).

    Parameters
    ----------
    bbox_xywh : (x0, y0, w, h)
        As in :class:`napari_sam.automatic.MaskRecord`: ``x0 + w`` is the last
        column of the object (so its extent is ``w + 1`` pixels).
    margin, min_side_px
        See :class:`CropSettings`.

    Returns
    -------
    (x0, y0, x1, y1) : tuple of int
        Half-open: columns ``x0 .. x1 - 1``, ``x1 - x0 == y1 - y0``.
    """
    x0, y0, w, h = (int(v) for v in bbox_xywh)
    extent = max(w + 1, h + 1)
    side = max(math.ceil(extent * (1.0 + 2.0 * margin)), int(min_side_px), extent)
    cx2, cy2 = 2 * x0 + w + 1, 2 * y0 + h + 1  # twice the centre (exact in integers)
    left, top = (cx2 - side) // 2, (cy2 - side) // 2
    return left, top, left + side, top + side


def _cut(array: np.ndarray, box_xyxy: tuple[int, int, int, int], fill: object) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` with the part outside the image set to ``fill``."""
    x0, y0, x1, y1 = box_xyxy
    height, width = array.shape[:2]
    out = np.full((y1 - y0, x1 - x0, *array.shape[2:]), fill, dtype=array.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def cut_and_resize(
    image_rgb: np.ndarray,
    mask: np.ndarray,
    box_xyxy: tuple[int, int, int, int],
    size: int,
    fill_rgb: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop and its mask at CLIP's resolution.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
    mask : ndarray of shape (H, W), bool
    box_xyxy : tuple of int
        From :func:`square_box_xyxy`.
    size : int
        CLIP's input side ``S``.
    fill_rgb : (float, float, float)
        Colour (0..1) of the padding outside the image.

    Returns
    -------
    pixels : Tensor of shape (3, S, S), float32 in 0..1
    alpha : Tensor of shape (1, S, S), float32 in 0..1
        The mask, antialiased.
    """
    fill = tuple(round(255 * c) for c in fill_rgb)
    pixels = torch.from_numpy(_cut(image_rgb, box_xyxy, fill)).permute(2, 0, 1).float() / 255.0
    alpha = torch.from_numpy(_cut(mask, box_xyxy, False)).float()[None]
    both = torch.cat([pixels, alpha])[None]  # 1 x 4 x s x s
    antialias = both.shape[-1] > size
    both = F.interpolate(
        both, (size, size), mode="bilinear", align_corners=False, antialias=antialias
    )
    both = both[0].clamp_(0.0, 1.0)
    return both[:3], both[3:]


def gaussian_blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders.

    Parameters
    ----------
    images : Tensor of shape (B, C, S, S), float
    sigma_px : float

    Returns
    -------
    Tensor of shape (B, C, S, S)
    """
    radius = max(1, math.ceil(3.0 * sigma_px))
    radius = min(radius, images.shape[-1] - 1)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def suppress_outside(
    pixels: torch.Tensor,
    alpha: torch.Tensor,
    settings: CropSettings,
    fill_rgb: Sequence[float],
) -> torch.Tensor:
    """Blend the outside of each mask to grey or to a blurred copy.

    Parameters
    ----------
    pixels : Tensor of shape (B, 3, S, S), float32 in 0..1
    alpha : Tensor of shape (B, 1, S, S), float32 in 0..1
    settings : CropSettings
    fill_rgb : (float, float, float)
        The grey of ``"grey"`` (CLIP's mean colour).

    Returns
    -------
    Tensor of shape (B, 3, S, S), float32 in 0..1
    """
    if settings.suppress == "none":
        return pixels
    if settings.suppress == "grey":
        outside = torch.tensor(fill_rgb, dtype=pixels.dtype).view(1, 3, 1, 1)
    else:
        outside = gaussian_blur(pixels, settings.blur_sigma * pixels.shape[-1])
    return alpha * pixels + (1.0 - alpha) * outside


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel, for ``pixels`` (B, 3, S, S) in 0..1."""
    m = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - m) / s


def prepare_crops(
    image_rgb: np.ndarray,
    masks: Sequence[np.ndarray],
    boxes_xywh: Sequence[Sequence[int]],
    settings: CropSettings,
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """A batch of CLIP inputs, one per mask.

    Parameters
    ----------
    image_rgb : ndarray of shape (H, W, 3), uint8
    masks : sequence of ndarray of shape (H, W), bool
    boxes_xywh : sequence of (x0, y0, w, h)
        The masks' boxes (``MaskRecord.bbox_xywh`` convention).
    settings : CropSettings
    size : int
        CLIP's input side.
    mean, std : (float, float, float)
        CLIP's normalisation; ``mean`` is also the grey.

    Returns
    -------
    Tensor of shape (B, 3, S, S), float32, normalised
    """
    if len(masks) != len(boxes_xywh):
        raise ValueError(f"got {len(masks)} masks but {len(boxes_xywh)} boxes")
    pixels = torch.empty((len(masks), 3, size, size), dtype=torch.float32)
    alpha = torch.empty((len(masks), 1, size, size), dtype=torch.float32)
    for i, (mask, bbox) in enumerate(zip(masks, boxes_xywh, strict=True)):
        box = square_box_xyxy(bbox, margin=settings.margin, min_side_px=settings.min_side_px)
        pixels[i], alpha[i] = cut_and_resize(image_rgb, mask, box, size, mean)
    return normalize(suppress_outside(pixels, alpha, settings, mean), mean, std)
