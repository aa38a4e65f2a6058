"""Build the reference implementation (``segment_anything`` / ``mobile_sam``) for a config.

Used only as a test oracle: the reference packages are test dependencies,
never runtime ones. ``reference_for(model)`` builds the reference model of
the same architecture and copies our weights into it (keys must match
exactly, both ways, so ``strict=True``).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from napari_sam.registry import ModelConfig, TinyViTConfig


def build_reference(config: ModelConfig) -> torch.nn.Module:
    """Reference ``Sam`` with the architecture of ``config`` (random weights)."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    enc = config.encoder
    dim = config.prompt_embed_dim
    if isinstance(enc, TinyViTConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from mobile_sam.modeling.tiny_vit_sam import TinyViT

        image_encoder = TinyViT(
            img_size=config.img_size,
            in_chans=3,
            num_classes=1000,
            embed_dims=list(enc.embed_dims),
            depths=list(enc.depths),
            num_heads=list(enc.num_heads),
            window_sizes=list(enc.window_sizes),
            mlp_ratio=enc.mlp_ratio,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=enc.mbconv_expand_ratio,
            local_conv_size=enc.local_conv_size,
            layer_lr_decay=0.8,
        )
    else:
        image_encoder = ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=config.img_size,
            mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=enc.global_attn_indexes,
            window_size=enc.window_size,
            out_chans=dim,
        )
    dec = config.decoder
    side = config.img_size // config.patch_size
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(side, side),
            input_image_size=(config.img_size, config.img_size),
            mask_in_chans=dec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=dec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth,
                embedding_dim=dim,
                mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_num_heads,
            ),
            transformer_dim=dim,
            iou_head_depth=dec.iou_head_depth,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    ).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values (zero-initialised ones included).

    The official initialisation leaves positional embeddings and relative
    positions at zero, which would let a parity test pass with those code
    paths wrong. Norm weights stay near one so activations keep their scale.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if name.endswith("weight") and p.ndim == 1:  # norm scales
            p.copy_(1.0 + 0.1 * noise)
        elif p.ndim == 1:  # biases
            p.copy_(0.02 * noise)
        else:
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(noise * min(std * 4, (1.0 / max(fan_in, 1)) ** 0.5))
    return model


def reference_for(model: torch.nn.Module) -> torch.nn.Module:
    """Reference model of ``model``'s architecture carrying ``model``'s weights."""
    ref = build_reference(model.config)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()
