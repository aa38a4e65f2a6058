"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU.

Learned output tokens (one IoU token and ``1 + num_multimask_outputs`` mask
tokens) are prepended to the prompt tokens and run through the two-way
transformer with the image tokens. The image tokens are upscaled 4x by
transposed convolutions; each mask token passes through its own
hypernetwork MLP and its dot product with every upscaled pixel gives that
mask's logits. The IoU token predicts one quality score per mask.

Mask token 0 is the single-mask output (for unambiguous prompts); tokens
``1..`` are the multimask outputs (whole, part, subpart).

Parameter names match the official checkpoints (``iou_token``,
``mask_tokens``, ``output_upscaling.<i>``, ``output_hypernetworks_mlps.<i>``,
``iou_prediction_head``).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d

__all__ = ["MaskDecoder"]


class MaskDecoder(nn.Module):
    """Predict masks and their IoU from image and prompt embeddings.

    Parameters
    ----------
    transformer_dim : int
        Token and embedding width ``C`` (divisible by 8).
    transformer : nn.Module
        A :class:`~napari_sam.models.transformer.TwoWayTransformer` (or a
        module with the same call signature).
    num_multimask_outputs : int, optional
        Masks returned for an ambiguous prompt. Default 3.
    iou_head_depth : int, optional
        Linear layers in the IoU head. Default 3.
    iou_head_hidden_dim : int, optional
        Hidden width of the IoU head. Default 256.
    activation : type of nn.Module, optional
        Activation in the upscaling stack. Default ``nn.GELU``.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if transformer_dim % 8:
            raise ValueError(f"transformer_dim must be divisible by 8, got {transformer_dim}")
        if num_multimask_outputs < 1:
            raise ValueError(f"num_multimask_outputs must be >= 1, got {num_multimask_outputs}")
        dim = transformer_dim
        self.transformer_dim = dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1

        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),  # h -> 2h
            LayerNorm2d(dim // 4),
            activation(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),  # 2h -> 4h
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for a batch of prompts on one image.

        Parameters
        ----------
        image_embeddings : Tensor of shape (1, C, h, w)
            Image encoder output (batch 1 is shared by all prompts; batch B
            pairs one embedding with each prompt).
        image_pe : Tensor of shape (1, C, h, w)
            Dense positional encoding (``PromptEncoder.get_dense_pe()``).
        sparse_prompt_embeddings : Tensor of shape (B, K, C)
            Point and box tokens.
        dense_prompt_embeddings : Tensor of shape (B, C, h, w)
            Mask-prompt embedding (or the broadcast "no mask" embedding).
        multimask_output : bool
            Return the ``num_multimask_outputs`` ambiguity-aware masks instead
            of the single-mask output.

        Returns
        -------
        low_res_masks : Tensor of shape (B, M, 4h, 4w)
            Mask logits; ``M = num_multimask_outputs`` or 1.
        iou_pred : Tensor of shape (B, M)
            Predicted IoU of each mask.
        """
        batch = sparse_prompt_embeddings.shape[0]
        if image_embeddings.ndim != 4 or image_embeddings.shape[0] not in (1, batch):
            raise ValueError(
                f"image_embeddings must have shape (1, C, h, w) or ({batch}, C, h, w), "
                f"got {tuple(image_embeddings.shape)}"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # T x C
        tokens = torch.cat(
            [output_tokens.expand(batch, -1, -1), sparse_prompt_embeddings], dim=1
        )  # B x (T + K) x C
        src = (image_embeddings + dense_prompt_embeddings).expand(batch, -1, -1, -1)
        _, c, h, w = src.shape

        hs, keys = self.transformer(src, image_pe, tokens)  # B x (T+K) x C, B x hw x C
        first = 1 if multimask_output else 0
        count = self.num_multimask_outputs if multimask_output else 1
        chosen = range(first, first + count)

        grid = keys.transpose(1, 2).reshape(batch, c, h, w)
        upscaled = self.output_upscaling(grid)  # B x C/8 x 4h x 4w
        hyper = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in chosen], dim=1
        )  # B x M x C/8
        masks = hyper @ upscaled.flatten(2)  # B x M x 16hw
        masks = masks.view(batch, count, *upscaled.shape[2:])

        iou_pred = self.iou_prediction_head(hs[:, 0])  # B x (1 + num_multimask_outputs)
        return masks, iou_pred[:, first : first + count]
