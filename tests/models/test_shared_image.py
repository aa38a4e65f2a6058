"""The factored mask decoder (models/_shared_image.py) equals the plain arithmetic."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch

from napari_sam.models import _shared_image, mask_decoder
from napari_sam.models._shared_image import SharedImageWork, can_factor
from napari_sam.models.mask_decoder import MaskDecoder
from napari_sam.models.prompt_encoder import PromptEncoder
from napari_sam.models.transformer import Attention, TwoWayTransformer

from .._reference import randomize_

DIM, HW = 64, (12, 10)
INPUT_HW = (16 * HW[0], 16 * HW[1])


def _parts(depth: int, heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    transformer = TwoWayTransformer(depth=depth, embedding_dim=DIM, num_heads=heads, mlp_dim=128)
    decoder = MaskDecoder(transformer_dim=DIM, transformer=transformer, iou_head_hidden_dim=64)
    prompt_encoder = PromptEncoder(
        embed_dim=DIM, image_embedding_hw=HW, input_image_hw=INPUT_HW, mask_in_chans=16
    )
    randomize_(decoder, seed=seed)
    randomize_(prompt_encoder, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # norm shifts well away from zero: the factored means must cancel
        for module in decoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen))
    return decoder.eval(), prompt_encoder.eval()


def _prompts(prompt_encoder, batch: int, n_points: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = INPUT_HW
    coords = torch.rand(batch, n_points, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])
    labels = torch.randint(0, 2, (batch, n_points), generator=gen)
    return prompt_encoder(points=(coords, labels), boxes=None, masks=None)


@contextlib.contextmanager
def _counting_calls(owner, name: str):
    """Within the block ``owner.<name>`` still runs and counts its calls in the yielded list."""
    calls: list[int] = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, name, spy)
        yield calls


def _plain(decoder, *args):
    decoder.share_image_work = False
    try:
        return decoder(*args)
    finally:
        del decoder.share_image_work


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize(("batch", "with_work"), [(1, True), (5, False), (5, True)])
@torch.no_grad()
def test_factored_decoder_equals_plain_decoder(depth, multimask, batch, with_work):
    decoder, prompt_encoder = _parts(depth)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(9))
    pe = prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(prompt_encoder, batch, 2)
    assert can_factor(decoder.transformer, decoder.num_mask_tokens + 1 + sparse.shape[1])
    work = SharedImageWork() if with_work else None
    with _counting_calls(mask_decoder, "factored_transformer") as calls:
        masks, iou, index = decoder.forward_selected(
            features, pe, sparse, dense, multimask, image_work=work
        )
    assert calls == [1] and index is None  # the factored path ran
    plain_masks, plain_iou = _plain(decoder, features, pe, sparse, dense, multimask)
    assert masks.shape == plain_masks.shape == (batch, 3 if multimask else 1, 4 * HW[0], 4 * HW[1])
    scale = float(plain_masks.abs().max())
    torch.testing.assert_close(masks, plain_masks, rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(iou, plain_iou, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_attention_over_factors_equals_attention_over_formed_keys(batch):
    decoder, prompt_encoder = _parts(3, heads=4)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(7))
    pe = prompt_encoder.get_dense_pe()
    sparse, _ = _prompts(prompt_encoder, batch, 2, seed=8)
    tokens = torch.cat(
        [
            torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).expand(batch, -1, -1),
            sparse,
        ],
        dim=1,
    )
    work = SharedImageWork()
    src = features.flatten(2).transpose(1, 2)
    pe_tokens = pe.flatten(2).transpose(1, 2)
    queries, keys = _shared_image.factored_transformer(
        decoder.transformer, lambda: features, pe, tokens, work
    )
    q = queries + tokens
    eye = torch.eye(DIM)
    for level, attn in [
        (1, decoder.transformer.layers[1].cross_attn_token_to_image),
        (2, decoder.transformer.layers[2].cross_attn_token_to_image),
        (3, decoder.transformer.final_attn_token_to_image),
    ]:
        formed = keys.project(eye, None, "identity", level=level)  # B x N x C, each prompt
        assert formed.shape == (batch, src.shape[1], DIM)
        expected = attn._few_queries(
            attn.q_proj(q), attn.k_proj(formed + pe_tokens), attn.v_proj(formed)
        )
        got = keys.attend(attn, q, pe_tokens, f"attn{level}", level=level)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("batch", [1, 4])
@torch.no_grad()
def test_half_precision_factored_decoder_stays_close(batch):
    decoder, prompt_encoder = _parts(2)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(10))
    pe = prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(prompt_encoder, batch, 2, seed=11)
    full, _ = _plain(decoder, features, pe, sparse, dense, True)
    half = decoder.to(torch.bfloat16)
    args = [t.to(torch.bfloat16) for t in (features, pe, sparse)]
    args.append(dense[:1].to(torch.bfloat16).expand_as(dense))  # shared, as the encoder gives it
    with (
        _counting_calls(_shared_image.FactoredKeys, "attend") as over_factors,
        _counting_calls(_shared_image, "_attend_through") as through,
    ):
        masks, _, _ = half.forward_selected(*args, True, image_work=SharedImageWork())
    assert masks.dtype == torch.bfloat16
    assert not over_factors and len(through) == 2  # half precision: through the formed tokens
    err = float((masks.float() - full).abs().max()) / float(full.abs().max())
    assert err < 0.05, err


def _tokens(decoder, sparse):
    batch = sparse.shape[0]
    output = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    return torch.cat([output.expand(batch, -1, -1), sparse], dim=1)


@pytest.mark.parametrize(
    ("dtype", "batch", "formed"),
    [
        (torch.float32, 1, True),
        (torch.float32, 3, False),
        (torch.bfloat16, 1, True),
        (torch.bfloat16, 3, True),
    ],
)
@torch.no_grad()
def test_formed_tokens_are_kept_where_they_pay_and_equal_the_factors(dtype, batch, formed):
    decoder, prompt_encoder = _parts(2)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(12))
    pe = prompt_encoder.get_dense_pe()
    sparse, _ = _prompts(prompt_encoder, batch, 2, seed=13)
    decoder = decoder.to(dtype)
    features, pe, tokens = (t.to(dtype) for t in (features, pe, _tokens(decoder, sparse)))
    _, keys = _shared_image.factored_transformer(
        decoder.transformer, lambda: features, pe, tokens, SharedImageWork()
    )
    assert (keys.formed is not None) == formed  # half precision, or one prompt
    weight = torch.randn(24, DIM, generator=torch.Generator().manual_seed(14)).to(dtype)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(15)).to(dtype)
    factored = dataclasses.replace(keys, formed=None).project(weight, bias, "w")
    got = keys.project(weight, bias, "w")
    if formed:
        torch.testing.assert_close(got, torch.nn.functional.linear(keys.formed, weight, bias))
        assert keys[torch.tensor([0])].formed.shape == (1, *keys.formed.shape[1:])
    err = float((got.float() - factored.float()).abs().max() / factored.float().abs().max())
    assert err < (1e-5 if dtype == torch.float32 else 0.03), err


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_half_precision_attends_through_the_formed_tokens(batch):
    """bf16 prompts give the plain decoder's masks (the same weights) up to bf16 rounding."""
    decoder, prompt_encoder = _parts(3)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(16))
    pe = prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(prompt_encoder, batch, 2, seed=17)
    half = decoder.to(torch.bfloat16)
    args = [t.to(torch.bfloat16) for t in (features, pe, sparse)]
    args.append(dense[:1].to(torch.bfloat16).expand_as(dense))
    with (
        _counting_calls(_shared_image, "_attend_through") as attends,
        _counting_calls(_shared_image, "_few_keys_mix_through") as mixes,
    ):
        masks, iou, _ = half.forward_selected(*args, True, image_work=SharedImageWork())
    assert len(attends) == 3 and len(mixes) == 2  # layers 1 and 2 (and the final attention)
    # the reference arithmetic on the bf16-rounded weights and inputs, in float32
    plain, plain_iou = _plain(half.float(), *(t.float() for t in args), True)
    err = float((masks.float() - plain).abs().max() / plain.abs().max())
    assert err < 0.02, err  # bf16 rounding: about 0.012 here
    assert float((iou.float() - plain_iou).abs().max()) < 0.01  # about 0.003


