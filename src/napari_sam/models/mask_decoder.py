"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU.

Learned output tokens (one IoU token and ``1 + num_multimask_outputs`` mask
tokens) are prepended to the prompt tokens and run through the two-way
transformer with the image tokens. The image tokens are upscaled 4x by
transposed convolutions; each mask token passes through its own
hypernetwork MLP and its dot product with every upscaled pixel gives that
mask's logits. The IoU token predicts one quality score per mask.

When every prompt of a batch shares the image embedding and the dense
prompt (no mask prompt, or one mask for all), the image side enters the
transformer once, not once per prompt: the first layer's image-side
projections are computed for one copy and broadcast (the same values as
repeating the embedding per prompt, as the reference does).

The two stride-2 transposed convolutions of the upscaling stack do not
overlap, so they run as matmuls on channels-last tokens (with a fused layer
norm between them) and the 4x4 sub-pixel layout is unfolded once, on the
mask logits; the arithmetic is the convolutions' (``output_upscaling`` keeps
the checkpoint's parameters).

Mask token 0 is the single-mask output (for unambiguous prompts); tokens
``1..`` are the multimask outputs (whole, part, subpart).

Parameter names match the official checkpoints (``iou_token``,
``mask_tokens``, ``output_upscaling.<i>``, ``output_hypernetworks_mlps.<i>``,
``iou_prediction_head``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._shared_image import (
    FactoredKeys,
    SharedImageWork,
    can_factor,
    factored_transformer,
    work_token,
)
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

    Attributes
    ----------
    share_image_work : bool
        Pass a shared image embedding to the transformer once (default True);
        False repeats it per prompt (the reference's arithmetic order).
    """

    share_image_work: bool = True

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
            Mask-prompt embedding (or the broadcast "no mask" embedding); a
            batch broadcast (stride 0) or batch 1 counts as shared.
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
        args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        masks, iou_pred, _ = self.forward_selected(*args, multimask_output)
        return masks, iou_pred

    def forward_selected(
        self,
        *inputs: torch.Tensor | bool,
        iou_above: float | None = None,
        image_work: SharedImageWork | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`, with mask logits only for prompts that have a confident mask.

        The IoU head needs only the transformer's output tokens; the
        upscaling stack and hypernetworks (a quarter of the decoder's work
        and most of its memory) run only for the prompts with at least one
        predicted IoU above ``iou_above``. The logits of those prompts are
        exactly what :meth:`forward` gives them.

        Parameters
        ----------
        *inputs
            The arguments of :meth:`forward`, in order: ``image_embeddings``,
            ``image_pe``, ``sparse_prompt_embeddings``,
            ``dense_prompt_embeddings``, ``multimask_output``.
        iou_above : float, optional
            Threshold on the predicted IoU; None computes every prompt's masks.
        image_work : SharedImageWork, optional
            Per-image products of the factored transformer
            (``models/_shared_image.py``), kept by a caller that decodes
            several batches against the same ``image_embeddings`` (it must
            hold one per embedding and dtype). Without it they are computed
            per call, and only for batches of more than one prompt.

        Returns
        -------
        low_res_masks : Tensor of shape (S, M, 4h, 4w)
            Mask logits of the selected prompts (all B when ``iou_above`` is None).
        iou_pred : Tensor of shape (B, M)
            Predicted IoU of each mask of every prompt.
        index : Tensor of shape (S,), int64, or None
            The selected prompts (None when ``iou_above`` is None).
        """
        image_embeddings, image_pe, sparse_prompt_embeddings, dense, multimask_output = inputs
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
        shared = dense.shape[0] == 1 or dense.stride(0) == 0
        first = 1 if multimask_output else 0
        count = self.num_multimask_outputs if multimask_output else 1
        chosen = range(first, first + count)
        hw = image_embeddings.shape[-2:]
        keys: torch.Tensor | FactoredKeys
        if self.share_image_work and shared and image_embeddings.shape[0] == 1:
            if can_factor(self.transformer, tokens.shape[1]) and (
                image_work is not None or batch > 1
            ):
                work = SharedImageWork() if image_work is None else image_work
                work.check(work_token(self, (image_embeddings, dense[:1], image_pe)))

                def shared_src() -> torch.Tensor:  # made only when work lacks it
                    return image_embeddings + dense[:1]

                hs, keys = factored_transformer(
                    self.transformer, shared_src, image_pe, tokens, work
                )
            else:
                src = image_embeddings + dense[:1]  # 1 x C x h x w, shared by every prompt
                hs, keys = self.transformer(src, image_pe, tokens)
        else:
            src = (image_embeddings + dense).expand(batch, -1, -1, -1)  # B x C x h x w
            hs, keys = self.transformer(src, image_pe, tokens)  # B x (T+K) x C, (1|B) x hw x C
        if not isinstance(keys, FactoredKeys):
            keys = keys.expand(batch, -1, -1)
        iou_pred = self.iou_prediction_head(hs[:, 0])[:, chosen]  # B x M
        index = self._confident(iou_pred, iou_above)
        if index is not None:
            hs, keys = hs[index], keys[index]
        if hs.shape[0] == 0:
            return hs.new_zeros(0, count, *(4 * n for n in hw)), iou_pred, index
        if isinstance(keys, FactoredKeys):
            first_up = keys.project(*keys.work.get("up1 weights", self._up1_weights), "up1")
        else:
            first_up = _stride2_transposed_conv(keys, self.output_upscaling[0])
        return self._masks(hs, first_up, hw, chosen), iou_pred, index

    @staticmethod
    def _confident(iou_pred: torch.Tensor, iou_above: float | None) -> torch.Tensor | None:
        """Prompts with a mask above ``iou_above`` (None: no selection)."""
        if iou_above is None:
            return None
        return torch.nonzero((iou_pred > iou_above).any(dim=1)).flatten()

    def _up1_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first transposed convolution as a linear map: ``(4 C/4) x C`` weight and bias."""
        conv = self.output_upscaling[0]
        c_in, c_out = conv.weight.shape[:2]
        weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)  # (a, c, out) x in
        return weight, conv.bias.repeat(4)

    def _masks(
        self, hs: torch.Tensor, first_up: torch.Tensor, hw: tuple[int, int], chosen: range
    ) -> torch.Tensor:
        """Mask logits ``S x M x 4h x 4w`` from output tokens and the first upscaling.

        Parameters
        ----------
        hs : Tensor of shape (S, T, C)
            Output tokens of the transformer.
        first_up : Tensor of shape (S, h * w, 4 * C / 4)
            The first transposed convolution of the image tokens (before its
            norm), as :func:`_stride2_transposed_conv` lays it out.
        hw : (int, int)
        chosen : range
            Mask tokens to decode.
        """
        batch, (h, w), count = hs.shape[0], hw, len(chosen)
        upscaled = self._upscale_rest(first_up)  # S x (hw * 16) x C/8, sub-pixel order
        hyper = torch.stack(
            [self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in chosen], dim=1
        )  # S x M x C/8
        masks = upscaled @ hyper.transpose(1, 2)  # S x (hw * 16) x M
        # (i, j, a1, c1, a2, c2) -> row 4i + 2a1 + a2, column 4j + 2c1 + c2
        masks = masks.view(batch, h, w, 2, 2, 2, 2, count).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(batch, count, 4 * h, 4 * w)

    def _upscale_rest(self, first_up: torch.Tensor) -> torch.Tensor:
        """``output_upscaling`` after its first convolution, on channels-last tokens.

        Parameters
        ----------
        first_up : Tensor of shape (B, h * w, 4 * C / 4) or (B, h * w, 4, C / 4)
            The first transposed convolution's output.

        Returns
        -------
        Tensor of shape (B, h * w * 16, C / 8)
            Upscaled features; pixel ``(4i + 2a1 + a2, 4j + 2c1 + c2)`` sits at
            index ``(((i * w + j) * 2 + a1) * 2 + c1) * 4 + a2 * 2 + c2``.
        """
        _, norm, act1, up2, act2 = self.output_upscaling
        x = first_up.unflatten(-1, (4, -1)) if first_up.ndim == 3 else first_up
        x = act1(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
        x = _stride2_transposed_conv(x.flatten(1, 2), up2)  # B x 4hw x 4 x C/8
        return act2(x).flatten(1, 2)


def _stride2_transposed_conv(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A ``kernel_size=2, stride=2`` transposed convolution on channels-last tokens.

    Parameters
    ----------
    x : Tensor of shape (B, N, C_in)
        Input pixels, channels last.
    conv : nn.ConvTranspose2d
        Weight ``C_in x C_out x 2 x 2`` and bias ``C_out``.

    Returns
    -------
    Tensor of shape (B, N, 4, C_out)
        For every input pixel, its four output pixels ``(a, c)`` in order
        ``2a + c`` (output pixel ``(2y + a, 2x + c)``).
    """
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)  # (a, c, out) x in
    bias = conv.bias.repeat(4)
    return F.linear(x, weight, bias).unflatten(-1, (4, c_out))
