"""The SAM container: image encoder + prompt encoder + mask decoder.

The container holds the three parts and the pixel normalisation; it has no
forward pass of its own and no state about an image. Running the parts is
the job of :mod:`napari_sam.predict` and :mod:`napari_sam.automatic`.
State-dict keys are those of the official checkpoints
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..registry import ModelConfig


class Sam(nn.Module):
    """Segment Anything model parts, composed by injection.

    Parameters
    ----------
    image_encoder : nn.Module
        Maps ``B x 3 x S x S`` normalised images to ``B x C x h x w`` embeddings.
    prompt_encoder : PromptEncoder
        Embeds points, boxes and low-res mask prompts.
    mask_decoder : MaskDecoder
        Predicts masks and IoU scores from embeddings and prompt tokens.
    config : ModelConfig
        The configuration the model was built from.
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
        # Not persistent: the official checkpoints do not store them.
        self.register_buffer(
            "pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False
        )

    @property
    def img_size(self) -> int:
        """Side of the square model input in pixels."""
        return self.config.img_size

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return self.pixel_mean.device


def build_sam(config: ModelConfig) -> Sam:
    """Build an untrained :class:`Sam` from a configuration.

    Parameters
    ----------
    config : ModelConfig
        Architecture to build.

    Returns
    -------
    Sam
        Randomly initialised model (reference-compatible parameter names).
    """
    from .mask_decoder import MaskDecoder
    from .prompt_encoder import PromptEncoder
    from .transformer import TwoWayTransformer

    image_encoder = build_image_encoder(config)
    dim = config.prompt_embed_dim
    dec = config.decoder
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_hw=config.embedding_hw,
        input_image_hw=(config.img_size, config.img_size),
        mask_in_chans=dec.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=dim,
        transformer=TwoWayTransformer(
            depth=dec.transformer_depth,
            embedding_dim=dim,
            num_heads=dec.transformer_num_heads,
            mlp_dim=dec.transformer_mlp_dim,
        ),
        num_multimask_outputs=dec.num_multimask_outputs,
        iou_head_depth=dec.iou_head_depth,
        iou_head_hidden_dim=dec.iou_head_hidden_dim,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder, config)


def build_image_encoder(config: ModelConfig) -> nn.Module:
    """Build the untrained image encoder (ViT or TinyViT) of a configuration.

    Parameters
    ----------
    config : ModelConfig
        Architecture to build; its ``prompt_embed_dim`` is the encoder's output width.

    Returns
    -------
    nn.Module
        Maps ``B x 3 x S x S`` normalised images to ``B x C x S/p x S/p`` embeddings.
    """
    from ..registry import TinyViTConfig, ViTConfig

    enc = config.encoder
    dim = config.prompt_embed_dim
    if isinstance(enc, ViTConfig):
        from .image_encoder import ImageEncoderViT

        return ImageEncoderViT(
            img_size=config.img_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=dim,
            global_attn_indexes=enc.global_attn_indexes,
            window_size=enc.window_size,
        )
    if isinstance(enc, TinyViTConfig):
        from .tiny_vit import TinyViT

        return TinyViT(
            img_size=config.img_size,
            embed_dims=enc.embed_dims,
            depths=enc.depths,
            num_heads=enc.num_heads,
            window_sizes=enc.window_sizes,
            mlp_ratio=enc.mlp_ratio,
            mbconv_expand_ratio=enc.mbconv_expand_ratio,
            local_conv_size=enc.local_conv_size,
            out_chans=dim,
        )
    raise TypeError(f"unsupported encoder config {type(enc).__name__}")
