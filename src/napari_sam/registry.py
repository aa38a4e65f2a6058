"""Frozen model configurations and the model builder.

Every model the plugin can build is described by a :class:`ModelConfig` in
:data:`MODEL_CONFIGS`. Official configurations (``vit_b``, ``vit_l``,
``vit_h``, ``vit_t``) reproduce the released Segment Anything and MobileSAM
architectures exactly, so their checkpoints load with ``strict=True``. The
``tiny_*`` configurations use the same modules at a toy size; they build in
milliseconds and serve the test-suite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .models.sam import Sam

PIXEL_MEAN_RGB = (123.675, 116.28, 103.53)
PIXEL_STD_RGB = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViTConfig:
    """SAM's ViT image encoder (windowed attention, decomposed relative positions)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM's TinyViT image encoder."""

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3


@dataclass(frozen=True)
class DecoderConfig:
    """Prompt encoder and mask decoder sizes (shared by all SAM variants)."""

    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one SAM-family model.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"vit_b"``.
    encoder : ViTConfig or TinyViTConfig
        The image encoder.
    img_size : int
        Side of the square model input in pixels (1024 for official models).
    prompt_embed_dim : int
        Channels of the image embedding, prompt tokens and decoder.
    decoder : DecoderConfig
        Prompt encoder / mask decoder sizes.
    """

    name: str
    encoder: ViTConfig | TinyViTConfig
    img_size: int = 1024
    prompt_embed_dim: int = 256
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN_RGB
    pixel_std: tuple[float, float, float] = PIXEL_STD_RGB

    @property
    def patch_size(self) -> int:
        """Pixels per embedding cell (16 for every official model)."""
        if isinstance(self.encoder, ViTConfig):
            return self.encoder.patch_size
        return 16  # TinyViT downsamples by 4 x 2 x 2 before the neck

    @property
    def embedding_hw(self) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the image embedding."""
        side = self.img_size // self.patch_size
        return (side, side)


_TINY_DECODER = DecoderConfig(
    transformer_mlp_dim=64,
    transformer_num_heads=4,
    iou_head_hidden_dim=32,
    mask_in_chans=4,
)

MODEL_CONFIGS: dict[str, ModelConfig] = {
    "vit_b": ModelConfig(
        "vit_b", ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))
    ),
    "vit_l": ModelConfig(
        "vit_l",
        ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    ),
    "vit_h": ModelConfig(
        "vit_h",
        ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    ),
    "vit_t": ModelConfig("vit_t", TinyViTConfig()),
    # Toy sizes of the same modules, for tests: build in well under a second.
    "tiny_vit_b": ModelConfig(
        "tiny_vit_b",
        ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4),
        img_size=128,
        prompt_embed_dim=32,
        decoder=_TINY_DECODER,
    ),
    # MobileSAM's reference keeps stride 1 in the last patch merging only when its
    # output width is 320/448/576, and its neck is fixed at 256 channels: a tiny
    # config that the reference can mirror needs embed_dims[-1] = 320 and 256 here.
    "tiny_vit_t": ModelConfig(
        "tiny_vit_t",
        TinyViTConfig(
            embed_dims=(8, 16, 24, 320),
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 3, 4),
            window_sizes=(4, 4, 4, 2),
        ),
        img_size=128,
        prompt_embed_dim=256,
        decoder=_TINY_DECODER,
    ),
    # The small model trained on synthetic microscopy that ships with the package
    # (napari_sam/data/demo_sam.pt; see docs/demo-model.md and scripts/train_demo.py).
    "demo": ModelConfig(
        "demo",
        ViTConfig(
            embed_dim=128,
            depth=4,
            num_heads=4,
            global_attn_indexes=(1, 3),
            patch_size=8,
            window_size=8,
        ),
        img_size=256,
        prompt_embed_dim=128,
        decoder=DecoderConfig(
            transformer_mlp_dim=512,
            transformer_num_heads=4,
            iou_head_hidden_dim=128,
            mask_in_chans=16,
        ),
    ),
}


def get_config(name: str) -> ModelConfig:
    """Return the registered configuration called ``name``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the known names.
    """
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def build_model(
    name: str | ModelConfig,
    *,
    checkpoint: str | Path | dict[str, torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> Sam:
    """Build a SAM-family model, optionally loading weights.

    Parameters
    ----------
    name : str or ModelConfig
        A key of :data:`MODEL_CONFIGS` or a configuration.
    checkpoint : path or state dict, optional
        Weights to load with ``strict=True`` (official checkpoint layout).
        A path is read safely (``weights_only=True``) and validated.
    device : str or torch.device
        Where the model lives. Default ``"cpu"``.

    Returns
    -------
    Sam
        The model in eval mode.
    """
    from .models.sam import build_sam

    config = get_config(name) if isinstance(name, str) else name
    model = build_sam(config)
    if checkpoint is not None:
        from .weights import load_state_dict_into, read_state_dict

        state = checkpoint if isinstance(checkpoint, dict) else read_state_dict(checkpoint)
        source = "state dict" if isinstance(checkpoint, dict) else str(checkpoint)
        load_state_dict_into(model, state, source=source)
    return model.to(device).eval()
