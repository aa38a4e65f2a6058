"""Simulated interactive prompting, shared by training and evaluation.

Everything here works in the model-input frame (the image resized so its
longest side is ``img_size``, padded bottom/right): point coordinates are
``(x, y)`` pixel indices of that frame, exactly what the prompt encoder takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from .image import input_shape_hw, prepare_image, resize_longest_side

if TYPE_CHECKING:
    from .models.sam import Sam
    from .training import Recipe

MIN_OBJECT_PIXELS = 4


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (per object, averaged over objects and rounds)."""

    bce: float = 1.0
    dice: float = 1.0
    focal: float = 0.0
    iou: float = 1.0


@dataclass(frozen=True, eq=False)
class Prepared:
    """Images and labels resized into the model-input frame.

    Attributes
    ----------
    images : list of Tensor of shape (h, w, 3), uint8
        Resized RGB images (not padded).
    labels : list of Tensor of shape (S, S), int32
        Label images resized (nearest) and zero-padded to ``S = img_size``.
    img_size : int
    """

    images: list[torch.Tensor]
    labels: list[torch.Tensor]
    img_size: int

    def __len__(self) -> int:
        return len(self.images)

    def batch(
        self, idx: Sequence[int], model: torch.nn.Module, *, augment: bool, gen: torch.Generator
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised, padded images ``B x 3 x S x S`` and labels, maybe flipped/rotated.

        Normalisation (``model.pixel_mean``, ``model.pixel_std``) happens before
        the zero padding, as in :func:`napari_sam.image.normalize_and_pad`.
        """
        size = self.img_size
        out, labs = [], []
        for i in idx:
            img = self.images[i]
            h, w = img.shape[:2]
            lab = self.labels[i][:h, :w]
            if augment:
                k, flip = torch.randint(4, (2,), generator=gen).tolist()
                img, lab = torch.rot90(img, k, (0, 1)), torch.rot90(lab, k, (0, 1))
                if flip % 2:
                    img, lab = img.flip(1), lab.flip(1)
            h, w = img.shape[:2]
            x = (img.permute(2, 0, 1).float() - model.pixel_mean) / model.pixel_std
            out.append(F.pad(x, (0, size - w, 0, size - h)))
            labs.append(F.pad(lab, (0, size - w, 0, size - h)))
        return torch.stack(out), labs

    def pick_objects(
        self, labels: torch.Tensor, count: int, gen: torch.Generator
    ) -> torch.Tensor | None:
        """Masks ``K x S x S`` (bool) of up to ``count`` random objects, or None."""
        ids, areas = torch.unique(labels, return_counts=True)
        ids = ids[(ids != 0) & (areas >= MIN_OBJECT_PIXELS)]
        if len(ids) == 0:
            return None
        pick = ids[torch.randperm(len(ids), generator=gen)[:count].to(ids.device)]
        return labels[None] == pick[:, None, None]


def prepare_pairs(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    img_size: int,
    device: torch.device | str = "cpu",
) -> Prepared:
    """Validate image/label pairs and bring them into the model-input frame.

    Parameters
    ----------
    images : sequence of ndarray of shape (H, W) or (H, W, 3)
    labels : sequence of ndarray of shape (H, W), integer
    img_size : int
    device : torch.device or str

    Returns
    -------
    Prepared

    Raises
    ------
    ValueError
        If the sequences differ in length or are empty, or a label image does
        not match its image's ``(H, W)``.
    TypeError
        If a label image is not integer-typed.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"images and labels must be non-empty and of equal length, got "
            f"{len(images)} images and {len(labels)} label images"
        )
    out_img, out_lab = [], []
    for i, (image, lab) in enumerate(zip(images, labels, strict=True)):
        lab = np.asarray(lab)
        if not np.issubdtype(lab.dtype, np.integer):
            raise TypeError(f"labels[{i}] must be an integer array, got dtype {lab.dtype}")
        rgb = prepare_image(image)
        if lab.shape != rgb.shape[:2]:
            raise ValueError(
                f"labels[{i}] must have the image's shape {rgb.shape[:2]}, got {lab.shape}"
            )
        h, w = input_shape_hw(lab.shape, img_size)
        rows = np.minimum(((np.arange(h) + 0.5) * lab.shape[0] / h).astype(int), lab.shape[0] - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * lab.shape[1] / w).astype(int), lab.shape[1] - 1)
        small = torch.as_tensor(lab[rows][:, cols].astype(np.int32), device=device)
        out_lab.append(F.pad(small, (0, img_size - w, 0, img_size - h)))
        out_img.append(torch.as_tensor(resize_longest_side(rgb, img_size), device=device))
    return Prepared(out_img, out_lab, img_size)


