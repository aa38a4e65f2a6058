"""SAM's prompt encoder: points, boxes and low-res masks to decoder inputs.

Sparse prompts (points and box corners) become tokens: a random-Fourier
encoding of their position plus a learned embedding of their kind
(negative point, positive point, top-left corner, bottom-right corner, or
"not a point" for padding). A dense prompt (a low-res mask logit image)
goes through a small strided conv stack to the embedding grid; without one
a learned "no mask" vector is broadcast over the grid.

Coordinates are in the model-input frame (pixels of the resized, padded
``input_image_hw`` image, x = column, y = row, integers at pixel centres);
like the reference, every coordinate is shifted by +0.5 before encoding.

Parameter names match the official checkpoints (``pe_layer.*``,
``point_embeddings.<i>``, ``not_a_point_embed``, ``mask_downscaling.<i>``,
``no_mask_embed``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]

# Indices into ``PromptEncoder.point_embeddings``.
_NEGATIVE, _POSITIVE, _BOX_TOP_LEFT, _BOX_BOTTOM_RIGHT = 0, 1, 2, 3
_PADDING_LABEL = -1


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier features of 2-D positions.

    ``enc(p) = [sin(2 pi (2p - 1) G), cos(2 pi (2p - 1) G)]`` for ``p`` in
    ``[0, 1]^2`` and a fixed Gaussian matrix ``G`` of shape ``2 x F``.

    Parameters
    ----------
    num_pos_feats : int
        ``F``; the encoding has ``2 F`` channels.
    scale : float, optional
        Standard deviation of ``G``. Default 1.
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats)
        )

    def encode_unit(self, coords01: torch.Tensor) -> torch.Tensor:
        """Encode positions normalised to the unit square.

        Parameters
        ----------
        coords01 : Tensor of shape (..., 2), float
            ``(x, y)`` in ``[0, 1]``.

        Returns
        -------
        Tensor of shape (..., 2 F), float32
        """
        gauss = self.positional_encoding_gaussian_matrix.float()
        phase = ((coords01.float() * 2 - 1) @ gauss) * (2 * math.pi)  # ... x F
        return torch.cat([phase.sin(), phase.cos()], dim=-1)

    def encode_pixels(self, coords_xy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """Encode pixel positions of an image of size ``image_hw``.

        Parameters
        ----------
        coords_xy : Tensor of shape (..., 2), float
            ``(x, y)`` in pixels (already shifted to pixel centres).
        image_hw : tuple of int
            ``(H, W)`` of the frame the coordinates live in.

        Returns
        -------
        Tensor of shape (..., 2 F), float32
        """
        h, w = image_hw
        return self.encode_unit(coords_xy / coords_xy.new_tensor([w, h]))

    def dense(self, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Encode the centres of every cell of an ``H x W`` grid.

        Parameters
        ----------
        grid_hw : tuple of int
            ``(H, W)`` of the grid.

        Returns
        -------
        Tensor of shape (2 F, H, W), float32
        """
        h, w = grid_hw
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode_unit(grid).permute(2, 0, 1)  # 2F x H x W


