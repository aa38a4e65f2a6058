"""State-dict layout: identical keys and shapes to the reference ``segment_anything``.

Official checkpoints are the reference's state dicts, so equality here is
what lets ``sam_vit_{b,l,h}_*.pth`` load with ``strict=True``. Full-size
models are built on the ``meta`` device (no memory, milliseconds).
"""

from __future__ import annotations

import pytest
import torch

from napari_sam.models.sam import build_sam
from napari_sam.registry import MODEL_CONFIGS, ViTConfig

from .._reference import build_reference, randomize_

VIT_NAMES = sorted(n for n, c in MODEL_CONFIGS.items() if isinstance(c.encoder, ViTConfig))


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_vit_configs_are_covered():
    assert {"vit_b", "vit_l", "vit_h", "tiny_vit_b"} <= set(VIT_NAMES)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_keys_and_shapes_match_reference(name):
    config = MODEL_CONFIGS[name]
    with torch.device("meta"):
        ours = _shapes(build_sam(config))
        ref = _shapes(build_reference(config))
    missing = sorted(set(ref) - set(ours))
    unexpected = sorted(set(ours) - set(ref))
    assert not missing, f"keys the reference has and we lack: {missing[:10]}"
    assert not unexpected, f"keys we have and the reference lacks: {unexpected[:10]}"
    wrong = {k: (ours[k], ref[k]) for k in ours if ours[k] != ref[k]}
    assert not wrong, f"shape mismatches (ours, reference): {wrong}"


@pytest.mark.parametrize(
    "key",
    [
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.blocks.0.attn.rel_pos_h",
        "image_encoder.blocks.11.attn.rel_pos_w",
        "image_encoder.neck.0.weight",
        "image_encoder.neck.3.bias",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.point_embeddings.3.weight",
        "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.mask_downscaling.6.weight",
        "prompt_encoder.no_mask_embed.weight",
        "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
        "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias",
        "mask_decoder.transformer.final_attn_token_to_image.k_proj.weight",
        "mask_decoder.transformer.norm_final_attn.weight",
        "mask_decoder.output_upscaling.3.weight",
        "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
        "mask_decoder.iou_prediction_head.layers.2.bias",
    ],
)
def test_official_key_names_present(key):
    with torch.device("meta"):
        keys = build_sam(MODEL_CONFIGS["vit_b"]).state_dict()
    assert key in keys


def test_vit_b_global_blocks_have_full_grid_tables():
    with torch.device("meta"):
        state = build_sam(MODEL_CONFIGS["vit_b"]).state_dict()
    # Global blocks (2, 5, 8, 11) span the 64 x 64 grid; windowed ones 14 x 14.
    assert state["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)


def test_pixel_stats_are_not_in_the_state_dict():
    with torch.device("meta"):
        keys = build_sam(MODEL_CONFIGS["tiny_vit_b"]).state_dict()
    assert not any(k.startswith("pixel_") for k in keys)


def test_reference_weights_load_strictly_into_ours():
    config = MODEL_CONFIGS["tiny_vit_b"]
    ref = randomize_(build_reference(config), seed=3)
    ours = build_sam(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    theirs = ref.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key