def _image_side(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, 30, DIM, generator=gen)
    pe = torch.randn(1, 30, DIM, generator=gen)
    attn = Attention(DIM, 4, downsample_rate=2)
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.bias.normal_(generator=gen)  # nonzero: each must be added where it belongs
    return tokens, pe, attn, gen


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_attention_through_formed_tokens_equals_the_projected_attention(batch):
    tokens, pe, attn, gen = _image_side(batch, seed=18)
    q = torch.randn(batch, 5, DIM, generator=gen)
    work = SharedImageWork()
    got = _shared_image._attend_through(work, ("a",), attn, q, tokens, pe)
    want = attn._few_queries(attn.q_proj(q), attn.k_proj(tokens + pe), attn.v_proj(tokens))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = _shared_image._attend_through(work, ("a",), attn, q, tokens, pe)  # shared term kept
    torch.testing.assert_close(again, got)

    kp = attn.k_proj(q)
    mix = _shared_image._few_keys_mix_through(work, ("m",), attn, kp, tokens, pe)
    want_mix, _ = attn._few_keys_factors(attn.q_proj(tokens + pe), kp, attn.v_proj(q))
    assert mix.shape == (batch, 30, 4 * 5)
    torch.testing.assert_close(mix, want_mix, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_factored_selection_and_reuse_across_calls():
    decoder, prompt_encoder = _parts(2)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(4))
    pe = prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(prompt_encoder, 8, 1, seed=3)
    full, iou = _plain(decoder, features, pe, sparse, dense, True)
    best = iou.max(dim=1).values.sort().values
    threshold = float(best[3:5].mean())  # half the prompts pass, none sits on the threshold
    work = SharedImageWork()
    masks, _, index = decoder.forward_selected(
        features, pe, sparse, dense, True, iou_above=threshold, image_work=work
    )
    expected = torch.nonzero((iou > threshold).any(dim=1)).flatten()
    assert 0 < len(expected) < 8
    torch.testing.assert_close(index, expected)
    atol = 2e-6 * float(full.abs().max())
    torch.testing.assert_close(masks, full[expected], rtol=1e-5, atol=atol)
    kept = dict(work.products)
    assert kept  # shared products were made ...
    again, _, _ = decoder.forward_selected(
        features, pe, sparse[:1], dense[:1], True, image_work=work
    )
    assert all(work.products[k] is v for k, v in kept.items())  # ... and reused, not rebuilt
    torch.testing.assert_close(again, full[:1], rtol=1e-5, atol=atol)


