"""ViT image encoder: parity with the reference, windows, relative positions, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_sam.models.image_encoder import (
    ImageEncoderViT,
    decomposed_rel_pos_bias,
    merge_windows,
    split_windows,
)
from napari_sam.registry import MODEL_CONFIGS, ViTConfig, build_model

from .._reference import randomize_, reference_for

RTOL, ATOL = 1e-4, 1e-5


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL * max(1.0, scale))


def _tiny_variant(**encoder_changes) -> object:
    base = MODEL_CONFIGS["tiny_vit_b"]
    img_size = encoder_changes.pop("img_size", base.img_size)
    encoder = dataclasses.replace(base.encoder, **encoder_changes)
    return dataclasses.replace(base, name="variant", encoder=encoder, img_size=img_size)


@torch.no_grad()
def test_tiny_features_match_reference(tiny_model):
    ref = reference_for(tiny_model)
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ours = tiny_model.image_encoder(images)
    assert ours.shape == (2, 32, 8, 8)
    _assert_matches(ours, ref.image_encoder(images))


@pytest.mark.parametrize(
    ("img_size", "patch_size", "window_size", "grid"),
    [
        (256, 8, 4, 32),  # patch 8, as the demo model
        (128, 16, 3, 8),  # 8 tokens per side: windows padded to 9
        (160, 16, 14, 10),  # window larger than the grid: one padded window
    ],
)
@torch.no_grad()
def test_non_default_geometry_builds_and_matches(img_size, patch_size, window_size, grid):
    config = _tiny_variant(img_size=img_size, patch_size=patch_size, window_size=window_size)
    model = randomize_(build_model(config), seed=2)
    assert model.config.embedding_hw == (grid, grid)
    images = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(4))
    ours = model.image_encoder(images)
    assert ours.shape == (1, 32, grid, grid)
    _assert_matches(ours, reference_for(model).image_encoder(images))


def test_window_split_merge_round_trip_with_padding():
    tokens = torch.randn(2, 5, 7, 3)
    windows, padded_hw = split_windows(tokens, 3)
    assert padded_hw == (6, 9)
    assert windows.shape == (2 * 2 * 3, 3, 3, 3)
    # Window (image 0, row 0, col 1) holds tokens [0:3, 3:6].
    torch.testing.assert_close(windows[1], tokens[0, 0:3, 3:6], rtol=0, atol=0)
    # The bottom-right window of image 1 is zero where it covers padding.
    last = windows[-1]
    assert torch.equal(last[2:], torch.zeros_like(last[2:]))
    assert torch.equal(last[:, 1:], torch.zeros_like(last[:, 1:]))
    assert torch.equal(merge_windows(windows, 3, padded_hw, (5, 7)), tokens)


def test_rel_pos_bias_matches_definition():
    gen = torch.Generator().manual_seed(0)
    h, w, d = 3, 4, 5
    q = torch.randn(2, 2, h * w, d, generator=gen)
    table_h = torch.randn(2 * h - 1, d, generator=gen)
    table_w = torch.randn(2 * w - 1, d, generator=gen)
    bias = decomposed_rel_pos_bias(q, table_h, table_w, (h, w))
    assert bias.shape == (2, 2, h * w, h * w)
    expected = torch.empty_like(bias)
    for i in range(h * w):
        qi, qj = divmod(i, w)
        for k in range(h * w):
            ki, kj = divmod(k, w)
            row_term = q[:, :, i] @ table_h[qi - ki + h - 1]
            col_term = q[:, :, i] @ table_w[qj - kj + w - 1]
            expected[:, :, i, k] = row_term + col_term
    torch.testing.assert_close(bias, expected)


def _small_encoder() -> ImageEncoderViT:
    """64 px, 4 x 4 tokens: a windowed, a global and a windowed block (windows of 2)."""
    return ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=16,
        depth=3,
        num_heads=2,
        out_chans=8,
        global_attn_indexes=(1,),
        window_size=2,
    )


def test_block_kinds_follow_global_attn_indexes():
    encoder = _small_encoder()
    assert [b.window for b in encoder.blocks] == [2, 0, 2]
    assert encoder.blocks[1].attn.rel_pos_h.shape == (7, 8)  # 2 * 4 - 1 rows
    assert encoder.blocks[0].attn.rel_pos_h.shape == (3, 8)  # 2 * 2 - 1 rows


def test_the_residual_stream_is_contiguous_through_every_block():
    """The blocks add into the stream in place, so the patch embedding's layout lasts:
    a channels-strided view (the conv's output permuted) made norms and adds 5-10x slower."""
    encoder = _small_encoder().eval()
    images = torch.randn(1, 3, 64, 64)
    assert encoder.patch_embed(images).is_contiguous()
    layouts = []
    for block in encoder.blocks:
        block.register_forward_pre_hook(lambda _m, args: layouts.append(args[0].is_contiguous()))
    with torch.inference_mode():
        encoder(images)
    assert layouts == [True, True, True]  # windowed, global, windowed


def test_wrong_input_size_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 128, 128\), got"):
        tiny_model.image_encoder(torch.zeros(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_size": 24}, "patch_size must be a positive divisor of img_size=128, got 24"),
        ({"num_heads": 3}, "num_heads must be a positive divisor of embed_dim=32, got 3"),
        ({"global_attn_indexes": (2,)}, r"global_attn_indexes must lie in \[0, depth=2\)"),
        ({"window_size": -1}, "window_size must be >= 0, got -1"),
    ],
)
def test_invalid_arguments_are_named(changes, message):
    kwargs = {
        "img_size": 128,
        "patch_size": 16,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 4.0,
        "out_chans": 32,
        "global_attn_indexes": (1,),
        "window_size": 4,
    }
    with pytest.raises(ValueError, match=message):
        ImageEncoderViT(**{**kwargs, **changes})


@pytest.mark.slow
@torch.no_grad()
def test_vit_b_1024_features_match_reference():
    assert isinstance(MODEL_CONFIGS["vit_b"].encoder, ViTConfig)
    torch.manual_seed(0)
    model = randomize_(build_model("vit_b"), seed=0)
    ref = reference_for(model)
    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    ours = model.image_encoder(images)
    assert ours.shape == (1, 256, 64, 64)
    _assert_matches(ours, ref.image_encoder(images))
