"""Mask decoder and two-way transformer: parity with the reference, selection, errors."""

from __future__ import annotations

import pytest
import torch

from .._reference import reference_for

RTOL, ATOL = 1e-4, 1e-5


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=ATOL * max(1.0, scale))


def _embedding(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(seed))


def _prompts(batch: int, with_mask: bool) -> dict:
    gen = torch.Generator().manual_seed(batch)
    corner = torch.rand(batch, 2, generator=gen) * 60
    boxes = torch.cat([corner, corner + 40], dim=1)
    coords = torch.rand(batch, 2, 2, generator=gen) * 127
    labels = torch.tensor([[1, 0]] * batch)
    masks = torch.randn(batch, 1, 32, 32, generator=gen) if with_mask else None
    return {"points": (coords, labels), "boxes": boxes, "masks": masks}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize(("batch", "with_mask"), [(1, False), (3, False), (3, True)])
@torch.no_grad()
def test_decoder_matches_reference(tiny_model, multimask, batch, with_mask):
    ref = reference_for(tiny_model)
    sparse, dense = tiny_model.prompt_encoder(**_prompts(batch, with_mask))
    pe = tiny_model.prompt_encoder.get_dense_pe()
    features = _embedding()
    masks, iou = tiny_model.mask_decoder(features, pe, sparse, dense, multimask)
    ref_masks, ref_iou = ref.mask_decoder(features, pe, sparse, dense, multimask)
    count = 3 if multimask else 1
    assert masks.shape == (batch, count, 32, 32)
    assert iou.shape == (batch, count)
    _assert_matches(masks, ref_masks)
    _assert_matches(iou, ref_iou)


@torch.no_grad()
def test_multimask_selects_tokens_one_to_three(tiny_model):
    ref = reference_for(tiny_model).mask_decoder
    sparse, dense = tiny_model.prompt_encoder(**_prompts(2, False))
    pe = tiny_model.prompt_encoder.get_dense_pe()
    features = _embedding(1)
    all_masks, all_iou = ref.predict_masks(features, pe, sparse, dense)  # 4 tokens
    multi, multi_iou = tiny_model.mask_decoder(features, pe, sparse, dense, True)
    single, single_iou = tiny_model.mask_decoder(features, pe, sparse, dense, False)
    _assert_matches(multi, all_masks[:, 1:])
    _assert_matches(single, all_masks[:, :1])
    _assert_matches(multi_iou, all_iou[:, 1:])
    _assert_matches(single_iou, all_iou[:, :1])


@pytest.mark.parametrize(
    "prompts",
    [
        {"points": (torch.tensor([[[40.0, 70.0]]]), torch.tensor([[1]])), "boxes": None},
        {"points": None, "boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]])},
        {
            "points": (torch.tensor([[[50.0, 60.0], [20.0, 20.0]]]), torch.tensor([[1, 0]])),
            "boxes": torch.tensor([[10.0, 20.0, 90.0, 100.0]]),
        },
    ],
)
@torch.no_grad()
def test_end_to_end_matches_reference(tiny_model, prompts):
    ref = reference_for(tiny_model)
    images = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(9))
    results = []
    for model in (tiny_model, ref):
        features = model.image_encoder(images)
        sparse, dense = model.prompt_encoder(**prompts, masks=None)
        pe = model.prompt_encoder.get_dense_pe()
        results.append(model.mask_decoder(features, pe, sparse, dense, True))
    (masks, iou), (ref_masks, ref_iou) = results
    _assert_matches(masks, ref_masks)
    _assert_matches(iou, ref_iou)


def test_transformer_first_layer_skips_pe(tiny_model):
    layers = tiny_model.mask_decoder.transformer.layers
    assert [layer.skip_first_layer_pe for layer in layers] == [True] + [False] * (len(layers) - 1)
    cross = layers[0].cross_attn_token_to_image
    assert cross.internal_dim == 16  # 32 // downsample rate 2
    assert layers[0].self_attn.internal_dim == 32


@torch.no_grad()
def test_transformer_matches_reference(tiny_model):
    ref = reference_for(tiny_model).mask_decoder.transformer
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 32, 8, 8, generator=gen)
    pe = torch.randn(1, 32, 8, 8, generator=gen)
    tokens = torch.randn(2, 7, 32, generator=gen)
    queries, keys = tiny_model.mask_decoder.transformer(image, pe, tokens)
    ref_queries, ref_keys = ref(image, pe.expand(2, -1, -1, -1), tokens)
    assert queries.shape == (2, 7, 32)
    assert keys.shape == (2, 64, 32)
    _assert_matches(queries, ref_queries)
    _assert_matches(keys, ref_keys)


def test_mismatched_image_batch_is_refused(tiny_model):
    sparse, dense = tiny_model.prompt_encoder(**_prompts(3, False))
    pe = tiny_model.prompt_encoder.get_dense_pe()
    features = torch.zeros(2, 32, 8, 8)
    with pytest.raises(ValueError, match=r"image_embeddings must have shape \(1, C, h, w\)"):
        tiny_model.mask_decoder(features, pe, sparse, dense, True)
