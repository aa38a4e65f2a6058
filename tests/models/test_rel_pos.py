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
    rel_pos_terms,
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
    """The definition: explicit softmax of scaled logits plus the full bias.

    The bias is looked up entry by entry (query and key offsets into the
    tables), independently of the code under test.
    """
    h, w = hw
    rows = torch.arange(h).repeat_interleave(w)  # row of each token
    cols = torch.arange(w).repeat(h)
    per_pair_h = table_h[rows[:, None] - rows[None, :] + h - 1]  # N x N x D
    per_pair_w = table_w[cols[:, None] - cols[None, :] + w - 1]
    bias = torch.einsum("bhnd,nmd->bhnm", q, per_pair_h + per_pair_w)
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


@pytest.mark.parametrize("hw", [(3, 5), (5, 2)])
def test_rel_pos_terms_are_the_per_offset_dot_products(hw):
    """The strided views of one product read the right offset for every query and key."""
    h, w = hw
    q, _, _, th, tw = _inputs(hw, batch=2, heads=3, dim=4, seed=8)
    rel_h, rel_w = rel_pos_terms(q, th, tw, hw, divisor=0.5)
    assert rel_h.shape == (2, 3, h, w, h) and rel_w.shape == (2, 3, h, w, w)
    for i in range(h * w):
        r, c = divmod(i, w)
        for key in range(h):
            want = q[:, :, i] @ th[r - key + h - 1] / 0.5
            torch.testing.assert_close(rel_h[:, :, r, c, key], want)
        for key in range(w):
            want = q[:, :, i] @ tw[c - key + w - 1] / 0.5
            torch.testing.assert_close(rel_w[:, :, r, c, key], want)


def test_a_table_of_the_wrong_size_is_named():
    q, _, _, th, tw = _inputs((4, 4))
    with pytest.raises(ValueError, match="has 7 rows, expected 9 for an attention extent of 5"):
        rel_pos_terms(q[:, :, :20], th, tw[:9], (5, 4))


@pytest.mark.parametrize("form", ["folded_sdpa", "biased_chunks", "folded_matmul"])
def test_gradients_equal_the_bias_mask_gradients(form):
    """Fine-tuning trains through these forms: q, k, v and both tables get exact gradients."""
    hw = (3, 4)
    leaves = [t.requires_grad_() for t in _inputs(hw, dim=8, seed=9)]
    weight = torch.randn(2, 3, 12, 8, generator=torch.Generator().manual_seed(10))
    scale = 0.4
    (FORMS[form](*leaves, hw, scale) * weight).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (_with_bias_mask(*leaves, hw, scale) * weight).sum().backward()
    for name, g, t in zip(("q", "k", "v", "table_h", "table_w"), got, leaves, strict=True):
        err = (g - t.grad).abs().max() / t.grad.abs().max()
        assert err < 1e-5, f"{form}: gradient of {name} off by {err:.2e}"


def test_folded_form_matches_sdpa_with_the_bias_mask():
    hw = (6, 6)
    q, k, v, th, tw = _inputs(hw, dim=16, seed=3)
    scale = 0.25
    bias = decomposed_rel_pos_bias(q, th, tw, hw)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    got = folded_rel_pos_attention(q, k, v, th, tw, hw, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("queries", "budget", "rows"),
    [
        (24, 1 << 30, [3, 3, 2]),  # about 24 queries a call: three rows of 8
        (1 << 20, 2 * 16 * 64 * 4, [2, 2, 2, 2]),  # a mask of at most 16 queries
    ],
)
def test_chunked_mask_never_builds_the_full_bias(monkeypatch, queries, budget, rows):
    hw = (8, 8)
    q, k, v, th, tw = _inputs(hw, seed=4)  # batch 2, 3 heads
    seen = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((tuple(query.shape), tuple(attn_mask.shape)))
        return real(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(rel_pos.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(rel_pos, "_CHUNK_QUERIES", queries)
    monkeypatch.setattr(rel_pos, "_CHUNK_BYTES", budget)
    got = biased_rel_pos_attention(q, k, v, th, tw, hw, 0.3)
    # One head a call, the query rows of the grid in chunks.
    per_head = [((2, 1, 8 * r, 8), (2, 1, 8 * r, 64)) for r in rows]
    assert seen == per_head * 3
    expected = _with_bias_mask(q, k, v, th, tw, hw, 0.3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
