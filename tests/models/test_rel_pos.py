"""Relative-position attention: folded, chunked-mask and matmul forms equal the bias mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_sam.models import rel_pos
from napari_sam.models.image_encoder import ImageEncoderViT
from napari_sam.models.rel_pos import (
    biased_rel_pos_attention,
    decomposed_rel_pos_bias,
    folded_matmul_attention,
    folded_rel_pos_attention,
    rel_pos_attention,
)

FORMS = {
    "folded_sdpa": folded_rel_pos_attention,
    "biased_chunks": lambda *a: biased_rel_pos_attention(*a, rows=2),
    "biased_default": biased_rel_pos_attention,
    "folded_matmul": folded_matmul_attention,
}


def _inputs(hw, batch=2, heads=3, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, w = hw
    q, k, v = (torch.randn(batch, heads, h * w, dim, generator=gen) for _ in range(3))
    table_h = torch.randn(2 * h - 1, dim, generator=gen)
    table_w = torch.randn(2 * w - 1, dim, generator=gen)
    return tuple(t.to(dtype) for t in (q, k, v, table_h, table_w))


def _with_bias_mask(q, k, v, table_h, table_w, hw, scale):
    """The definition: explicit softmax of scaled logits plus the full bias."""
    bias = decomposed_rel_pos_bias(q, table_h, table_w, hw)
    logits = scale * q @ k.transpose(-1, -2) + bias
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (7, 2)])
def test_forms_equal_the_bias_mask(form, hw):
    q, k, v, th, tw = _inputs(hw)
    scale = q.shape[-1] ** -0.5
    expected = _with_bias_mask(q, k, v, th, tw, hw, scale)
    got = FORMS[form](q, k, v, th, tw, hw, scale)
    assert got.shape == expected.shape
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"{form}: relative error {err:.2e}"


def test_folded_form_matches_sdpa_with_the_bias_mask():
    hw = (6, 6)
    q, k, v, th, tw = _inputs(hw, dim=16, seed=3)
    scale = 0.25
    bias = decomposed_rel_pos_bias(q, th, tw, hw)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    got = folded_rel_pos_attention(q, k, v, th, tw, hw, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_chunked_mask_never_builds_the_full_bias(monkeypatch):
    hw = (8, 8)
    q, k, v, th, tw = _inputs(hw, seed=4)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append(tuple(attn_mask.shape))
        return real(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(rel_pos.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(rel_pos, "_CHUNK_BYTES", 2 * 3 * 8 * 64 * 4 * 3)  # three rows a chunk
    biased_rel_pos_attention(q, k, v, th, tw, hw, 0.3)
    assert seen == [(2, 3, 24, 64), (2, 3, 24, 64), (2, 3, 16, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forms_stay_close(dtype):
    hw = (8, 8)
    inputs32 = _inputs(hw, dim=16, seed=5)
    scale = 0.25
    expected = _with_bias_mask(*inputs32, hw, scale)
    half = tuple(t.to(dtype) for t in inputs32)
    for fold in (True, False):
        got = rel_pos_attention(*half, hw, scale, fold=fold).float()
        assert (got - expected).abs().max() / expected.abs().max() < 5e-2


@torch.no_grad()
def test_encoder_output_does_not_depend_on_the_form():
    encoder = ImageEncoderViT(
        img_size=80,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        out_chans=16,
        global_attn_indexes=(1,),
        window_size=3,
    ).eval()
    gen = torch.Generator().manual_seed(6)
    for p in encoder.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    images = torch.randn(1, 3, 80, 80, generator=gen)
    assert [b.attn.fold for b in encoder.blocks] == [True, False]  # 3+3 <= 16 < 10+10
    default = encoder(images)
    for block in encoder.blocks:
        block.attn.fold = True
    folded = encoder(images)
    torch.testing.assert_close(folded, default, rtol=1e-5, atol=1e-5 * float(default.abs().max()))


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_global_grid_takes_the_fused_kernel_only_with_amx(monkeypatch, amx):
    from napari_sam.models import rel_pos

    calls = []
    for name in ("folded_rel_pos_attention", "folded_matmul_attention"):
        real = getattr(rel_pos, name)
        monkeypatch.setattr(
            rel_pos, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    monkeypatch.setattr(rel_pos, "cpu_has_amx", lambda: amx)
    hw = (8, 8)
    inputs = tuple(t.to(torch.bfloat16) for t in _inputs(hw, dim=16, seed=7))
    expected = _with_bias_mask(*_inputs(hw, dim=16, seed=7), hw, 0.25)
    got = rel_pos.rel_pos_attention(*inputs, hw, 0.25, fold=False).float()
    assert calls == ["folded_rel_pos_attention" if amx else "folded_matmul_attention"]
    assert (got - expected).abs().max() / expected.abs().max() < 5e-2
    rel_pos.rel_pos_attention(*_inputs(hw, dim=16, seed=7), hw, 0.25, fold=False)
    assert len(calls) == 1  # float32 keeps the chunked mask whatever the CPU