class PromptEncoder(nn.Module):
    """Embed point, box and mask prompts for the mask decoder.

    Parameters
    ----------
    embed_dim : int
        Width ``C`` of prompt tokens and of the image embedding.
    image_embedding_hw : tuple of int
        ``(h, w)`` of the image embedding grid.
    input_image_hw : tuple of int
        ``(H, W)`` of the (padded) model input in pixels.
    mask_in_chans : int
        Hidden channels of the mask downscaling stack (divisible by 4).
    activation : type of nn.Module, optional
        Activation of the mask stack. Default ``nn.GELU``.

    Attributes
    ----------
    mask_input_hw : tuple of int
        ``(4 h, 4 w)``, the size a mask prompt must have.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_hw: tuple[int, int],
        input_image_hw: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        if mask_in_chans < 4 or mask_in_chans % 4:
            raise ValueError(f"mask_in_chans must be a positive multiple of 4, got {mask_in_chans}")
        self.embed_dim = embed_dim
        self.image_embedding_hw = tuple(image_embedding_hw)
        self.input_image_hw = tuple(input_image_hw)
        self.mask_input_hw = (4 * self.image_embedding_hw[0], 4 * self.image_embedding_hw[1])

        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # negative point, positive point, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        quarter = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2),  # 4h -> 2h
            LayerNorm2d(quarter),
            activation(),
            nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2),  # 2h -> h
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of every cell of the image embedding grid.

        Returns
        -------
        Tensor of shape (1, C, h, w), dtype of the module's embeddings
        """
        dtype = self.no_mask_embed.weight.dtype
        return self.pe_layer.dense(self.image_embedding_hw).unsqueeze(0).to(dtype)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Parameters
        ----------
        points : tuple of Tensor, optional
            ``(coords_xy, labels)``: coordinates of shape ``(B, N, 2)`` (float,
            model-input pixels) and labels of shape ``(B, N)`` (1 positive,
            0 negative, -1 padding).
        boxes : Tensor of shape (B, 4), optional
            ``(x0, y0, x1, y1)`` per prompt, model-input pixels.
        masks : Tensor of shape (B, 1, 4h, 4w), optional
            Low-res mask logits (e.g. a previous prediction). A batch of one
            is shared by all point/box prompts.

        Returns
        -------
        sparse : Tensor of shape (B, K, C)
            Point tokens (with one padding token when there are points but no
            box), then two corner tokens per box; ``K = 0`` without either.
        dense : Tensor of shape (B, C, h, w)
            Mask embedding, or the broadcast "no mask" embedding.
        """
        batch = _batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        tokens = [weight.new_empty(batch, 0, self.embed_dim)]
        if points is not None:
            coords, labels = points
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        sparse = torch.cat(tokens, dim=1)

        if masks is not None:
            if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, *self.mask_input_hw):
                raise ValueError(
                    f"masks must have shape (B, 1, {self.mask_input_hw[0]}, "
                    f"{self.mask_input_hw[1]}), got {tuple(masks.shape)}"
                )
            dense = self.mask_downscaling(masks).expand(batch, -1, -1, -1)
        else:
            h, w = self.image_embedding_hw
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Point tokens ``B x N (+1) x C``; a padding token is appended when ``pad``."""
        if coords.ndim != 3 or coords.shape[-1] != 2:
            raise ValueError(f"point coords must have shape (B, N, 2), got {tuple(coords.shape)}")
        if tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(
                f"point labels must have shape {tuple(coords.shape[:2])} (B, N), "
                f"got {tuple(labels.shape)}"
            )
        coords = coords + 0.5  # pixel centres
        if pad:
            b = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), _PADDING_LABEL)], dim=1)
        weight = self.not_a_point_embed.weight  # 1 x C
        enc = self.pe_layer.encode_pixels(coords, self.input_image_hw).to(weight.dtype)
        kind = labels[..., None]  # B x N x 1
        enc = torch.where(kind == _PADDING_LABEL, weight, enc)
        neg = self.point_embeddings[_NEGATIVE].weight
        pos = self.point_embeddings[_POSITIVE].weight
        return enc + torch.where(kind == 0, neg, torch.where(kind == 1, pos, 0.0))

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Corner tokens ``B x 2 x C`` (top-left, bottom-right)."""
        if boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # B x 2 x 2, pixel centres
        weight = self.point_embeddings[_BOX_TOP_LEFT].weight
        enc = self.pe_layer.encode_pixels(corners, self.input_image_hw).to(weight.dtype)
        corner_kinds = torch.cat([weight, self.point_embeddings[_BOX_BOTTOM_RIGHT].weight])
        return enc + corner_kinds  # B x 2 x C


def _batch_size(
    points: tuple[torch.Tensor, torch.Tensor] | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
) -> int:
    """Batch size implied by the prompts (1 without any); checks they agree."""
    sizes: dict[str, int] = {}
    if points is not None:
        sizes["points"] = points[0].shape[0]
    if boxes is not None:
        sizes["boxes"] = boxes.numel() // 4
    if masks is not None and (masks.shape[0] != 1 or not sizes):
        sizes["masks"] = masks.shape[0]  # a single mask broadcasts over the prompts
    if len(set(sizes.values())) > 1:
        raise ValueError(f"prompt batch sizes must agree, got {sizes}")
    return next(iter(sizes.values()), 1)