def soft_targets(gt: torch.Tensor, mask_hw: tuple[int, int]) -> torch.Tensor:
    """Area-averaged targets ``K x 1 x 4h x 4w`` of masks ``K x S x S``."""
    return F.adaptive_avg_pool2d(gt[:, None].float(), mask_hw)


@dataclass(frozen=True, eq=False)
class Prompts:
    """Prompts for ``K`` objects of one image, in the model-input frame."""

    coords_xy: torch.Tensor | None  # K x N x 2 float
    labels: torch.Tensor | None  # K x N (1, 0, -1)
    boxes_xyxy: torch.Tensor | None  # K x 4
    mask_logits: torch.Tensor | None = None  # K x 1 x 4h x 4w

    @property
    def is_single_point(self) -> bool:
        """One point and no box: the ambiguous case that uses multimask output."""
        return (
            self.boxes_xyxy is None
            and self.coords_xy is not None
            and (self.coords_xy.shape[1] == 1)
        )

    def add_points(self, points: tuple[torch.Tensor, torch.Tensor]) -> Prompts:
        """Append one point per object (``K x 1 x 2`` coordinates, ``K x 1`` labels)."""
        coords, labels = points
        if self.coords_xy is not None:
            coords = torch.cat([self.coords_xy, coords], 1)
            labels = torch.cat([self.labels, labels], 1)
        return replace(self, coords_xy=coords, labels=labels)

    def with_mask(self, mask_logits: torch.Tensor) -> Prompts:
        """The same prompts with a mask prompt (previous low-res logits)."""
        return replace(self, mask_logits=mask_logits)


