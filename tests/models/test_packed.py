"""Linear layers packed for oneDNN: ``F.linear``'s results, the GELU fused, modules packed."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_sam.models import packed
from napari_sam.models.common import MLPBlock, call_before_layers
from napari_sam.models.packed import PackedLinear, pack_linears, packing_available
from napari_sam.precision import _cast_copy

from .test_image_encoder import _small_encoder  # a windowed, a global and a windowed block


def _bf16_linear(seed: int, n_in: int = 48, n_out: int = 40) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(torch.bfloat16).eval()


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach()).norm() / want.detach().norm())


def test_packing_is_available_on_x86_linux_wheels():
    """torch's x86 Linux wheels ship oneDNN: the encoder's fast path must not silently vanish."""
    if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
        assert packing_available()
    else:  # elsewhere, at least answer without raising
        assert packing_available() in (True, False)


def test_packing_unavailable_without_the_kernels(monkeypatch):
    monkeypatch.setattr(packed, "_packed_op", lambda: None)
    packed.packing_available.cache_clear()
    try:
        assert packing_available() is False
        with pytest.raises(RuntimeError, match="no oneDNN linear packing"):
            PackedLinear(torch.zeros(2, 2, dtype=torch.bfloat16), None, rows_hint=4)
    finally:
        packed.packing_available.cache_clear()


def test_packed_linear_gives_the_linear_layer_result():
    layer = _bf16_linear(0)
    x = torch.randn(3, 5, 48).to(torch.bfloat16)  # any leading axes
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    with torch.inference_mode():
        got = PackedLinear(layer.weight, layer.bias, rows_hint=15)(x)
        unbiased = PackedLinear(layer.weight, None, rows_hint=15)(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.bfloat16
    assert _relative(got, want) < 1e-2
    assert _relative(unbiased, F.linear(x.float(), layer.weight.float())) < 1e-2
    strided = torch.randn(48, 6).to(torch.bfloat16).t()  # 6 rows, not contiguous
    with torch.inference_mode():
        got_strided = PackedLinear(layer.weight, layer.bias, rows_hint=6)(strided)
    assert (
        _relative(got_strided, F.linear(strided.float(), layer.weight.float(), layer.bias.float()))
        < 1e-2
    )
    # bf16 rounding of the same products, not a different computation
    assert _relative(got, F.linear(x, layer.weight, layer.bias).float()) < 1e-2


def test_fused_gelu_is_the_exact_gelu_of_the_output():
    layer = _bf16_linear(1)
    x = torch.randn(64, 48).to(torch.bfloat16)
    want = F.gelu(F.linear(x.float(), layer.weight.float(), layer.bias.float()))
    with torch.inference_mode():
        got = PackedLinear(layer.weight, layer.bias, rows_hint=64, activation="gelu")(x)
    assert _relative(got, want) < 1e-2
    tanh = F.gelu(F.linear(x.float(), layer.weight.float(), layer.bias.float()), approximate="tanh")
    assert (got.float() - want).abs().max() < (tanh - want).abs().max() + 1e-2
    assert (got < 0).any()  # GELU, not ReLU: negative outputs survive


def test_residual_is_added_in_the_kernel_and_left_unchanged():
    layer = _bf16_linear(2)
    x = torch.randn(2, 6, 48).to(torch.bfloat16)
    residual = (torch.randn(2, 6, 40) * 4).to(torch.bfloat16)
    kept = residual.clone()
    want = F.linear(x.float(), layer.weight.float(), layer.bias.float()) + residual.float()
    with torch.inference_mode():
        packed_layer = PackedLinear(layer.weight, layer.bias, rows_hint=12)
        got = packed_layer(x, residual=residual)
        separate = packed_layer(x).float() + residual.float()
    assert got.shape == residual.shape and got.dtype == torch.bfloat16
    assert torch.equal(residual, kept)
    assert _relative(got, want) < 1e-2
    # one rounding of the sum, not two: at least as close as layer-then-add
    assert (got.float() - want).abs().max() <= (separate.bfloat16().float() - want).abs().max()


def test_a_residual_with_an_activation_is_refused():
    layer = _bf16_linear(3)
    fused = PackedLinear(layer.weight, layer.bias, rows_hint=4, activation="gelu")
    x = torch.randn(4, 48).to(torch.bfloat16)
    with torch.inference_mode(), pytest.raises(ValueError, match="without an activation"):
        fused(x, residual=torch.zeros(4, 40, dtype=torch.bfloat16))


def test_packed_encoder_adds_the_residual_stream_in_the_projections(monkeypatch):
    """Each block's attention projection and second feed-forward layer add the stream."""
    torch.manual_seed(0)
    encoder = _small_encoder().eval()
    packed_copy = pack_linears(_cast_copy(encoder, torch.bfloat16), rows_hint=16)
    with_residual = []
    real = PackedLinear.forward

    def spy(self, x, residual=None):
        with_residual.append((self, residual is not None))
        return real(self, x, residual)

    monkeypatch.setattr(PackedLinear, "forward", spy)
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got = packed_copy(images.to(torch.bfloat16)).float()
        want = encoder(images)
    added = [layer for layer, has in with_residual if has]
    expected = [m for b in packed_copy.blocks for m in (b.attn.proj, b.mlp.lin2)]
    assert added == expected
    assert _relative(got, want) < 3e-2


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match=r"activation must be one of .*'relu'"):
        PackedLinear(torch.zeros(2, 2, dtype=torch.bfloat16), None, rows_hint=4, activation="relu")