@torch.no_grad()
def test_shared_work_follows_new_weights_and_new_image_values():
    decoder, prompt_encoder = _parts(2)
    features = torch.randn(1, DIM, *HW, generator=torch.Generator().manual_seed(5))
    pe = prompt_encoder.get_dense_pe()
    sparse, dense = _prompts(prompt_encoder, 1, 1, seed=6)
    work = SharedImageWork()
    decoder.forward_selected(features, pe, sparse, dense, True, image_work=work)
    # the same storage with other values (as a recycled buffer would have)
    features.mul_(-1.5)
    got, _, _ = decoder.forward_selected(features, pe, sparse, dense, True, image_work=work)
    expected, _ = _plain(decoder, features, pe, sparse, dense, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))
    # weights updated in place (a fine-tuning step)
    decoder.transformer.layers[1].cross_attn_token_to_image.k_proj.weight.mul_(2.0)
    decoder.transformer.layers[0].norm4.bias.add_(0.3)
    got, _, _ = decoder.forward_selected(features, pe, sparse, dense, True, image_work=work)
    expected, _ = _plain(decoder, features, pe, sparse, dense, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * float(expected.abs().max()))


def test_can_factor_only_without_gradients_and_for_few_tokens():
    decoder, _ = _parts(2, heads=2)  # cross-attention width 32: up to 15 tokens x 2 heads
    transformer = decoder.transformer
    with torch.no_grad():
        assert can_factor(transformer, 15)
        assert not can_factor(transformer, 16)  # 2 x 16 = 32: no cheaper than direct
    assert not can_factor(transformer, 7)  # gradients on (training): the plain path
    with torch.no_grad():
        assert not can_factor(
            TwoWayTransformer(depth=0, embedding_dim=DIM, num_heads=2, mlp_dim=8), 7
        )


@torch.no_grad()
def test_decode_low_res_keeps_work_for_the_last_embeddings(tiny_model):
    import napari_sam.predict as predict

    images = [torch.rand(3, 40 + 10 * i, 50) for i in range(3)]
    embeddings = [
        predict.encode_image(tiny_model, (img.permute(1, 2, 0).numpy() * 255).astype("uint8"))
        for img in images
    ]
    works = [predict._image_work(e.features, e.features.dtype) for e in embeddings]
    assert predict._image_work(embeddings[2].features, torch.float32) is works[2]
    assert predict._image_work(embeddings[2].features, torch.bfloat16) is not works[2]
    assert len(predict._IMAGE_WORK) <= predict._IMAGE_WORK_SLOTS
    # the oldest was evicted: a fresh (empty) one replaces it
    assert predict._image_work(embeddings[0].features, torch.float32) is not works[0]


