"""Mask decoder: the shared-image path (one copy of the image side) equals the plain path."""

from __future__ import annotations

import pytest
import torch

RTOL, ATOL = 1e-5, 1e-6


def _prompts(model, batch: int, mask: str):
    gen = torch.Generator().manual_seed(batch)
    coords = torch.rand(batch, 2, 2, generator=gen) * 127
    labels = torch.tensor([[1, 0]] * batch)
    masks = {
        "none": None,
        "shared": torch.randn(1, 1, 32, 32, generator=gen),
        "per_prompt": torch.randn(batch, 1, 32, 32, generator=gen),
    }[mask]
    return model.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)


def _decode(model, features, sparse, dense, multimask, share):
    decoder = model.mask_decoder
    decoder.share_image_work = share
    try:
        pe = model.prompt_encoder.get_dense_pe()
        return decoder(features, pe, sparse, dense, multimask)
    finally:
        del decoder.share_image_work  # back to the class default


@pytest.mark.parametrize("mask", ["none", "shared", "per_prompt"])
@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_shared_path_equals_plain_path(tiny_model, mask, multimask):
    sparse, dense = _prompts(tiny_model, 5, mask)
    features = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(2))
    shared = _decode(tiny_model, features, sparse, dense, multimask, True)
    plain = _decode(tiny_model, features, sparse, dense, multimask, False)
    for got, expected in zip(shared, plain, strict=True):
        assert got.shape == expected.shape and got.shape[0] == 5
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL * max(1.0, scale))


@pytest.mark.parametrize(("mask", "image_batch"), [("none", 1), ("shared", 1), ("per_prompt", 4)])
@torch.no_grad()
def test_image_side_enters_the_transformer_once_when_shared(tiny_model, mask, image_batch):
    seen = []
    transformer = tiny_model.mask_decoder.transformer
    hook = transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        sparse, dense = _prompts(tiny_model, 4, mask)
        features = torch.randn(1, 32, 8, 8)
        pe = tiny_model.prompt_encoder.get_dense_pe()
        masks, _ = tiny_model.mask_decoder(features, pe, sparse, dense, True)
    finally:
        hook.remove()
    assert seen == [image_batch]
    assert masks.shape == (4, 3, 32, 32)


@torch.no_grad()
def test_attention_matmul_and_fused_paths_agree(monkeypatch):
    from napari_sam.models import transformer

    torch.manual_seed(3)
    attention = transformer.Attention(32, 4, downsample_rate=2)
    queries = torch.randn(3, 100, 32)
    image = torch.randn(1, 80, 32)  # a shared batch of one, broadcast over three prompts
    fused = attention(queries, image, image)  # 80 and 100 tokens: the fused kernel
    monkeypatch.setattr(transformer, "_SMALL_SIDE", 1000)
    plain = attention(queries, image, image)
    assert fused.shape == plain.shape == (3, 100, 32)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_forward_selected_computes_only_confident_prompts(tiny_model, multimask):
    sparse, dense = _prompts(tiny_model, 6, "none")
    features = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    pe = tiny_model.prompt_encoder.get_dense_pe()
    decoder = tiny_model.mask_decoder
    full, iou = decoder(features, pe, sparse, dense, multimask)
    threshold = float(iou.max(dim=1).values.median())  # about half the prompts pass
    calls = []
    real_upscale = decoder._upscale_rest
    decoder._upscale_rest = lambda x: calls.append(x.shape[0]) or real_upscale(x)
    try:
        masks, iou_sel, index = decoder.forward_selected(
            features, pe, sparse, dense, multimask, iou_above=threshold
        )
    finally:
        del decoder._upscale_rest
    expected = torch.nonzero((iou > threshold).any(dim=1)).flatten()
    assert 0 < len(expected) < 6
    torch.testing.assert_close(index, expected)
    torch.testing.assert_close(iou_sel, iou)
    torch.testing.assert_close(masks, full[expected])
    assert calls == [len(expected)]  # the upscaling stack ran for the selected prompts only
    none, _, no_index = decoder.forward_selected(
        features, pe, sparse, dense, multimask, iou_above=float(iou.max()) + 1
    )
    assert none.shape == (0, full.shape[1], *full.shape[2:]) and no_index.numel() == 0


@pytest.mark.parametrize(("q_batch", "k_batch"), [(3, 3), (1, 3), (3, 1)])
@torch.no_grad()
def test_image_to_token_fold_matches_plain_attention(q_batch, k_batch):
    """The few-keys path (values projected first, bias and residual fused) equals the plain
    formula ``residual + out_proj(softmax(q k^T / sqrt(d)) v)`` for every batch layout."""
    from napari_sam.models import transformer

    torch.manual_seed(4)
    attention = transformer.Attention(64, 8, downsample_rate=2)  # 8 heads x 3 keys < 32 inner
    image = torch.randn(q_batch, 200, 64)
    pe = torch.randn(1, 200, 64)
    tokens = torch.randn(k_batch, 3, 64)
    residual = torch.randn(q_batch, 200, 64)
    got = attention(image, tokens, tokens, q_pe=pe, residual=residual)
    q = attention.q_proj(image + pe).view(q_batch, 200, 8, 4).transpose(1, 2)
    k = attention.k_proj(tokens).view(k_batch, 3, 8, 4).transpose(1, 2)
    v = attention.v_proj(tokens).view(k_batch, 3, 8, 4).transpose(1, 2)
    heads = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v  # d = 4
    batch = max(q_batch, k_batch)
    want = residual + attention.out_proj(heads.transpose(1, 2).reshape(batch, 200, 32))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