def test_pack_linears_replaces_every_linear_and_fuses_the_mlp_gelu():
    torch.manual_seed(0)
    encoder = _small_encoder().eval()
    plain = _cast_copy(encoder, torch.bfloat16)
    packed_copy = pack_linears(_cast_copy(encoder, torch.bfloat16), rows_hint=16)
    assert not any(isinstance(m, nn.Linear) for m in packed_copy.modules())
    for block in packed_copy.blocks:
        assert block.mlp.lin1.activation == "gelu" and isinstance(block.mlp.act, nn.Identity)
        assert block.mlp.lin2.activation == "none" and block.attn.qkv.activation == "none"
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = encoder(images)
        got = packed_copy(images.to(torch.bfloat16)).float()
        unpacked = plain(images.to(torch.bfloat16)).float()
    assert _relative(got, want) < 3e-2
    assert _relative(got, unpacked) < 3e-2
    # the float32 encoder is untouched and keeps its layers
    assert isinstance(encoder.blocks[0].mlp.lin1, nn.Linear)
    assert isinstance(encoder.blocks[0].mlp.act, nn.GELU)


def test_pack_linears_keeps_other_activations_apart():
    block = MLPBlock(8, 16, act=nn.ReLU).to(torch.bfloat16).eval()
    x = torch.randn(4, 8).to(torch.bfloat16)
    with torch.inference_mode():
        want = block(x).float()
        pack_linears(block, rows_hint=4)
        got = block(x).float()
    assert isinstance(block.act, nn.ReLU) and block.lin1.activation == "none"
    assert _relative(got, want) < 1e-2


def test_between_layers_still_reaches_every_layer_of_a_packed_encoder():
    """Pre-encoding pauses before each leaf layer: packing must keep them leaves."""
    torch.manual_seed(0)
    encoder = _small_encoder().eval()
    counts = []
    for module in (
        _cast_copy(encoder, torch.bfloat16),
        pack_linears(_cast_copy(encoder, torch.bfloat16), rows_hint=16),
    ):
        calls: list[int] = []
        with torch.inference_mode(), call_before_layers(module, lambda c=calls: c.append(1)):
            module(torch.randn(1, 3, 64, 64).to(torch.bfloat16))
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0