@torch.no_grad()
def test_decode_low_res_reuses_products_for_clicks_not_for_mask_prompts(tiny_model, monkeypatch):
    import napari_sam.predict as predict

    monkeypatch.setattr(predict, "_IMAGE_WORK", type(predict._IMAGE_WORK)())
    image = (np.random.default_rng(0).random((60, 50, 3)) * 255).astype("uint8")
    emb = predict.encode_image(tiny_model, image)
    point, label = torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])
    args = dict(boxes_xyxy=None, multimask=True)
    low = predict.decode_low_res(
        tiny_model, emb, points_xy=point, point_labels=label, mask_input=None, **args
    )
    assert len(predict._IMAGE_WORK) == 1  # a click keeps the image's work for the next one
    predict._IMAGE_WORK.clear()
    predict.decode_low_res(
        tiny_model,
        emb,
        points_xy=point,
        point_labels=label,
        mask_input=low.logits[:, :1],
        **args,
    )
    assert len(predict._IMAGE_WORK) == 0  # a mask prompt changes the image side every time


@pytest.mark.parametrize("precision", ["exact", "bf16"])
def test_later_clicks_reuse_every_shared_product(demo_model, monkeypatch, precision):
    """The work survives its check on the next click, also where inputs are cast per call."""
    import napari_sam.predict as predict

    monkeypatch.setattr(predict, "_IMAGE_WORK", type(predict._IMAGE_WORK)())
    image = (np.random.default_rng(1).random((60, 50, 3)) * 255).astype("uint8")
    emb = predict.encode_image(demo_model, image, precision=precision)
    builds: list[object] = []
    real = SharedImageWork.get

    def counting(self, key, build):
        return real(self, key, lambda: builds.append(key) or build())

    monkeypatch.setattr(SharedImageWork, "get", counting)
    made = []
    for xy in ([20.0, 30.0], [10.0, 40.0], [35.0, 5.0]):
        predict.decode_low_res(
            demo_model,
            emb,
            points_xy=torch.tensor([[xy]]),
            point_labels=torch.tensor([[1]]),
            boxes_xyxy=None,
            mask_input=None,
            multimask=True,
        )
        made.append(len(builds))
    assert made[0] > 0 and made[1] == made[2] == made[0]  # all on the first click, none after
    ((_, work),) = predict._IMAGE_WORK.values()
    dtypes = {
        v.dtype for v in work.products.values() if torch.is_tensor(v) and v.is_floating_point()
    }
    assert dtypes == {emb.features.dtype}


def test_sample_coords_unravel_like_numpy():
    shape = (3, 5, 7, 11)
    coords = _shared_image._sample_coords(shape, torch.device("cpu"))
    flat = _shared_image._sample_at(int(np.prod(shape)), torch.device("cpu")).numpy()
    expected = np.unravel_index(flat, shape)
    assert len(coords) == len(shape)
    for got, want in zip(coords, expected, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


def test_work_token_of_a_strided_input_follows_its_values():
    """A non-contiguous input is sampled through per-axis indices, not a copy."""
    decoder = torch.nn.Linear(2, 2)  # any module: its weights are part of the token
    base = torch.randn(1, 16, 40, 40)
    strided = base.transpose(2, 3)  # 25,600 values, not contiguous
    assert not strided.is_contiguous()
    token = _shared_image.work_token(decoder, (strided,))
    assert _shared_image.work_token(decoder, (strided,)) == token
    at = _shared_image._sample_coords(tuple(strided.shape), strided.device)
    strided[tuple(c[:1] for c in at)] += 1.0  # change one sampled value in place
    assert _shared_image.work_token(decoder, (strided,)) != token


def test_a_first_click_imports_no_symbolic_shape_machinery(demo_model):
    """torch.unravel_index imported torch.fx's symbolic shapes and sympy: 0.7 s on click one.

    The demo model (256 px) takes the factored decoder, which samples the
    strided positional embedding (the tiny test model does not)."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, napari_sam as ns\n"
        "m = ns.load_model('demo')\n"
        "img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)\n"
        "emb = ns.encode_image(m, img, precision='auto')\n"
        "ns.predict_masks(m, emb, points_xy=[[40, 30]], point_labels=[1])\n"
        "ns.predict_masks(m, emb, boxes_xyxy=[10, 10, 60, 50])\n"
        "print(sorted(n for n in ('sympy', 'torch.fx.experimental.symbolic_shapes')"
        " if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