def sample_pixels(weights: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``K x n x 2`` pixel ``(x, y)`` drawn from ``K x H x W`` non-negative weights."""
    flat = weights.flatten(1).float().cpu() + 1e-12
    idx = torch.multinomial(flat, n, replacement=True, generator=gen).to(weights.device)
    width = weights.shape[-1]
    return torch.stack([idx % width, idx // width], -1).float()


def _boxes(gt: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``K x 4`` ``(x0, y0, x1, y1)`` of non-empty masks ``K x S x S``."""
    size = gt.shape[-1]
    ar = torch.arange(size, device=gt.device)
    cols, rows = gt.any(1), gt.any(2)
    big = size + 1
    x0 = torch.where(cols, ar, big).amin(1)
    x1 = torch.where(cols, ar, -1).amax(1)
    y0 = torch.where(rows, ar, big).amin(1)
    y1 = torch.where(rows, ar, -1).amax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def tight_boxes(gt: torch.Tensor) -> torch.Tensor:
    """Public alias of the tight-box computation (used by evaluation)."""
    return _boxes(gt)


def initial_prompts(
    gt: torch.Tensor, probs: tuple[float, float, float], box_noise: float, gen: torch.Generator
) -> Prompts:
    """First prompt for every object of one image: point, jittered box or point set."""
    kind = int(torch.multinomial(torch.tensor(probs, dtype=torch.float), 1, generator=gen))
    k, size = gt.shape[0], gt.shape[-1]
    if kind == 0:
        return Prompts(sample_pixels(gt, 1, gen), gt.new_ones(k, 1, dtype=torch.long), None)
    if kind == 1:
        box = _boxes(gt)
        side = (box[:, 2:] - box[:, :2] + 1).repeat(1, 2)
        noise = torch.randn(box.shape, generator=gen).to(box.device) * box_noise * side
        limit = 20.0 * size / 1024 + 0.1 * side  # SAM: at most 20 px at 1024
        box = (box + noise.clamp(-limit, limit)).clamp(0, size - 1)
        box = torch.cat([box[:, :2].minimum(box[:, 2:]), box[:, :2].maximum(box[:, 2:])], 1)
        return Prompts(None, None, box)
    n_pos, n_neg = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
    n_neg -= 1
    pos = sample_pixels(gt, n_pos, gen)
    box = _boxes(gt)
    margin = (box[:, 2:] - box[:, :2]) * 0.3 + 3
    lo, hi = box[:, :2] - margin, box[:, 2:] + margin
    ar = torch.arange(size, device=gt.device, dtype=torch.float)
    near = (
        (ar[None, None, :] >= lo[:, 0, None, None])
        & (ar[None, None, :] <= hi[:, 0, None, None])
        & (ar[None, :, None] >= lo[:, 1, None, None])
        & (ar[None, :, None] <= hi[:, 1, None, None])
    )
    ring = near & ~gt
    coords, labels = pos, gt.new_ones(k, n_pos, dtype=torch.long)
    if n_neg:
        neg = sample_pixels(ring.float() + 1e-6 * (~gt).float(), n_neg, gen)
        coords = torch.cat([coords, neg], 1)
        labels = torch.cat([labels, gt.new_zeros(k, n_neg, dtype=torch.long)], 1)
    return Prompts(coords, labels, None)


def corrective_points(
    chosen_logits: torch.Tensor, target: torch.Tensor, img_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per object, uniform in the error region of the low-res prediction.

    Parameters
    ----------
    chosen_logits : Tensor of shape (K, 1, L, L)
    target : Tensor of shape (K, 1, L, L), soft targets in [0, 1]
    img_size : int
        Side of the model input (``L`` is ``img_size`` divided by an integer).
    gen : torch.Generator

    Returns
    -------
    coords : Tensor of shape (K, 1, 2), model-input frame
    labels : Tensor of shape (K, 1), 1 for a missed pixel, 0 for a false one,
        -1 (padding) when the prediction has no error.
    """
    pred = chosen_logits[:, 0] > 0
    gt = target[:, 0] >= 0.5
    err = pred ^ gt
    low = sample_pixels(err, 1, gen)  # K x 1 x 2 (x, y) on the L x L grid
    x, y = low[..., 0].long(), low[..., 1].long()
    k = torch.arange(err.shape[0], device=err.device)[:, None]
    labels = gt[k, y, x].long()
    labels = torch.where(err.flatten(1).any(1, keepdim=True), labels, -1)
    scale = img_size / err.shape[-1]
    coords = low * scale + (scale - 1) / 2
    return coords, labels


def decode(
    model: torch.nn.Module, embedding: torch.Tensor, prompts: Prompts, *, multimask: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run prompt encoder and mask decoder: logits ``K x M x 4h x 4w``, IoU ``K x M``."""
    points = None if prompts.coords_xy is None else (prompts.coords_xy, prompts.labels)
    sparse, dense = model.prompt_encoder(points, prompts.boxes_xyxy, prompts.mask_logits)
    return model.mask_decoder(
        embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, multimask
    )


def mask_losses(logits: torch.Tensor, target: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Per-mask loss ``K x M`` of logits ``K x M x L x L`` vs soft targets ``K x 1 x L x L``."""
    target = target.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    total = weights.bce * bce.mean((-2, -1))
    if weights.focal:
        p_t = prob * target + (1 - prob) * (1 - target)
        alpha_t = 0.25 * target + 0.75 * (1 - target)
        total = total + weights.focal * (alpha_t * (1 - p_t) ** 2 * bce).mean((-2, -1))
    if weights.dice:
        inter = (prob * target).sum((-2, -1))
        dice = 1 - (2 * inter + 1) / (prob.sum((-2, -1)) + target.sum((-2, -1)) + 1)
        total = total + weights.dice * dice
    return total


def _true_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU ``K x M`` of thresholded logits with ``target >= 0.5``."""
    pred = logits > 0
    gt = (target >= 0.5).expand_as(pred)
    inter = (pred & gt).sum((-2, -1)).float()
    union = (pred | gt).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def image_loss(
    model: Sam, embedding: torch.Tensor, gt: torch.Tensor, recipe: Recipe, gen: torch.Generator
) -> torch.Tensor:
    """Interactive loss for the objects ``gt`` (``K x S x S`` bool) of one image."""
    target = soft_targets(gt, model.prompt_encoder.mask_input_hw)
    prompts = initial_prompts(gt, recipe.prompt_probs, recipe.box_noise, gen)
    losses = []
    for rnd in range(recipe.click_rounds + 1):
        multimask = rnd == 0 and prompts.is_single_point
        logits, iou_pred = decode(model, embedding, prompts, multimask=multimask)
        per_mask = mask_losses(logits, target, recipe.loss)
        best = per_mask.argmin(dim=1, keepdim=True)
        iou_true = _true_iou(logits.detach(), target)
        loss = per_mask.gather(1, best).mean()
        losses.append(loss + recipe.loss.iou * F.mse_loss(iou_pred, iou_true))
        if rnd < recipe.click_rounds:
            chosen = logits.detach().gather(
                1, best[..., None, None].expand(-1, 1, *logits.shape[-2:])
            )
            clicks = corrective_points(chosen, target, model.img_size, gen)
            prompts = prompts.add_points(clicks).with_mask(chosen)
    return torch.stack(losses).mean()
