"""Precision names, hardware detection (mocked), cast-weight cache, half-precision outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam import precision as prec
from napari_sam.predict import Predictor, decode_low_res, encode_image, predict_masks


@pytest.fixture
def fresh_detection(monkeypatch):
    """Clear the per-process detection caches before and after the test."""
    monkeypatch.delenv("NAPARI_SAM_CPU_BF16", raising=False)
    prec.cpu_has_fast_bf16.cache_clear()
    prec.cpu_has_fast_fp16.cache_clear()
    yield
    prec.cpu_has_fast_bf16.cache_clear()
    prec.cpu_has_fast_fp16.cache_clear()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, True),
        ({"avx2", "amx_tile", "amx_bf16"}, True),
        ({"avx2", "avx512f", "fma"}, False),
    ],
)
def test_cpu_bf16_detection_reads_the_flags(fresh_detection, monkeypatch, flags, expected):
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(prec, "_probe_speedup", lambda *a, **k: pytest.fail("probe not needed"))
    assert prec.cpu_has_fast_bf16() is expected


@pytest.mark.parametrize(("speedup", "expected"), [(3.0, True), (1.1, False)])
def test_cpu_bf16_detection_probes_without_flags(fresh_detection, monkeypatch, speedup, expected):
    calls = []
    monkeypatch.setattr(prec, "_cpu_flags", lambda: None)
    monkeypatch.setattr(prec, "_probe_speedup", lambda dtype: calls.append(dtype) or speedup)
    assert prec.cpu_has_fast_bf16() is expected
    assert prec.cpu_has_fast_bf16() is expected  # cached: probed once per process
    assert calls == [torch.bfloat16]


def test_probe_measures_a_ratio():
    assert prec._probe_speedup(torch.bfloat16, size=32, repeats=1) > 0


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True)])
def test_environment_overrides_detection(fresh_detection, monkeypatch, value, expected):
    monkeypatch.setenv("NAPARI_SAM_CPU_BF16", value)
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset({"avx512_bf16"} - {value}))
    assert prec.cpu_has_fast_bf16() is expected


@pytest.mark.parametrize(("fast", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_follows_the_cpu(monkeypatch, fast, expected):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: fast)
    assert prec.resolve_precision("auto", "cpu") == expected


def test_explicit_precisions_resolve_to_their_dtype(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_fast_fp16", lambda: True)
    assert prec.resolve_precision("exact") == torch.float32
    assert prec.resolve_precision("fp32") == torch.float32
    assert prec.resolve_precision("bf16") == torch.bfloat16
    assert prec.resolve_precision("fp16") == torch.float16


def test_fp16_on_a_slow_cpu_warns(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_fast_fp16", lambda: False)
    with pytest.warns(RuntimeWarning, match="no fast path on this CPU"):
        assert prec.resolve_precision("fp16", "cpu") == torch.float16


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match=r"precision must be one of .*received 'half'"):
        prec.resolve_precision("half")


def test_precision_names():
    assert [prec.precision_name(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "fp32",
        "bf16",
        "fp16",
    ]
    with pytest.raises(ValueError, match=r"received torch\.int64"):
        prec.precision_name(torch.int64)


# --------------------------------------------------------------------------- cast cache


def test_cast_module_is_cached_and_follows_weight_updates(tiny_model):
    module = tiny_model.mask_decoder
    assert prec.cast_module(module, torch.float32) is module
    cast = prec.cast_module(module, torch.bfloat16)
    assert cast is not module
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in cast.parameters())
    assert prec.cast_module(module, torch.bfloat16) is cast  # cast once

    weight = module.iou_token.weight
    with torch.no_grad():
        weight.add_(1.0)  # an in-place update (an optimiser step) invalidates the copy
    recast = prec.cast_module(module, torch.bfloat16)
    assert recast is not cast
    torch.testing.assert_close(recast.iou_token.weight.float(), weight, rtol=1e-2, atol=1e-2)

    prec.clear_cast_cache(module)
    assert prec.cast_module(module, torch.bfloat16) is not recast


def test_linears_are_packed_only_for_bf16_on_cpus_with_amx(monkeypatch):
    from napari_sam.models import rel_pos
    from napari_sam.models.packed import packing_available

    monkeypatch.setattr(rel_pos, "cpu_has_amx", lambda: False)
    assert not prec.packs_linears(torch.bfloat16, "cpu")
    monkeypatch.setattr(rel_pos, "cpu_has_amx", lambda: True)
    assert prec.packs_linears(torch.bfloat16, "cpu") == packing_available()
    assert not prec.packs_linears(torch.float32, "cpu")
    assert not prec.packs_linears(torch.float16, "cpu")
    assert not prec.packs_linears(torch.bfloat16, "meta")  # not a CPU


def test_inference_module_packs_a_cached_copy_where_it_pays(tiny_model, monkeypatch):
    from napari_sam.models.packed import PackedLinear

    encoder = tiny_model.image_encoder
    prec.clear_cast_cache(encoder)
    try:
        monkeypatch.setattr(prec, "packs_linears", lambda dtype, device: False)
        assert prec.inference_module(encoder, torch.bfloat16, rows_hint=64) is prec.cast_module(
            encoder, torch.bfloat16
        )
        monkeypatch.setattr(prec, "packs_linears", lambda dtype, device: dtype == torch.bfloat16)
        assert prec.inference_module(encoder, torch.float32, rows_hint=64) is encoder
        packed = prec.inference_module(encoder, torch.bfloat16, rows_hint=64)
        assert packed is not prec.cast_module(encoder, torch.bfloat16)
        assert any(isinstance(m, PackedLinear) for m in packed.modules())
        assert not any(isinstance(m, PackedLinear) for m in encoder.modules())
        assert prec.inference_module(encoder, torch.bfloat16, rows_hint=64) is packed  # cached

        image = np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        exact = encode_image(tiny_model, image).features
        got = encode_image(tiny_model, image, precision="bf16").features.float()
        assert (got - exact).abs().max() / exact.abs().max() < 0.05
    finally:
        prec.clear_cast_cache(encoder)


# --------------------------------------------------------------------------- outputs


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def test_bf16_embedding_and_masks_are_close_to_fp32(tiny_model):
    image = _image()
    exact = encode_image(tiny_model, image)
    half = encode_image(tiny_model, image, precision="bf16")
    assert exact.dtype == "float32" and exact.precision == "fp32"
    assert half.dtype == "bfloat16" and half.precision == "bf16"
    assert half.features.dtype == torch.bfloat16
    err = (half.features.float() - exact.features).abs().max() / exact.features.abs().max()
    assert err < 0.05

    prompts = {"points_xy": [[40, 30]], "point_labels": [1], "multimask": False}
    got = predict_masks(tiny_model, half, **prompts)
    expected = predict_masks(tiny_model, exact, **prompts)
    assert got.iou_scores.dtype == np.float32 and got.low_res_logits.dtype == np.float32
    np.testing.assert_allclose(got.iou_scores, expected.iou_scores, atol=0.05)
    assert _iou(got.masks[0, 0], expected.masks[0, 0]) > 0.9


def test_decoder_precision_can_differ_from_the_embedding(tiny_model):
    half = encode_image(tiny_model, _image(1), precision="bf16")
    kwargs = {
        "points_xy": torch.tensor([[[10.0, 20.0]]]),
        "point_labels": torch.tensor([[1]]),
        "boxes_xyxy": None,
        "mask_input": None,
        "multimask": True,
    }
    follow = decode_low_res(tiny_model, half, **kwargs)
    fp32 = decode_low_res(tiny_model, half, precision="exact", **kwargs)
    assert follow.logits.dtype == fp32.logits.dtype == torch.float32
    assert not torch.equal(follow.logits, fp32.logits)  # a different decoder ran
    torch.testing.assert_close(follow.logits, fp32.logits, rtol=0.1, atol=0.1)


@pytest.mark.parametrize(("fast", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_predictor_defaults_to_auto(tiny_model, monkeypatch, fast, dtype):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: fast)
    predictor = Predictor(tiny_model)
    assert predictor.precision == "auto"
    assert predictor.set_image(_image(2)).dtype == dtype


def test_encode_image_refuses_an_unknown_precision(tiny_model):
    with pytest.raises(ValueError, match="precision must be one of"):
        encode_image(tiny_model, _image(), precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(tiny_model, precision="double")


def test_compile_without_a_cxx_compiler_is_refused(tiny_model, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(prec.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        encode_image(tiny_model, _image(), compile=True)


def test_compile_first_keeps_triton_from_crashing_a_gl_process(tiny_model, monkeypatch):
    """In napari on Mesa's llvmpipe, importing triton (torch.compile does) segfaults."""
    from napari_sam import _clip

    order = []
    monkeypatch.setattr(prec.shutil, "which", lambda name: "/usr/bin/c++")
    monkeypatch.setattr(_clip, "_block_triton_if_it_would_crash", lambda: order.append("guard"))
    monkeypatch.setattr(torch, "compile", lambda m, dynamic: order.append("compile") or m)
    module = tiny_model.prompt_encoder
    prec.clear_cast_cache(module)
    try:
        assert prec.compiled_module(module, torch.float32) is module
    finally:
        prec.clear_cast_cache(module)
    assert order == ["guard", "compile"]


@pytest.mark.slow
def test_compiled_encoder_matches_eager(tiny_model):
    image = _image(3)
    eager = encode_image(tiny_model, image)
    compiled = encode_image(tiny_model, image, compile=True)
    assert compiled.dtype == "float32"
    scale = float(eager.features.abs().max())
    torch.testing.assert_close(compiled.features, eager.features, rtol=1e-4, atol=1e-4 * scale)


def test_cached_values_may_nest_and_are_rebuilt_after_updates(tiny_model):
    module = tiny_model.prompt_encoder
    calls = []

    def outer():
        calls.append("outer")
        return prec.cached_for(module, "inner", lambda: calls.append("inner") or 41) + 1

    assert prec.cached_for(module, "outer", outer) == 42
    assert prec.cached_for(module, "outer", outer) == 42
    assert calls == ["outer", "inner"]
    with torch.no_grad():
        module.no_mask_embed.weight.mul_(2.0)
    assert prec.cached_for(module, "outer", outer) == 42
    assert calls == ["outer", "inner", "outer", "inner"]
