"""models/common.py: module_tensors (behind the weight fingerprints), call_before_layers."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from napari_sam.models.common import LayerNorm2d, call_before_layers, module_tensors
from napari_sam.registry import build_model


def test_module_tensors_lists_every_parameter_and_buffer():
    decoder = build_model("tiny_vit_b").mask_decoder
    expected = [*decoder.parameters(), *decoder.buffers()]
    got = module_tensors(decoder)
    assert len(got) == len(expected)
    assert {id(t) for t in got} == {id(t) for t in expected}
    assert [id(t) for t in got] == [id(t) for t in module_tensors(decoder)]  # a fixed order


def test_module_tensors_sees_buffers_replaced_parameters_and_empty_slots():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), LayerNorm2d(2))
    model.register_module("missing", None)
    model[0].register_parameter("bias", None)
    before = module_tensors(model)
    assert any(t is model[1].running_mean for t in before)
    assert not any(t is None for t in before)
    model[0].weight = nn.Parameter(torch.zeros(4, 3))
    after = module_tensors(model)
    assert any(t is model[0].weight for t in after)
    assert len(after) == len(before)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.GELU(), nn.Linear(4, 2)))


def test_call_before_layers_calls_before_each_leaf_then_lets_go():
    net, x = _net(), torch.randn(5, 3)
    seen: list[tuple] = []
    net[0].register_forward_hook(lambda *_: seen.append("linear 0 ran"))
    with call_before_layers(net, lambda: seen.append("callback")):
        out = net(x)
        net(x)
    assert seen[:2] == ["callback", "linear 0 ran"]  # before the layer, not after
    assert seen.count("callback") == 2 * 3  # three leaves (Linear, GELU, Linear), two passes
    before = len(seen)
    torch.testing.assert_close(net(x), out)  # hooks gone, result unchanged
    assert seen.count("callback") == 6 and len(seen) == before + 1


def test_call_before_layers_ignores_other_threads_and_removes_hooks_on_error():
    net, x = _net(), torch.randn(5, 3)
    calls = []
    with call_before_layers(net, lambda: calls.append(threading.get_ident())):
        other = threading.Thread(target=net, args=(x,))
        other.start()
        other.join()
        assert calls == []  # another thread's forward pass is not interrupted

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), call_before_layers(net, stop):
        net(x)
    net(x)  # no hook left behind
    assert all(not m._forward_pre_hooks for m in net.modules())
